"""Scoring one record as the API answers it, from the local model or from a running API: the GUI
uses either (`RAREML_API_URL`), and both give the same answer.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np

from rareml.errors import RareMLError
from rareml.model import Model


def explanation(model: Model, row: np.ndarray, record: dict, top: int = 10) -> dict:
    """The features that moved this record's log-odds most (SHAP values from XGBoost's
    pred_contribs), largest first, with the value sent and the log-odds before any feature (bias)."""
    contributions = model.contributions_rows(model.encoder.model_rows(row[None]))[0]
    order = np.argsort(-np.abs(contributions[:-1]), kind="stable")[:top]
    names = model.schema.names
    return {"bias": float(contributions[-1]), "top": [
        {"feature": names[i], "value": record.get(names[i]), "contribution": float(contributions[i])} for i in order]}


class LocalScorer:
    """Scores with the model folder in this process (the Space's mode)."""

    def __init__(self, model: Model):
        self.model = model

    def score(self, record: dict, top: int = 10) -> dict:
        """The /predict?explain=true answer, without a prediction id (nothing is logged)."""
        row, _ = self.model.encoder.encode(record)
        probability = float(self.model.predict_rows(self.model.encoder.model_rows(row[None]))[0])
        return {"probability": probability, "decision": int(probability >= self.model.threshold),
                "threshold": self.model.threshold, "model_version": self.model.version,
                "explanation": explanation(self.model, row, record, top)}


class ApiScorer:
    """Scores through a running API (`make serve`): the prediction is logged there, and its
    prediction_id can receive the true outcome later."""

    def __init__(self, url: str, timeout: float = 10):
        self.url, self.timeout = url.rstrip("/"), timeout

    def score(self, record: dict, top: int = 10) -> dict:
        request = urllib.request.Request(f"{self.url}/predict?explain=true&top={top}", data=json.dumps(record).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                message = str(exc)
            raise RareMLError(f"the API at {self.url} refused the record: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RareMLError(f"the API at {self.url} cannot be reached: {exc}") from None
