"""The API's OpenAPI 3.1 description, generated from the model it serves, and a Blueprint that
serves it (GET /openapi.json) with interactive docs (GET /docs: Swagger UI 5 from the installed
flask-swagger-ui package; the page loads nothing from another host).

The record schema says what the API accepts, no more and no less (tests hold it to the encoder):
a numeric feature takes any number a 32-bit float holds (its training range is documentation, in
the description and x-rareml-training-min/max, since values outside it are scored too); a
categorical takes its known levels and any other string, number or boolean, scored as missing
unless its text is a level; null is unknown; only features, sensitive attributes and the columns
the pipeline dropped (accepted, ignored) may appear.
"""
from __future__ import annotations

import hashlib
import html
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path

from flask import Blueprint, Response, abort, request, send_file, url_for

from rareml.errors import RareMLError
from rareml.features import CATEGORICAL, FLOAT32_MAX, Feature, Schema

ERRORS = {  # status -> (component name, what it means, the reasons it carries)
    400: ("BadRequest", "The body is not JSON.", "empty_body, malformed_json, incomplete_body"),
    401: ("Unauthorized", "Missing or wrong bearer token.", "unauthorized"),
    404: ("NotFound", "No such prediction (or path).", "unknown_prediction, not_found"),
    409: ("Conflict", "The prediction already has a label.", "duplicate_feedback"),
    413: ("TooLarge", "Too much in one request.", "body_too_large, batch_too_large, too_many_alerts"),
    415: ("UnsupportedMediaType", "Content-Type is not application/json.", "wrong_content_type"),
    422: ("Unprocessable", "JSON that does not fit the schema; `field` names the culprit.",
          ("not_an_object, missing_field, extra_field, wrong_type, non_finite, out_of_range, not_a_batch, empty_batch, "
           "not_columns, not_a_list, ragged_columns, not_feedback, not_alerts, wrong_version, not_an_alert")),
    500: ("Internal", "A fault of the server; its log has the details.", "internal"),
    503: ("Unavailable", "The service cannot do this now.", "log_unavailable, webhook_disabled"),
}
JSON_BODY_ERRORS = (400, 413, 415, 422, 500, 503)


def document(model, *, max_batch: int, title: str | None = None) -> dict:
    """The OpenAPI 3.1 document of the API serving `model` (a rareml.model.Model: its schema,
    version, threshold, name and saved examples), `max_batch` records per /predict/batch."""
    schema, name = model.schema, model.manifest["name"]
    examples = _examples(model)
    info = {"title": title or f"rareml: {name}", "version": model.version,
            "summary": f"Calibrated probability that {schema.target} = {schema.positive!r}, model {name}.",
            "description": _description(model, max_batch)}
    components = {"schemas": _schemas(schema, next(iter(examples.values()))["value"], max_batch),
                  "responses": {c: _error_response(status, text, reasons)
                                for status, (c, text, reasons) in ERRORS.items()},
                  "securitySchemes": {"alertToken": {
                      "type": "http", "scheme": "bearer",
                      "description": "The API's RAREML_ALERT_TOKEN, as Alertmanager sends it (GET /alerts too)."}}}
    return {"openapi": "3.1.0", "info": info, "tags": TAGS, "paths": _paths(model, examples, max_batch),
            "components": components}


def _description(model, max_batch: int) -> str:
    schema = model.schema
    return (f"Model version `{model.version}`; decision 1 when the probability reaches the threshold "
            f"{model.threshold:.4g}. Send every feature of the `Record` schema (null for an unknown value); "
            f"a categorical value never seen in training is accepted and scored as missing. Batches take up to "
            f"{max_batch} records, as records or as columns. Sensitive attributes: "
            f"{', '.join(schema.sensitive) or 'none'}. Every error is JSON: "
            '`{"error": message, "reason": kind, "field": culprit or null}`.')


TAGS = [{"name": "predictions", "description": "Score records."},
        {"name": "feedback", "description": "The true outcome of an earlier prediction."},
        {"name": "operations", "description": "Health, readiness, the model card and Prometheus metrics."},
        {"name": "alerts", "description": "Alertmanager's webhook and what it sent."},
        {"name": "docs", "description": "This document and its interactive view."}]


