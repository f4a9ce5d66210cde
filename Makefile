# rareml task index: `make help` lists the targets. CI, the README and the GitHub workflow use these names.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/census_income_kdd.toml
ARTIFACTS ?= artifacts
BUDGET ?= 600
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 2
export MLFLOW_DISABLE_TELEMETRY ?= true
STAGE_ARGS = --config $(CONFIG) --artifacts $(ARTIFACTS)

.PHONY: help setup lint all prepare tune serialize report serve promote rollback retrain retrain-watch airflow-setup airflow airflow-stop gui space publish-space simulate monitor monitor-stop test benchmark bench-serve bench-loop peers mlflow-ui clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) ARTIFACTS=$(ARTIFACTS)"
	@echo "             BUDGET=$(BUDGET): seconds from prepare to a registered model; the search stops in time for the last stage"

setup: $(VENV)/.installed ## create .venv from requirements.txt (idempotent)

$(VENV)/.installed: requirements.txt
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' || { echo "error: $(PYTHON) is older than 3.11"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "error: cannot create a venv: on Debian, apt-get install python3-venv"; exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

lint: setup ## ruff over the whole repository (as the ci workflow runs it)
	$(VENV)/bin/ruff check .

all: setup ## the main job: prepare, tune, serialize within BUDGET seconds; ends by saying where everything is
	@start=$$(date +%s.%N); \
	$(MAKE) --no-print-directory prepare && \
	$(MAKE) --no-print-directory tune STARTED_AT=$$start && \
	$(MAKE) --no-print-directory serialize

prepare: setup ## 01: validate the data, infer the schema, hold out the test set
	$(PY) 01_prepare.py $(STAGE_ARGS)

tune: setup ## 02: Optuna search over XGBoost, each trial an MLflow child run (BUDGET: see below)
	$(PY) 02_tune.py $(STAGE_ARGS) --time-budget $(BUDGET) $(if $(STARTED_AT),--started-at $(STARTED_AT))

serialize: setup ## 03: refit, calibrate, threshold, evaluate, write $(ARTIFACTS)/model, register champion
	$(PY) 03_serialize.py $(STAGE_ARGS)

MONITORING ?= auto
report: setup ## 07: report.html/.pdf and slides.html/.pdf of the champion in ARTIFACTS/report (MONITORING=auto|run|reuse|skip)
	$(PY) 07_report.py --artifacts $(ARTIFACTS) --monitoring $(MONITORING) $(if $(MONITORING_SECONDS),--monitoring-seconds $(MONITORING_SECONDS))

serve: setup ## 04: the API under gunicorn on http://HOST:PORT (WORKERS processes); serves the champion
	$(PY) 04_serve.py --artifacts $(ARTIFACTS) --host $(HOST) --port $(PORT) --workers $(WORKERS)

VERSION ?=
promote: setup ## the challenger (or VERSION=...) becomes the champion; the old one the alias previous
	$(PY) 03_serialize.py --config $(CONFIG) --artifacts $(ARTIFACTS) --promote $(VERSION)

rollback: setup ## the previous champion serves again (champion and previous swap)
	$(PY) 03_serialize.py --config $(CONFIG) --artifacts $(ARTIFACTS) --rollback

RETRAIN_BUDGET ?=
RETRAIN_ARGS = --config $(CONFIG) --artifacts $(ARTIFACTS) $(if $(RETRAIN_BUDGET),--budget $(RETRAIN_BUDGET))
retrain: setup ## 06: one retraining on the labelled production rows (RETRAIN_BUDGET s, default the config's); promoted only if the gate passes
	$(PY) 06_retrain.py $(RETRAIN_ARGS)

retrain-watch: setup ## 06 --watch: retrain on each retrain="true" alert the API queues (one at a time, cooldown)
	$(PY) 06_retrain.py $(RETRAIN_ARGS) --watch

AIRFLOW_PORT ?= 18080
$(VENV)/.airflow-installed: $(VENV)/.installed requirements-airflow.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-airflow.txt
	@touch $@

