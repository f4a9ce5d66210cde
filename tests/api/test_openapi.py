"""The OpenAPI document (rareml/openapi.py): valid OpenAPI 3.1, generated from the model's own
schema, its Record schema accepting exactly what the encoder accepts; the real app serves it and
answers as it says; /docs is Swagger UI from local files only, and renders in Chromium."""
from __future__ import annotations

import dataclasses
import json
import re
import threading
from html.parser import HTMLParser
from urllib.parse import urlsplit

import jsonschema
import pytest
from flask import Flask
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator

from rareml import openapi
from rareml.errors import InputError
from rareml.features import CATEGORICAL, FLOAT32_MAX, NUMERIC, Feature, RecordEncoder, Schema
from tests.conftest import chromium_page

HAS_IGNORED = "ignored" in {f.name for f in dataclasses.fields(Schema)}
ENDPOINTS = {("/predict", "post"), ("/predict/batch", "post"), ("/feedback", "post"), ("/health", "get"),
             ("/ready", "get"), ("/model", "get"), ("/metrics", "get"), ("/alerts", "post"), ("/alerts", "get"),
             ("/openapi.json", "get"), ("/docs", "get")}


@dataclasses.dataclass
class ModelLike:
    """What `document` reads of a rareml.model.Model, without a booster."""

    schema: Schema
    version: str = "0123456789ab"
    threshold: float = 0.3
    saved: dict = dataclasses.field(default_factory=dict)

    @property
    def manifest(self) -> dict:
        return {"name": "small", "model_version": self.version}

    def examples(self) -> dict:
        return self.saved


def small_schema(**changes) -> Schema:
    features = (Feature("age", NUMERIC, min=17.0, max=90.0, typical=38.0),
                Feature("job", CATEGORICAL, categories=("clerk", "nurse"), typical="clerk"),
                Feature("code", CATEGORICAL, categories=("1", "15"), typical="1"))
    extra = {"ignored": ("row_id", "job")} if HAS_IGNORED else {}  # "job" stays a feature
    return dataclasses.replace(Schema(features, "y", 1, sensitive=("job", "region"), **extra), **changes)


def validator(doc: dict, name: str) -> jsonschema.Draft202012Validator:
    """A JSON Schema validator for one component schema, its $refs resolved in the document."""
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def accepted(encoder: RecordEncoder, record: object) -> bool:
    try:
        encoder.encode(record)
    except InputError:
        return False
    return True


# -- the document -------------------------------------------------------------------------------------------------

def test_document_is_valid_openapi_3_1_and_json():
    doc = openapi.document(ModelLike(small_schema()), max_batch=7)
    validate(doc, cls=OpenAPIV31SpecValidator)
    assert doc["openapi"].startswith("3.1") and doc["info"]["version"] == "0123456789ab"
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


def test_every_endpoint_is_described_with_its_errors():
    doc = openapi.document(ModelLike(small_schema()), max_batch=7)
    assert {(p, m) for p, ops in doc["paths"].items() for m in ops} == ENDPOINTS
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if "requestBody" in op:
                assert {"400", "413", "415", "422", "500"} <= set(op["responses"]), (path, method)
            for status, response in op["responses"].items():
                if status >= "400" and "$ref" in response:
                    content = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]["content"]
                    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert doc["paths"]["/ready"]["get"]["responses"].keys() == {"200", "503"}
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert [p["name"] for p in doc["paths"]["/predict"]["post"]["parameters"]] == ["explain", "top"]
    assert doc["paths"]["/alerts"]["get"]["parameters"][0]["name"] == "limit"
    assert all(doc["paths"]["/alerts"][m]["security"] == [{"alertToken": []}] for m in ("get", "post"))
    assert doc["components"]["securitySchemes"]["alertToken"]["scheme"] == "bearer"
    error = validator(doc, "Error")
    assert error.is_valid({"error": "x", "reason": "extra_field", "field": None})
    assert not error.is_valid({"error": "x", "reason": "extra_field"})
    records = doc["components"]["schemas"]["BatchRequest"]["oneOf"][0]["properties"]["records"]
    assert records["maxItems"] == 7


