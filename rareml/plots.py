"""The report's figures (matplotlib, Agg): curves, calibration, threshold, confusion matrix, SHAP."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from rareml import metrics
from rareml.metrics import ThresholdChoice


def pr_roc(y: np.ndarray, p: np.ndarray, choice: ThresholdChoice) -> Figure:
    fig = Figure(figsize=(10, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    precision, recall, _ = precision_recall_curve(y, p)
    ax1.plot(recall, precision, label=f"model (AP {metrics.average_precision(y, p):.3f})")
    ax1.axhline(np.mean(y), color="grey", ls="--", label=f"no skill ({np.mean(y):.3f})")
    at = metrics.at_threshold(y, p, choice.threshold)
    ax1.plot(at["recall"], at["precision"], "o", color="C3", label=f"threshold {choice.threshold:.3f}")
    ax1.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)", xlim=(0, 1), ylim=(0, 1.02))
    fpr, tpr, _ = roc_curve(y, p)
    ax2.plot(fpr, tpr, label=f"model (ROC-AUC {metrics.roc_auc(y, p):.3f})")
    ax2.plot([0, 1], [0, 1], color="grey", ls="--", label="no skill")
    ax2.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    for ax in (ax1, ax2):
        ax.legend(loc="lower left" if ax is ax1 else "lower right")
    fig.tight_layout()
    return fig


def reliability_diagram(y: np.ndarray, scores: dict[str, np.ndarray]) -> Figure:
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    top = 0.0
    for name, p in scores.items():
        mean_p, rate = metrics.reliability(y, p, bins=15)
        ax.plot(mean_p, rate, "o-", label=f"{name} (ECE {metrics.ece(y, p):.4f}, Brier {metrics.brier(y, p):.4f})")
        top = max(top, mean_p.max(), rate.max())
    ax.plot([0, top], [0, top], color="grey", ls="--", label="perfect")
    ax.set(xlabel="mean predicted probability (equal-mass bins)", ylabel="observed positive rate",
           title="Reliability (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def threshold_plot(curve: dict[str, np.ndarray], choice: ThresholdChoice) -> Figure:
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    t = curve["threshold"]
    for name in ("precision", "recall", "f1"):
        ax.plot(t, curve[name], label=name)
    if choice.metric not in ("f1", "min_precision", "min_recall"):
        values = curve[choice.metric]
        ax.plot(t, values / np.max(np.abs(values)), ls=":", label=f"{choice.metric} (scaled)")
    ax.axvline(choice.threshold, color="C3", ls="--", label=f"chosen {choice.threshold:.3f} ({choice.metric})")
    ax.set(xlabel="threshold on calibrated probability", ylabel="value",
           title="Threshold choice (out-of-fold, training split)", xlim=(0, min(1, np.quantile(t, 0.999) * 1.2)))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> Figure:
    pred = p >= threshold
    cells = np.array([[np.sum((y == 0) & ~pred), np.sum((y == 0) & pred)],
                      [np.sum((y == 1) & ~pred), np.sum((y == 1) & pred)]])
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    ax.imshow(cells / cells.sum(axis=1, keepdims=True), cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(cells):
        ax.text(j, i, f"{n:,}\n({n / cells[i].sum():.1%} of row)", ha="center", va="center", fontsize=9)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["predicted 0", "predicted 1"],
           yticklabels=["actual 0", "actual 1"], title=f"Confusion matrix at {threshold:.3f} (test)")
    fig.tight_layout()
    return fig


def shap_bar(names: list[str], mean_abs: np.ndarray, top: int = 20) -> Figure:
    order = np.argsort(mean_abs)[::-1][:top][::-1]
    fig = Figure(figsize=(7, 0.3 * len(order) + 1.2))
    ax = fig.subplots()
    ax.barh([names[i] for i in order], mean_abs[order], color="C0")
    ax.set(xlabel="mean |SHAP value| (log-odds)", title="Global importance")
    fig.tight_layout()
    return fig


def shap_beeswarm(names: list[str], contribs: np.ndarray, values: list[np.ndarray], top: int = 15,
                  seed: int = 0) -> Figure:
    """One row per feature: each dot a case, x its SHAP value, colour its feature value
    (rank within the sample; grey where missing or categorical)."""
    mean_abs = np.abs(contribs).mean(axis=0)
    order = np.argsort(mean_abs)[::-1][:top][::-1]
    rng, points = np.random.default_rng(seed), None
    fig = Figure(figsize=(8, 0.35 * len(order) + 1.5))
    ax = fig.subplots()
    for row, i in enumerate(order):
        x = contribs[:, i]
        v = values[i]
        colour = np.full(len(x), np.nan)
        if v.dtype.kind == "f" and np.isfinite(v).any():
            ok = np.isfinite(v)
            colour[ok] = (np.argsort(np.argsort(v[ok])) / max(ok.sum() - 1, 1))
        jitter = rng.uniform(-0.3, 0.3, len(x))
        grey = np.isnan(colour)
        ax.scatter(x[grey], row + jitter[grey], s=4, color="0.6", alpha=0.5)
        points = ax.scatter(x[~grey], row + jitter[~grey], s=4, c=colour[~grey], cmap="coolwarm", vmin=0, vmax=1)
    ax.set_yticks(range(len(order)), [names[i] for i in order])
    ax.axvline(0, color="grey", lw=0.8)
    ax.set(xlabel="SHAP value (impact on log-odds)", title="SHAP values (test sample)")
    if points is not None:
        fig.colorbar(points, ax=ax, label="feature value (low -> high)", ticks=[])
    fig.tight_layout()
    return fig


def panel(title: str, series: list[tuple[str, np.ndarray, np.ndarray]], unit: str | None = None,
          kind: str = "timeseries") -> Figure:
    """One Grafana dashboard panel drawn from Prometheus range-query results: `series` holds
    (legend, epoch seconds, values). A `bargauge` panel shows each series' last value as a bar;
    a `table` panel each series' last value as a row."""
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    scale, label = (100.0, "%") if unit == "percentunit" else (1.0, {"reqps": "requests/s", "s": "seconds"}.get(unit, ""))
    if not series:
        ax.text(0.5, 0.5, "no data in the window", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_axis_off()
    elif kind == "bargauge":
        ax.barh([s[0] for s in series], [s[2][-1] * scale for s in series], color="C0")
        ax.set(xlabel=label or "last value")
    elif kind == "table":
        ax.set_axis_off()
        rows = [[name, f"{values[-1]:.4g}"] for name, _, values in series]
        ax.table(cellText=rows, colLabels=["series", "last value"], loc="center", cellLoc="left").scale(1, 1.3)
    else:
        start = min(float(t[0]) for _, t, _ in series)
        for name, t, values in series:
            ax.plot((np.asarray(t, float) - start) / 60.0, np.asarray(values, float) * scale, label=name, lw=1.3)
        ax.set(xlabel="minutes", ylabel=label)
        if len(series) <= 12:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    return fig


def retraining_timeline(runs: list[dict]) -> Figure:
    """Each gated retraining: champion and challenger average precision on its gate set (95%
    intervals), a filled marker where the challenger was promoted. `runs`: dicts with `started`
    (datetime), `champion` and `challenger` ({value, low, high}) and `promote`."""
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    x = np.arange(len(runs))
    for offset, who, colour in ((-0.08, "champion", "C0"), (0.08, "challenger", "C1")):
        values = np.array([r[who]["value"] for r in runs], float)
        errors = np.array([[r[who]["value"] - r[who]["low"], r[who]["high"] - r[who]["value"]] for r in runs], float).T
        ax.errorbar(x + offset, values, yerr=errors, fmt="none", ecolor=colour, alpha=0.6, capsize=3)
        for i, r in enumerate(runs):
            filled = who == "challenger" and r["promote"]
            ax.plot(x[i] + offset, values[i], "o", color=colour, markerfacecolor=colour if filled or who == "champion"
                    else "white", label=who if i == 0 else None)
    ax.set_xticks(x, [r["started"].strftime("%m-%d %H:%M") for r in runs], rotation=20, fontsize=8)
    ax.set(ylabel="average precision (gate set)", title="Retrainings: champion vs challenger "
           "(filled challenger marker: promoted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
