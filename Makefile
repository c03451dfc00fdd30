# Every target with a "## " comment is listed by `make help`.
PYTHON ?= python3
# make slurm-up: compute nodes in partition multi, each in a network namespace (scripts/slurm-up.sh)
NODES ?= 3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install demo sweep-demo test test-fast test-all lint format summary bench gpu-check gpu-carry gpu-rehearsal faults faults-quick table mlflow-ui mlflow-server optuna-dashboard \
	slurm-up slurm-down postgres-up postgres-down site clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F '\t' '{printf "  make %-12s %s\n", $$1, $$2}'

# Reinstalls only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project (editable) with dev tools

demo: install ## Train the demo run: synthetic shapes, tiny model, CPU, offline, a few minutes
	$(PY) launch.py experiment=demo

sweep-demo: install ## What the latent learns at demo size: noise schedule x target view x 2 seeds, 8 trials 2 at a time, on this CPU (sweeps/learning_study.yaml)
	$(PY) launch.py -m sweep=learning_study experiment=demo hydra/launcher=local sweep.n_jobs=2

test: install ## The suite but the fault campaigns, heavy, slow and GPU tests (CPU; needs make slurm-up, postgres-up)
	$(PY) -m pytest -m "not slow and not cuda and not system and not heavy" --durations=15

# The fast tier: unit tests, the docs' commands and one smoke run; no real processes, no services.
FAST := not slow and not cuda and not integration and not system and not slurm and not postgres

test-fast: install ## Unit tests, the docs' commands, one smoke run (CPU; no SLURM or PostgreSQL)
	$(PY) -m pytest -m "$(FAST)"

test-all: install ## Run every test, slow ones included
	$(PY) -m pytest

lint: install ## Check style with ruff (lint and formatting)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install ## Reformat the code with ruff
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

summary: install ## Print parameters and training FLOPs of the reference model
	$(PY) -m soda.models.summary

bench: install ## Throughput, fast path vs a straightforward one, side by side (CPU: small sizes, ~4 min; GPU: CIFAR-10 reference)
	$(PY) bench/throughput.py

gpu-check: ## CUDA tests, throughput, a time-boxed CIFAR-10 run (GPU: all stages in 570 s of budgets, or two calls, docs/performance.md; CPU: smoke size) [ARGS=]
	bash bench/gpu-check.sh $(ARGS)

gpu-carry: install ## Pack .carry/ for a GPU machine without a registry: wheels for its Python 3.12, the CIFAR-10 archive
	$(PY) bench/gpu_carry.py

gpu-rehearsal: install ## The two device calls of gpu-check here: the device's torch 2.11, carried wheels, no .git, no network (~2 min) [ARGS=]
	$(PY) bench/gpu_rehearsal.py $(ARGS)

faults: install ## Fault campaign (kills, SLURM requeues, a crowd of trials, failing trials, bad inputs) and the heavy tests (needs slurm-up, postgres-up)
	$(PY) -m pytest -m "(system or heavy) and not cuda" -v --durations=15

faults-quick: install ## The fault campaign's quick part and the heavy tests, as CI runs them after make test (no slow tests; needs slurm-up, postgres-up)
	$(PY) -m pytest -m "(system or heavy) and not slow and not cuda" -v --durations=15

# The store and experiment `make table` reads (default: $SODA_TRACKING_URI, else $MLFLOW_TRACKING_URI, else the embedded store, every
# experiment), e.g. make table TRACKING_URI=http://127.0.0.1:5000 EXPERIMENT=soda
# The embedded stores' paths below match soda.tracking's defaults, where runs launched from this folder
# write: mlflow.db and optuna-journal.log in $SODA_STORE_DIR, else the working directory (the repository root).
STORE_DIR := $(abspath $(or $(SODA_STORE_DIR),$(CURDIR)))
TRACKING_URI ?= $(or $(SODA_TRACKING_URI),$(MLFLOW_TRACKING_URI),sqlite:///$(STORE_DIR)/mlflow.db)
EXPERIMENT ?=

table: install ## Regenerate README.md's results (tables, docs/results/*.png) from MLflow and docs/performance.md's figures from bench/results/*.json [TRACKING_URI= EXPERIMENT=]
	$(PY) -m analysis bench
	$(PY) -m analysis readme --tracking-uri '$(TRACKING_URI)' $(if $(EXPERIMENT),--experiment '$(EXPERIMENT)')

mlflow-ui: install ## Browse the runs in the embedded store (http://127.0.0.1:5000)
	$(VENV)/bin/mlflow ui --backend-store-uri 'sqlite:///$(STORE_DIR)/mlflow.db'

mlflow-server: install ## MLflow server on the local PostgreSQL (make postgres-up first), http://127.0.0.1:5000
	bash scripts/mlflow-server.sh

optuna-dashboard: install ## Watch the sweeps of the default Optuna storage (http://127.0.0.1:8080)
	$(VENV)/bin/optuna-dashboard '$(or $(SODA_SWEEP_STORAGE),$(STORE_DIR)/optuna-journal.log)'

slurm-up: ## Install (if needed) and start the SLURM test cluster: this machine's node and NODES (3) namespaced nodes (root) [NODES=n]
	NODES=$(NODES) bash scripts/slurm-up.sh

slurm-down: ## Stop the SLURM test cluster and remove its nodes' namespaces
	bash scripts/slurm-up.sh down

postgres-up: ## Install (if needed) and start a local PostgreSQL on 127.0.0.1:5433 with databases mlflow, optuna
	bash scripts/postgres-up.sh

postgres-down: ## Stop the local PostgreSQL
	bash scripts/postgres-up.sh down

# The site profile launches read after conf/ (every run on this machine or cluster shares it):
# written from sbatch, scontrol and sacctmgr's answers and the environment, commented, for you to complete.
site: install ## Write this machine's site profile, conf/site/default.yaml, from SLURM and the environment [SITE=path FORCE=1]
	$(PY) -m launching.site_init $(if $(SITE),--output '$(SITE)') $(if $(filter 1 yes true,$(FORCE)),--force)

clean: ## Remove caches (keeps .venv)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