# -- the record: the model's schema as JSON Schema ---------------------------------------------------------------

def value_schema(feature: Feature, sensitive: bool = False) -> dict:
    """What the API accepts for one feature."""
    out = _categorical(feature) if feature.kind == CATEGORICAL else _numeric(feature)
    if sensitive:
        out["description"] += " A sensitive attribute: the fairness gauges group predictions by it."
        out["x-rareml-sensitive"] = True
    out["x-rareml-missing-rate"] = _finite(feature.missing_rate)
    typical = _finite(feature.typical)
    if typical is not None:
        out["examples"] = [typical]
    return out


def _numeric(f: Feature) -> dict:
    low, high = _finite(f.min), _finite(f.max)
    seen = f"From {low:g} to {high:g} in training" if low is not None and high is not None else "No training range"
    return {"type": ["number", "null"], "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX,
            "description": f"Numeric. {seen}; a value outside it is accepted and scored like the nearest end "
                           "(trees do not extrapolate). Any number a 32-bit float holds; null: unknown.",
            "x-rareml-kind": "numeric", "x-rareml-training-min": low, "x-rareml-training-max": high}


def _categorical(f: Feature) -> dict:
    known = [{"type": "string", "enum": list(f.categories), "title": "a level seen in training"}] if f.categories else []
    return {"anyOf": [*known,
                      {"type": ["string", "number", "boolean"], "title": "any other string, number or boolean",
                       "description": "Read as text (15 and 15.0 as \"15\", true as \"true\"): a known level if it "
                                      "is one, else scored as missing and counted in rareml_unseen_categories_total."},
                      {"type": "null", "title": "unknown"}],
            "description": f"Categorical, {len(f.categories)} levels seen in training (the enum). Any other "
                           "string, number or boolean is accepted and scored as missing; null: unknown.",
            "x-rareml-kind": "categorical", "x-rareml-levels": list(f.categories)}


def _extra_properties(schema: Schema) -> dict[str, dict]:
    """The fields a record may carry beside the features: sensitive attributes and ignored columns."""
    names = set(schema.names)
    out = {a: {"description": "A sensitive attribute, not a model input: recorded with the prediction for the "
                              "fairness gauges. Any JSON value; absent or null: unknown.", "x-rareml-sensitive": True}
           for a in schema.sensitive if a not in names}
    for column in getattr(schema, "ignored", ()):
        if column not in names and column not in out:
            out[column] = {"description": "A column of the training table the pipeline dropped: accepted and "
                                          "ignored (counted in rareml_ignored_fields_total).", "x-rareml-ignored": True}
    return out


def _record(schema: Schema, example: dict) -> dict:
    features = {f.name: value_schema(f, f.name in schema.sensitive) for f in schema.features}
    return {"type": "object", "title": "Record",
            "description": "One record: every feature (null when unknown), optionally the sensitive attributes and "
                           "the columns the pipeline dropped; no other field.",
            "properties": features | _extra_properties(schema), "required": schema.names,
            "additionalProperties": False, "examples": [example]}


def _columns(schema: Schema, max_batch: int) -> dict:
    def column(value: dict) -> dict:
        return {"type": "array", "items": value, "minItems": 1, "maxItems": max_batch}

    features = {f.name: column(value_schema(f, f.name in schema.sensitive)) for f in schema.features}
    extras = {k: column(v) for k, v in _extra_properties(schema).items()}
    return {"type": "object", "title": "Columns",
            "description": "A batch column by column: feature -> its values, all lists of one length (what pandas' "
                           "`to_dict(\"list\")` gives). Half the bytes of records.",
            "properties": features | extras, "required": schema.names, "additionalProperties": False}


def _examples(model) -> dict[str, dict]:
    """Named examples (OpenAPI Example Objects): a saved held-out record of each outcome, or typical values."""
    saved = model.examples() if hasattr(model, "examples") else {}
    out = {outcome: {"summary": f"A held-out record whose outcome was {outcome}", "value": _fit(rs[0], model.schema)}
           for outcome in ("positive", "negative") for rs in [saved.get(outcome)] if rs}
    typical = {f.name: f.typical for f in model.schema.features}
    return out or {"typical": {"summary": "Each feature's typical value (median or most frequent level)",
                               "value": _fit(typical, model.schema)}}