airflow-setup: setup $(VENV)/.airflow-installed ## install Apache Airflow 3 into .venv (requirements-airflow.txt; not in the API image)

airflow: airflow-setup ## Airflow on http://127.0.0.1:AIRFLOW_PORT (18080): DAGs rareml_train, rareml_retrain unpaused; prints the login
	$(PY) orchestration/airflow_stack.py start --port $(AIRFLOW_PORT)

airflow-stop: ## stop what make airflow started (by PID)
	$(PY) orchestration/airflow_stack.py stop

gui: PORT = 7860
gui: setup ## the Gradio GUI on http://127.0.0.1:PORT (7860), over ARTIFACTS/model (RAREML_API_URL: score via the API)
	$(PY) app.py --artifacts $(ARTIFACTS) --port $(PORT)

SPACE_DIR ?= space
space: setup ## write the Hugging Face Space folder SPACE_DIR (app, model, pinned requirements, front matter)
	$(PY) -m rareml.space --artifacts $(ARTIFACTS) --out $(SPACE_DIR)

publish-space: space ## upload SPACE_DIR to the Space SPACE_REPO=user/name (token from HF_TOKEN)
	@test -n "$(SPACE_REPO)" || { echo "error: set SPACE_REPO=user/name"; exit 2; }
	$(PY) -m rareml.space --out $(SPACE_DIR) --publish $(SPACE_REPO)

URL ?= http://127.0.0.1:8000
SCENARIO ?= none
RATE ?= 20
DURATION ?= 60
simulate: setup ## 05: replay ARTIFACTS rows to the API at URL (SCENARIO none|real|covariate|label|concept, RATE per second, DURATION seconds)
	$(PY) 05_simulate.py --url $(URL) --artifacts $(ARTIFACTS) --scenario $(SCENARIO) --rate $(RATE) --seconds $(DURATION)

monitor: setup ## Prometheus (19090) and Alertmanager (19093) on this machine over the API at URL (needs RAREML_ALERT_TOKEN)
	$(PY) monitoring/stack.py start --api $(patsubst http://%,%,$(URL))

monitor-stop: ## stop what make monitor started (by PID)
	$(PY) monitoring/stack.py stop

test: setup airflow-setup ## the test suite (unit, data, model, api, integration tiers; Airflow's DAGs included)
	$(PY) -m pytest $(PYTEST_ARGS)

benchmark: setup ## time and memory per stage on the default dataset (within BUDGET seconds)
	$(PY) benchmarks/pipeline.py --config $(CONFIG) --budget $(BUDGET)

bench-serve: setup ## API speed: /predict vs /health, /predict/batch vs raw XGBoost (installs wrk)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=300 wrk >/dev/null; }
	$(PY) benchmarks/serve.py --artifacts $(ARTIFACTS) --workers $(WORKERS)

bench-loop: setup ## the closed loop timed on ARTIFACTS: drift onset to the new champion serving (needs Prometheus)
	$(PY) benchmarks/loop.py --artifacts $(ARTIFACTS) --config $(CONFIG) $(if $(RETRAIN_BUDGET),--budget $(RETRAIN_BUDGET))

DATASET ?= credit_data
SPLIT ?= 0
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: benchmarks/requirements-peers.txt
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0  # first: the CPU build
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -r benchmarks/requirements-peers.txt
	@touch $@

peers: setup $(BENCH_VENV)/.installed ## rareml vs FLAML, AutoGluon and baselines at equal BUDGET on DATASET
	$(BENCH_VENV)/bin/python benchmarks/peers.py --dataset $(DATASET) --budget $(BUDGET) --split-seed $(SPLIT)

mlflow-ui: setup ## browse the MLflow runs on http://127.0.0.1:5000 (the training runs: the link below)
	@echo "training runs: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	MLFLOW_ALLOW_FILE_STORE=true $(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-mlruns} --host 127.0.0.1 --port 5000

clean: ## remove artifacts, MLflow runs and the Space folder (keeps .venv)
	rm -rf $(ARTIFACTS) mlruns $(SPACE_DIR)
