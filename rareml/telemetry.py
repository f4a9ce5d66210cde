"""The API's Prometheus metrics (names prefixed rareml_). With PROMETHEUS_MULTIPROC_DIR set (gunicorn,
see 04_serve.main) every worker writes its own files and the exposition adds them up; the window
gauges keep the most recent value written by any worker (multiprocess_mode="mostrecent").
"""
from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from rareml import monitoring
from rareml.model import Model

log = logging.getLogger(__name__)
PROBABILITY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The service's metrics, registered in a registry of their own (one per app: tests build many)."""

    def __init__(self, model: Model, fairness_bound: float):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            ProcessCollector,
            disable_created_metrics,
        )

        disable_created_metrics()  # no *_created series: half the exposition, and nothing reads them
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # memory, CPU, open files of the answering process
        reg, latest = {"registry": self.registry}, {"registry": self.registry, "multiprocess_mode": "mostrecent"}
        self.requests = Counter("rareml_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], **reg)
        self.latency = Histogram("rareml_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, **reg)
        self.predictions = Counter("rareml_predictions", "Predictions by decision", ["decision"], **reg)
        self.negatives, self.positives = self.predictions.labels("0"), self.predictions.labels("1")
        self.probability = Histogram("rareml_predicted_probability", "Calibrated probability of each prediction",
                                     buckets=PROBABILITY_BUCKETS, **reg)
        self.feedback = Counter("rareml_feedback", "Delayed labels received", ["label"], **reg)
        self.rejected = Counter("rareml_rejected_inputs", "Rejected requests by reason", ["reason"], **reg)
        self.unseen = Counter("rareml_unseen_categories", "Category values never seen in training (scored as "
                              "missing)", ["feature"], **reg)
        self.info = Gauge("rareml_model_info", "The model being served (1; 0 once replaced)",
                          ["name", "version", "trained_at", "calibration"], multiprocess_mode="max", **reg)
        self.threshold = Gauge("rareml_threshold", "Decision threshold", **latest)
        self.reloads = Counter("rareml_model_reloads", "New champions seen by a worker: swapped in (ok) or refused",
                               ["result"], **reg)
        Gauge("rareml_fairness_bound", "Largest acceptable difference between groups (the fairness alert's bound)",
              multiprocess_mode="max", **reg).set(fairness_bound)
        self.baseline = Gauge("rareml_validation_metric", "Validation (out-of-fold) figures from the manifest, the "
                              "baseline for live performance", ["metric"], **latest)
        self.describe(model)
        self.window_size = Gauge("rareml_window_predictions", "Predictions in the window", **latest)
        self.positive_rate = Gauge("rareml_positive_rate", "Share of positive decisions in the window", **latest)
        self.feature_psi = Gauge("rareml_feature_psi", "Data drift: PSI of each feature, window vs training",
                                 ["feature"], **latest)
        self.max_psi = Gauge("rareml_feature_psi_max", "Largest feature PSI in the window", **latest)
        self.score_psi = Gauge("rareml_prediction_psi", "Prediction drift: PSI of the scores, window vs validation",
                               **latest)
        self.labeled = Gauge("rareml_window_labeled", "Predictions with a label in the labeled window", **latest)
        self.live = Gauge("rareml_live_metric", "Precision, recall and average precision over the recent "
                          "predictions that received a label", ["metric"], **latest)
        self.selection = Gauge("rareml_group_selection_rate", "Positive-decision rate per group in the window",
                               ["attribute", "group"], **latest)
        self.selection_gap = Gauge("rareml_fairness_selection_rate_difference", "Largest difference in selection "
                                   "rate between groups", ["attribute"], **latest)
        self.tpr_gap = Gauge("rareml_fairness_true_positive_rate_difference", "Largest difference in true-positive "
                             "rate between groups (labeled window)", ["attribute"], **latest)
        self.alerts = Counter("rareml_alerts_received", "Alerts received on the /alerts webhook",
                              ["alertname", "status"], **reg)
        self.retrains = Gauge("rareml_retrains", "Retrainings asked for by retrain=\"true\" alerts, by outcome (queued, "
                              "running, airflow, promoted, rejected, not_enough_labels, failed), from the log",
                              ["outcome"], **latest)
        self.handoffs = Counter("rareml_orchestrator_triggers", "Retrainings handed to Airflow (RAREML_AIRFLOW_URL) "
                                "by result: created, exists (a repeated alert), failed (queued for the watcher)",
                                ["result"], **reg)
        self.refreshed = Gauge("rareml_monitor_refresh_timestamp_seconds", "When the window gauges were computed",
                               **latest)
        self.refresh_failures = Counter("rareml_monitor_refresh_failures", "Scrapes whose window gauges could not "
                                        "be computed from the prediction log (the last values are kept)", **reg)
        self.ignored = Counter("rareml_ignored_fields", "Fields sent that the pipeline dropped (accepted, ignored)",
                               ["field"], **reg)
        self.log_writable = Gauge("rareml_log_writable", "1 while the prediction log can be written (0 in any worker "
                                  "gives 0)", multiprocess_mode="livemin", **reg)
        self.log_pending = Gauge("rareml_log_pending_bytes", "Answered predictions not yet in the prediction log "
                                 "(journaled, queued in memory)", multiprocess_mode="livesum", **reg)

    def describe(self, model: Model, replaced: Model | None = None) -> None:
        """The gauges that describe the model served (at start, and after a hot swap)."""
        if replaced is not None:
            self.info.labels(*_info(replaced)).set(0)
        self.info.labels(*_info(model)).set(1)
        self.threshold.set(model.threshold)
        for name, value in model.manifest["metrics"]["validation"].items():
            self.baseline.labels(name).set(value)

    def update(self, s: monitoring.Signals) -> None:
        self.window_size.set(s.predictions)
        self.positive_rate.set(s.positive_rate)
        for name, value in s.feature_psi.items():
            self.feature_psi.labels(name).set(value)
        self.max_psi.set(max(s.feature_psi.values(), default=math.nan))
        self.score_psi.set(s.score_psi)
        self.labeled.set(s.labeled)
        for name, value in (("precision", s.precision), ("recall", s.recall), ("average_precision", s.average_precision)):
            self.live.labels(name).set(value)
        for attribute, rates in s.selection_rate.items():
            for group, rate in rates.items():
                self.selection.labels(attribute, group).set(rate)
        for attribute, gap in s.selection_rate_gap.items():
            self.selection_gap.labels(attribute).set(gap)
        for attribute, gap in s.true_positive_rate_gap.items():
            self.tpr_gap.labels(attribute).set(gap)
        self.refreshed.set(time.time())

    def exposition(self) -> bytes:
        """Every worker's metrics added up (multiprocess mode), plus this process's own resource use;
        if the shared metric files cannot be read, this worker's metrics alone rather than no answer."""
        from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, multiprocess

        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        try:
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        except Exception:
            log.exception("cannot read the multiprocess metric files: answering with this worker's metrics")
            return generate_latest(self.registry)


def observe_many(histogram, values: np.ndarray) -> None:
    """Histogram.observe for many values at once: one increment per bucket instead of per value
    (prometheus_client keeps per-bucket counts in `_buckets`, bounded above by `_upper_bounds`)."""
    counts = np.bincount(np.searchsorted(histogram._upper_bounds, values, side="left"),
                         minlength=len(histogram._upper_bounds))
    for bucket, count in zip(histogram._buckets, counts.tolist()):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(values.sum()))


def _info(model: Model) -> tuple[str, str, str, str]:
    return model.manifest["name"], model.version, model.manifest["trained_at"], model.calibrator.method