def _fit(record: dict, schema: Schema) -> dict:
    """`record` reduced to the fields the schema allows, every feature present, non-finite numbers as null."""
    allowed = set(schema.sensitive) | set(getattr(schema, "ignored", ()))
    kept = {f.name: record.get(f.name) for f in schema.features} | {k: v for k, v in record.items() if k in allowed}
    return {k: _finite(v) if isinstance(v, float) else v for k, v in kept.items()}


def _finite(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# -- answers and the other bodies ------------------------------------------------------------------------------

def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict, required: list[str] | None = None, **more) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            **more}


STRING, NUMBER, STRING_MAP = {"type": "string"}, {"type": "number"}, {"type": "object", "additionalProperties": {
    "type": "string"}}


def _schemas(schema: Schema, example: dict, max_batch: int) -> dict:
    prediction = {"probability": {"type": "number", "minimum": 0, "maximum": 1,
                                  "description": f"Calibrated probability that {schema.target} = {schema.positive!r}."},
                  "decision": {"type": "integer", "enum": [0, 1], "description": "1 when probability >= threshold."},
                  "threshold": NUMBER, "model_version": STRING,
                  "prediction_id": {"type": "string", "description": "Send it to POST /feedback with the outcome."}}
    feature_names = {"type": "string", "enum": schema.names}
    return {
        "Record": _record(schema, example), "Columns": _columns(schema, max_batch),
        "BatchRequest": {"oneOf": [
            _object({"records": {"type": "array", "items": _ref("Record"), "minItems": 1, "maxItems": max_batch}},
                    title="records", additionalProperties=False),
            _object({"columns": _ref("Columns")}, title="columns", additionalProperties=False)]},
        "Prediction": _object(prediction | {"explanation": _ref("Explanation")}, list(prediction)),
        "Explanation": _object({"bias": {"type": "number", "description": "Log-odds before any feature."},
                                "top": {"type": "array", "items": _object({
                                    "feature": feature_names, "value": {"description": "The value sent."},
                                    "contribution": {"type": "number", "description": "SHAP value, in log-odds."}})}},
                               description="The features that moved this record's log-odds most, largest first."),
        "BatchResponse": _object({"predictions": {"type": "array", "items": _ref("Prediction")},
                                  "model_version": STRING}),
        "Feedback": _object({"prediction_id": {"type": "string", "description": "What POST /predict answered."},
                             "label": {"type": "integer", "enum": [0, 1], "description": "The true outcome."}},
                            additionalProperties=False),
        "FeedbackRecorded": _object({"prediction_id": STRING, "label": {"type": "integer", "enum": [0, 1]},
                                     "status": {"const": "recorded"}}),
        "Health": _object({"status": {"const": "ok"}}),
        "Ready": _object({"status": {"const": "ready"}, "model_version": STRING}),
        "NotReady": _object({"status": {"const": "not ready"}, "reason": STRING}),
        "ModelCard": _model_card(feature_names),
        **_alert_schemas(),
        "Error": _object({"error": {"type": "string", "description": "What is wrong, for a person."},
                          "reason": {"type": "string", "description": "The kind, for a program (counted in "
                                                                      "rareml_rejected_inputs_total)."},
                          "field": {"type": ["string", "null"], "description": "The field at fault, if one is."}}),
    }


