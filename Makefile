# One-command entry points. `make train` sets up and trains; `make test` sets up and tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PRESET ?= fast
# These machines reach no website: use the local CIFAR-10 copy beside the project when present.
SHARED_CIFAR := $(abspath ../shared/cifar10/cifar-10-batches-py)
export CIFAR10_SOURCE ?= $(if $(wildcard $(SHARED_CIFAR)/test_batch),$(SHARED_CIFAR),)
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The project's BentoML store (models, bentos) lives beside mlflow.db, not in ~/bentoml.
export BENTOML_HOME ?= $(CURDIR)/bentoml

SEEDS ?= 3
EPOCH_SCALE ?= 1
DATA_SCALE ?= 1
STUDY ?= report-lr

.PHONY: setup run sweep stack team-stack worker train test checks unit-tests test-e2e test-all docs-tables bench bench-flow bench-serve bench-team mlflow-ui import-champion monitor rollback serve bento clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: setup  ## the main job: local Prefect stack, one run of train-cifar/default, stack stopped
	$(PY) -m stacks run --deployment default $(if $(filter-out fast,$(PRESET)),-p preset=$(PRESET),)

sweep: setup  ## a study through the local stack: make sweep STUDY=report-lr SEEDS=3 EPOCH_SCALE=0.2
	$(PY) -m stacks run --deployment sweep-cifar/default -p study=$(STUDY) -p seeds=$(SEEDS) \
	  -p epoch_scale=$(EPOCH_SCALE) -p data_scale=$(DATA_SCALE)

stack: setup  ## Prefect server + pools (gpu, control) + workers + deployments; Ctrl-C stops
	$(PY) -m stacks up

team-stack: setup  ## PostgreSQL + Prefect server + MLflow tracking server (auth on) + pools; Ctrl-C stops
	$(PY) -m stacks team $(ARGS)

JOIN ?= .team/team.env
worker: setup  ## join a team stack as a GPU host: make worker JOIN=team.env [ARGS="--gpus 2"]
	$(PY) -m stacks worker --join $(JOIN) $(ARGS)

mlflow-ui: setup  ## the MLflow UI on the default store, http://127.0.0.1:5000
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the runs view, not GenAI)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000 --workers 1

import-champion: setup  ## copy the MLflow champion into the BentoML store (no-op if it is there)
	$(VENV)/bin/cifar-import-champion

HOURS ?= 1
monitor: setup  ## test the champion's answers of the last HOURS for drift (docs/monitoring.md)
	$(PY) -m flows.monitor --hours $(HOURS)

REASON ?=
TO ?=
rollback: setup  ## champion back to the one it replaced: make rollback REASON="why" [TO=5]
	$(VENV)/bin/cifar-rollback --reason "$(REASON)" $(if $(TO),--to $(TO),)

serve: import-champion  ## serve the champion: curl -F image=@cat.png http://127.0.0.1:3000/classify
	$(VENV)/bin/bentoml serve serving.service:CifarClassifier --host 127.0.0.1 --port 3000

bento: import-champion  ## build the Bento (offline) from bentofile.yaml; `bentoml containerize` it where Docker runs
	$(VENV)/bin/bentoml build

train: setup  ## train PRESET (default: fast) on the real data, print the results
	$(VENV)/bin/cifar-train --preset $(PRESET)

test: setup  ## the fast tier (minutes): lint, format, types, import contracts, unit and in-process tests
	@$(MAKE) --no-print-directory -j2 --output-sync=target checks unit-tests

checks:  # the static checks (one core) beside the tests (the other)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

unit-tests:
	$(PY) -m pytest -q -m "not e2e"

test-e2e: setup  ## the real servers (Prefect, MLflow, bentoml serve), PostgreSQL, Chromium, the fault tests
	$(PY) -m pytest -q -m e2e

test-all: test test-e2e  ## both tiers, as CI runs them

docs-tables: setup  ## regenerate the tables of docs/benchmarks.md from benchmarks/results/*.json
	$(PY) benchmarks/make_tables.py

bench-flow: setup  ## fixed cost of orchestration + tracking around training -> benchmarks/results
	$(PY) benchmarks/flow_overhead.py

bench-serve: setup  ## HTTP load test of the service vs in-process inference -> benchmarks/results
	$(PY) benchmarks/serve_bench.py

bench-team: setup  ## one sweep on 1 and on 2 worker hosts; tracking cost, SQLite vs server
	$(PY) benchmarks/team_scaling.py

bench: setup  ## training speed and accuracy of the presets on the real data -> benchmarks/results
	$(PY) benchmarks/train_presets.py --presets fast-cpu-quick seed-baseline fast-cpu --report-tta flip_translate --out benchmarks/results/train-cpu-flops.json

clean:
	rm -rf runs splits data benchmarks/.work .pytest_cache