VALUES = [None, 0, 38, -1.5, 1e6, FLOAT32_MAX, -FLOAT32_MAX, 1e39, -1e39, 10**40, True, False, "", "clerk", "nurse",
          "never seen", "15", 15, 15.0, 15.5, [1], {"a": 1}]


def test_record_schema_accepts_exactly_what_the_encoder_accepts():
    schema = small_schema()
    record_schema, encoder = validator(openapi.document(ModelLike(schema), max_batch=7), "Record"), RecordEncoder(schema)
    base = {"age": 38, "job": "clerk", "code": "1"}
    cases = [dict(base, **{name: value}) for name in ("age", "job", "code", "region") for value in VALUES]
    cases += [base, {k: v for k, v in base.items() if k != "code"}, dict(base, unknown=1), [base], "record", None]
    if HAS_IGNORED:
        cases += [dict(base, row_id=v) for v in VALUES]
    disagree = [c for c in cases if record_schema.is_valid(c) != accepted(encoder, c)]
    assert not disagree, disagree
    assert record_schema.is_valid(dict(base, age=1e6)), "a value outside the training range is accepted"
    assert record_schema.is_valid(dict(base, job="never seen")), "an unseen level is accepted"
    assert not record_schema.is_valid(dict(base, unknown=1))


def test_examples_fit_the_schema_they_illustrate():
    saved = {"positive": [{"age": 50, "job": "nurse", "code": "15", "region": "north", "stale": 1}], "negative": []}
    doc = openapi.document(ModelLike(small_schema(), saved=saved), max_batch=7)
    body = doc["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert [e["value"] for e in body["examples"].values()] == [{"age": 50, "job": "nurse", "code": "15",
                                                                "region": "north"}]  # "stale": no longer a field
    typical = openapi.document(ModelLike(small_schema()), max_batch=7)
    record = typical["components"]["schemas"]["Record"]
    assert record["examples"] == [{"age": 38.0, "job": "clerk", "code": "1"}]
    for d in (doc, typical):
        batch = d["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["application/json"]["examples"]
        assert all(validator(d, "BatchRequest").is_valid(e["value"]) for e in batch.values())
        assert all(validator(d, "Record").is_valid(r) for r in d["components"]["schemas"]["Record"]["examples"])


# -- over the trained model ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_trained_model_document_is_valid_and_takes_its_records(model, records):
    doc = openapi.document(model, max_batch=5000)
    validate(doc, cls=OpenAPIV31SpecValidator)
    assert doc["info"]["version"] == model.version and model.manifest["name"] in doc["info"]["title"]
    record = validator(doc, "Record")
    examples = [r for rs in model.examples().values() for r in rs]
    assert examples and all(record.is_valid(r) for r in examples)
    assert all(record.is_valid(r) for r in records[:300])
    assert not record.is_valid(records[0] | {"not_a_feature": 1})
    assert not record.is_valid({k: v for k, v in records[0].items() if k != model.schema.names[0]})
    properties = doc["components"]["schemas"]["Record"]["properties"]
    for f in model.schema.features:
        if f.kind == NUMERIC:
            assert (properties[f.name]["x-rareml-training-min"], properties[f.name]["x-rareml-training-max"]) == (
                f.min, f.max)
        else:
            assert properties[f.name]["anyOf"][0]["enum"] == list(f.categories)


@pytest.mark.slow
def test_document_follows_the_model(model):
    schema = model.schema
    first = next(f for f in schema.features if f.kind == CATEGORICAL)
    changed = dataclasses.replace(schema, features=tuple(
        dataclasses.replace(f, categories=f.categories[:-1]) if f is first else f for f in schema.features) + (
        Feature("hours_new", NUMERIC, min=0.0, max=99.0),), sensitive=(*schema.sensitive, "region_new"))
    other = dataclasses.replace(model, schema=changed, manifest=model.manifest | {"model_version": "feedfacecafe"})
    before, after = openapi.document(model, max_batch=5000), openapi.document(other, max_batch=5000)
    validate(after, cls=OpenAPIV31SpecValidator)
    props = [d["components"]["schemas"]["Record"]["properties"] for d in (before, after)]
    assert set(props[1]) - set(props[0]) == {"hours_new", "region_new"}
    assert props[1][first.name]["anyOf"][0]["enum"] == list(first.categories[:-1]) != props[0][first.name]["anyOf"][
        0]["enum"]
    assert after["components"]["schemas"]["Record"]["required"] == [*schema.names, "hours_new"]
    assert (before["info"]["version"], after["info"]["version"]) == (model.version, "feedfacecafe")
    record = validator(after, "Record")
    assert all(record.is_valid(r) for r in after["components"]["schemas"]["Record"]["examples"])
    assert not validator(after, "Record").is_valid(model.examples()["positive"][0])  # hours_new is required now


# -- the Blueprint on a bare app ----------------------------------------------------------------------------------

class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href", "data-openapi") and v]


@pytest.fixture
def docs_app():
    holder = {"doc": openapi.document(ModelLike(small_schema()), max_batch=7)}
    app = Flask("docs-test")
    app.register_blueprint(openapi.blueprint(lambda: holder["doc"]))
    return app, holder


def test_openapi_json_is_the_document_and_follows_a_swap(docs_app):
    app, holder = docs_app
    client = app.test_client()
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.get_json() == holder["doc"]
    assert client.get("/openapi.json", headers={"If-None-Match": response.headers["ETag"]}).status_code == 304
    holder["doc"] = openapi.document(ModelLike(small_schema(), version="feedfacecafe"), max_batch=7)
    swapped = client.get("/openapi.json", headers={"If-None-Match": response.headers["ETag"]})
    assert swapped.status_code == 200 and swapped.get_json()["info"]["version"] == "feedfacecafe"


def test_docs_page_uses_only_local_assets(docs_app):
    client = docs_app[0].test_client()
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    assert not re.search(r"(https?:)?//", text), "the page names another host"
    links = Links()
    links.feed(text)
    assert {"/openapi.json", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/init.js"} <= set(links.urls)
    for url in links.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, url
        response = client.get(url)
        assert response.status_code == 200 and response.content_length != 0, url
    assert client.get("/docs/swagger-ui-bundle.js").mimetype == "text/javascript"
    csp = page.headers["Content-Security-Policy"]
    assert "connect-src 'self'" in csp and "script-src 'self';" in csp and not re.search(r"https?:|\*", csp)
    version = (openapi.assets_dir() / "VERSION").read_text().strip()
    assert int(version.lstrip("v").split(".")[0]) >= 5, f"Swagger UI {version} cannot show OpenAPI 3.1"


@pytest.mark.parametrize("path", ["/docs/VERSION", "/docs/swagger-ui.js", "/docs/../flask_swagger_ui.py",
                                  "/docs/%2e%2e%2fflask_swagger_ui.py", "/docs/..%2F..%2Fopenapi.py",
                                  "/docs/dist/swagger-ui.css", "/docs/index.template.html"])
def test_docs_serves_no_file_beyond_its_list(docs_app, path):
    assert docs_app[0].test_client().get(path).status_code == 404


# -- the real app ----------------------------------------------------------------------------------------------

def documented(doc: dict, path: str, method: str, status: int, mimetype: str) -> dict:
    """The schema the document gives for this answer (resolving a shared response)."""
    response = doc["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return response["content"][mimetype]["schema"]


@pytest.mark.slow
def test_the_api_answers_as_its_document_says(make_app, model):
    app = make_app(alert_token="sesame", max_batch=3)
    client = app.test_client()
    doc = client.get("/openapi.json").get_json()
    assert doc == json.loads(json.dumps(openapi.document(model, max_batch=3)))
    routes = {(r.rule, m.lower()) for r in app.url_map.iter_rules() if r.endpoint != "static" and "<" not in r.rule
              for m in r.methods - {"HEAD", "OPTIONS"}}
    assert routes == set(ENDPOINTS)
    record = model.examples()["positive"][0]
    token = {"Authorization": "Bearer sesame"}
    alert = {"version": "4", "status": "firing", "alerts": [{"status": "firing", "labels": {"alertname": "Drift"},
                                                             "startsAt": "2026-01-01T00:00:00Z"}]}
    calls = [("/predict", "post", {"json": record}), ("/predict?explain=true&top=3", "post", {"json": record}),
             ("/predict", "post", {"json": record | {"nope": 1}}), ("/predict", "post", {"data": "x"}),
             ("/predict", "post", {"data": "", "content_type": "application/json"}),
             ("/predict", "post", {"data": "{", "content_type": "application/json"}),
             ("/predict/batch", "post", {"json": {"records": [record, record]}}),
             ("/predict/batch", "post", {"json": {"columns": {k: [v] for k, v in record.items()}}}),
             ("/predict/batch", "post", {"json": {"records": [record] * 4}}),
             ("/feedback", "post", {"json": {"prediction_id": "0000000000000000-0", "label": 1}}),
             ("/feedback", "post", {"json": {"label": 1}}), ("/health", "get", {}), ("/ready", "get", {}),
             ("/model", "get", {}), ("/metrics", "get", {}), ("/alerts", "post", {"json": alert}),
             ("/alerts", "post", {"json": alert, "headers": token}), ("/alerts", "get", {"headers": token}),
             ("/alerts?limit=x", "get", {"headers": token}), ("/docs", "get", {})]
    first = client.post("/predict", json=record).get_json()
    calls += [("/feedback", "post", {"json": {"prediction_id": first["prediction_id"], "label": 1}})] * 2
    seen = set()
    for url, method, kwargs in calls:
        response = getattr(client, method)(url, **kwargs)
        path = url.split("?")[0]
        schema = documented(doc, path, method, response.status_code, response.mimetype)
        if response.mimetype == "application/json":
            answer = response.get_json()
            errors = list(jsonschema.Draft202012Validator(schema | {"components": doc["components"]}).iter_errors(
                answer))
            assert not errors, (url, response.status_code, answer, errors[0].message)
        seen.add(response.status_code)
    assert {200, 400, 401, 404, 409, 413, 415, 422} <= seen


# -- a real browser -------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.browser
def test_docs_render_in_chromium_from_this_host_alone(model):
    from werkzeug.serving import make_server

    doc = openapi.document(model, max_batch=5000)
    app = Flask("docs-browser")
    app.register_blueprint(openapi.blueprint(lambda: doc))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    origin = f"http://127.0.0.1:{server.server_port}"
    requested, problems = [], []
    try:
        with chromium_page(1300) as page:
            page.on("request", lambda r: requested.append(r.url))
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"{origin}/docs", wait_until="domcontentloaded")
            page.wait_for_selector(".swagger-ui .info .title", timeout=60000)
            title = page.inner_text(".swagger-ui .info .title")
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            page.click("#operations-predictions-predict .opblock-summary")
            page.wait_for_selector("#operations-predictions-predict .body-param__example, "
                                   "#operations-predictions-predict .highlight-code", timeout=20000)
            shown = page.inner_text("#operations-predictions-predict")
    finally:
        server.shutdown()
        thread.join(5)
    assert model.manifest["name"] in title and model.version in title and "3.1" in title
    assert sorted(paths) == sorted(p for p, _ in ENDPOINTS)
    assert all(f'"{name}"' in shown for name in model.schema.names[:3]), shown[:500]
    assert requested and all(u.startswith(origin + "/") for u in requested), requested
    assert not problems, problems