def _model_card(feature_names: dict) -> dict:
    feature = _object({"name": STRING, "kind": {"enum": ["numeric", "categorical"]},
                       "categories": {"type": "array", "items": STRING}, "min": {"type": ["number", "null"]},
                       "max": {"type": ["number", "null"]}, "typical": {"type": ["string", "number", "null"]},
                       "missing_rate": NUMBER}, ["name", "kind"])
    card = {"name": STRING, "model_version": STRING, "trained_at": {"type": "string", "format": "date-time"},
            "threshold": {"type": "object", "description": "The threshold and how it was chosen.",
                          "properties": {"threshold": NUMBER}, "required": ["threshold"]},
            "metrics": {"type": "object", "description": "Test, test CI, validation, no-skill and fairness figures."},
            "calibration": STRING, "importance": {"type": "object", "propertyNames": feature_names,
                                                  "additionalProperties": NUMBER},
            "target": STRING, "positive": {"description": "The target value counted as positive."},
            "sensitive": {"type": "array", "items": STRING}, "ignored": {"type": "array", "items": STRING},
            "max_batch": {"type": "integer"}, "features": {"type": "array", "items": feature},
            "family": {"type": "string", "description": "The model family, or \"blend of a, b\"."},
            "members": {"type": "array", "items": _object({"family": STRING, "weight": NUMBER}, ["family", "weight"]),
                        "description": "Each family in the model and its weight in the log-odds blend."},
            "selection": {"type": ["object", "null"], "description": "Why these families: each one's out-of-fold "
                          "average precision with a 95% interval, the blend's, the weights and the method (null for a "
                          "model serialized before model families)."},
            "lineage": {"type": ["object", "null"], "description": "Parent champion, training window, data fingerprint."},
            "gate": {"type": ["object", "null"], "description": "The gate's decision and evidence that promoted this "
                                                                "model (06_retrain.py); null for one promoted by hand."}}
    return _object(card, [k for k in card if k not in ("ignored", "lineage", "gate", "selection")], description="What is served, how good it is, "
                                                                          "what it expects.")


def _alert_schemas() -> dict:
    status = {"enum": ["firing", "resolved"]}
    alert = _object({"status": status, "labels": {**STRING_MAP, "properties": {"alertname": STRING},
                                                  "required": ["alertname"]},
                     "annotations": {"type": "object"}, "startsAt": {"type": "string", "format": "date-time"},
                     "endsAt": {"type": "string", "format": "date-time"}, "generatorURL": STRING,
                     "fingerprint": STRING}, ["status", "labels"])
    webhook = _object({"version": {"const": "4"}, "groupKey": STRING, "truncatedAlerts": {"type": "integer"},
                       "status": status, "receiver": STRING, "groupLabels": STRING_MAP, "commonLabels": STRING_MAP,
                       "commonAnnotations": STRING_MAP, "externalURL": STRING,
                       "alerts": {"type": "array", "items": _ref("Alert"), "minItems": 1, "maxItems": 1000}},
                      ["alerts"], description="Alertmanager's webhook payload, version 4.")
    stored = _object({"received": {"type": "number", "description": "Unix time, seconds."}, "status": status,
                      "alertname": STRING, "fingerprint": {"type": ["string", "null"]},
                      "startsAt": {"type": ["string", "null"]}, "labels": STRING_MAP, "annotations": {"type": "object"}})
    retrain = _object({"id": {"type": "integer"}, "alertname": STRING, "alert": STRING, "queued": NUMBER,
                       "started": {"type": ["number", "null"]}, "finished": {"type": ["number", "null"]},
                       "attempts": {"type": "integer"},
                       "outcome": {"enum": ["promoted", "rejected", "not_enough_labels", "failed", "airflow", None]},
                       "detail": {"type": ["object", "null"]}}, description="A retraining asked for by a "
                      "retrain=\"true\" alert (06_retrain.py --watch runs it, or Airflow's rareml_retrain: outcome "
                      "airflow until that run ends, detail naming the run), and how it ended.")
    handed = _object({"result": {"enum": ["created", "exists", "failed"]}, "dag_run_id": STRING, "reason": STRING},
                     ["result"], description="With RAREML_AIRFLOW_URL set: the Airflow run of these alerts "
                     "(created; exists: a repeat; failed: queued for the embedded watcher instead).")
    recorded = _object({"recorded": {"type": "integer"}, "retrains_queued": {
        "type": "integer", "description": "Firing retrain=\"true\" alerts new to the queue (a repeat is not)."},
        "airflow": handed}, ["recorded", "retrains_queued"])
    return {"Alert": alert, "AlertmanagerWebhook": webhook, "AlertsRecorded": recorded,
            "AlertList": _object({"alerts": {"type": "array", "items": stored, "description": "Latest first."},
                                  "retrains": {"type": "array", "items": retrain, "description": "Latest first."}})}


def _error_response(status: int, text: str, reasons: str) -> dict:
    example = {"error": text, "reason": reasons.split(", ")[0], "field": None}
    return {"description": f"{text} Reasons: {reasons}.",
            "content": {"application/json": {"schema": _ref("Error"), "example": example}}}


# -- the paths ---------------------------------------------------------------------------------------------------

def _json(schema: dict, description: str = "OK", **media) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema, **media}}}


def _errors(*statuses: int) -> dict:
    return {str(s): {"$ref": f"#/components/responses/{ERRORS[s][0]}"} for s in statuses}


def _operation(tag: str, operation_id: str, summary: str, responses: dict, body: dict | None = None, **more) -> dict:
    out = {"tags": [tag], "operationId": operation_id, "summary": summary, **more, "responses": responses}
    if body is not None:
        out["requestBody"] = {"required": True, **body}
    return out


def _paths(model, examples: dict[str, dict], max_batch: int) -> dict:
    names = model.schema.names
    records = [e["value"] for e in examples.values()]
    columns = {k: [r.get(k) for r in records] for k in records[0]}
    answer = {"probability": round((1 + model.threshold) / 2, 4), "decision": 1, "threshold": model.threshold,
              "model_version": model.version, "prediction_id": "5f1c2a9e7b3d4c60-0"}
    query = [{"name": "explain", "in": "query", "schema": {"type": "boolean", "default": False},
              "description": "true, 1 or yes (any case): add the features that moved the score most."},
             {"name": "top", "in": "query", "schema": {"type": "integer", "default": 10},
              "description": "How many features the explanation lists, clipped to 1..100 (not an integer: 422)."}]
    return {
        "/predict": {"post": _operation(
            "predictions", "predict", "Score one record", {"200": _json(_ref("Prediction"), example=answer),
                                                           **_errors(*JSON_BODY_ERRORS)},
            _json(_ref("Record"), "A record", examples=examples), parameters=query)},
        "/predict/batch": {"post": _operation(
            "predictions", "predictBatch", f"Score up to {max_batch} records",
            {"200": _json(_ref("BatchResponse")), **_errors(*JSON_BODY_ERRORS)},
            _json(_ref("BatchRequest"), "Records, or the same as columns", examples={
                "records": {"summary": "Records", "value": {"records": records}},
                "columns": {"summary": f"Columns ({len(names)} features)", "value": {"columns": columns}}}))},
        "/feedback": {"post": _operation(
            "feedback", "feedback", "Record the true outcome of a prediction",
            {"200": _json(_ref("FeedbackRecorded")), **_errors(400, 404, 409, 413, 415, 422, 500, 503)},
            _json(_ref("Feedback"), "The prediction and its outcome",
                  example={"prediction_id": answer["prediction_id"], "label": 1}))},
        "/health": {"get": _operation("operations", "health", "The process answers",
                                      {"200": _json(_ref("Health"))})},
        "/ready": {"get": _operation("operations", "ready", "Predictions can be answered and logged", {
            "200": _json(_ref("Ready")), "503": _json(_ref("NotReady"), "Not ready (shutting down, log unusable)")})},
        "/model": {"get": _operation("operations", "modelCard", "The model card",
                                     {"200": _json(_ref("ModelCard"))})},
        "/metrics": {"get": _operation("operations", "metrics", "Prometheus metrics", {"200": {
            "description": "Prometheus text exposition format (text/plain with a version parameter)",
            "content": {"text/plain": {"schema": {"type": "string"}, "example": (
                "# HELP rareml_predictions_total Predictions made, by decision\n"
                "# TYPE rareml_predictions_total counter\n" 'rareml_predictions_total{decision="1"} 12.0\n')}}}})},
        "/alerts": {
            "post": _operation("alerts", "receiveAlerts", "Alertmanager's webhook", {
                "200": _json(_ref("AlertsRecorded")), **_errors(400, 401, 413, 415, 422, 500, 503)},
                _json(_ref("AlertmanagerWebhook"), "Webhook payload (version 4)"), security=[{"alertToken": []}]),
            "get": _operation("alerts", "listAlerts", "The latest alerts received", {
                "200": _json(_ref("AlertList")), **_errors(401, 422, 500, 503)}, security=[{"alertToken": []}],
                parameters=[{"name": "limit", "in": "query", "schema": {"type": "integer", "default": 100},
                             "description": "How many, clipped to 1..1000 (not an integer: 422)."}])},
        "/openapi.json": {"get": _operation("docs", "openapi", "This document", {
            "200": _json({"type": "object"}, "The OpenAPI document"),
            "304": {"description": "Not modified: If-None-Match holds the current ETag"}})},
        "/docs": {"get": _operation("docs", "docs", "Interactive docs (Swagger UI, served from this API)", {
            "200": {"description": "An HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}})},
    }


# -- serving it --------------------------------------------------------------------------------------------------

ASSET_PACKAGE = "flask_swagger_ui"  # ships Swagger UI's dist/ files (see requirements-serve.txt)
ASSETS = {"swagger-ui.css": "text/css", "index.css": "text/css", "swagger-ui-bundle.js": "text/javascript",
          "favicon-32x32.png": "image/png"}  # the only files of the package /docs/ serves
INIT_JS = """window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({url: root.dataset.openapi, domNode: root, deepLinking: true, validatorUrl: null,
                               presets: [SwaggerUIBundle.presets.apis], plugins: [SwaggerUIBundle.plugins.DownloadUrl],
                               layout: "BaseLayout"});
});
"""
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8"><meta name="referrer" content="no-referrer">
<title>{title}</title>
<link rel="stylesheet" href="{index_css}"><link rel="stylesheet" href="{css}">
<link rel="icon" type="image/png" sizes="32x32" href="{icon}">
</head>
<body>
<div id="swagger-ui" data-openapi="{spec}"></div>
<noscript>The interactive docs need JavaScript: the document itself is <a href="{spec}">openapi.json</a>.</noscript>
<script src="{bundle}"></script>
<script src="{init}"></script>
</body>
</html>
"""
# Nothing from another host, no inline script; Swagger UI sets inline styles and data: images.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def assets_dir() -> Path:
    """Swagger UI's files in the installed package (a RareMLError if it is missing)."""
    spec = importlib.util.find_spec(ASSET_PACKAGE)
    folder = Path(spec.origin).parent / "dist" if spec is not None and spec.origin else None
    if folder is None or not all((folder / name).is_file() for name in ASSETS):
        raise RareMLError(f"the docs' assets are missing: install {ASSET_PACKAGE.replace('_', '-')} "
                          "(pip install -r requirements-serve.txt)")
    return folder


def blueprint(source: Callable[[], object], build: Callable[[object], dict] = lambda doc: doc) -> Blueprint:
    """GET /openapi.json (the document `build` makes of what `source` returns, e.g. the served
    model; made and serialized once while the same object comes back, so a model swap shows at once)
    and GET /docs."""
    folder, cache = assets_dir(), {}
    bp = Blueprint("openapi", __name__)

    def current() -> tuple[dict, bytes, str]:
        key = source()
        entry = cache.get("entry")
        if entry is None or entry[0] is not key:
            doc = build(key)
            body = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
            entry = cache["entry"] = (key, doc, body, hashlib.sha256(body).hexdigest()[:32])
        return entry[1:]

    @bp.get("/openapi.json")
    def openapi_json():
        _, body, etag = current()
        response = Response(body, mimetype="application/json", headers={"Cache-Control": "no-cache"})
        response.set_etag(etag)
        return response.make_conditional(request)

    @bp.get("/docs")
    def docs():
        url = {name: html.escape(url_for(".docs_asset", name=name)) for name in (*ASSETS, "init.js")}
        page = PAGE.format(title=html.escape(f"{current()[0]['info']['title']}: API docs"),
                           spec=html.escape(url_for(".openapi_json")), index_css=url["index.css"],
                           css=url["swagger-ui.css"], icon=url["favicon-32x32.png"],
                           bundle=url["swagger-ui-bundle.js"], init=url["init.js"])
        return Response(page, mimetype="text/html", headers={"Content-Security-Policy": CSP,
                                                             "Cache-Control": "no-cache"})

    @bp.get("/docs/<name>")
    def docs_asset(name: str):
        if name == "init.js":
            return Response(INIT_JS, mimetype="text/javascript", headers={"Cache-Control": "max-age=3600"})
        if name not in ASSETS:  # a fixed list: no other file of the package, no path from the request
            abort(404)
        return send_file(folder / name, mimetype=ASSETS[name], max_age=86400, conditional=True)

    return bp
