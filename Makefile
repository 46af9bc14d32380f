# The two commands a newcomer runs: `make demo` and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-all bench bench-scale bench-review bench-exploits table3-mini lint train-demo eval-demo server deploy worker-cpu worker-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v apt-get >/dev/null && ! ldconfig -p | grep -q libusb-1.0.so.0 && \
		{ (apt-get update -qq && apt-get install -y -qq libusb-1.0-0) || \
		  echo "Open3D needs Debian's libusb-1.0-0: install it as root"; } || true
	@# Chromium lets the review test screenshot the paused run's page in the Prefect UI (skipped without it).
	@command -v apt-get >/dev/null && ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && \
		{ (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) || \
		  echo "chromium not installed: the UI screenshot test will be skipped"; } || true
	@# PostgreSQL: the operations tests run a production-like Prefect server on it (skipped without it).
	@command -v apt-get >/dev/null && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		{ (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql) || \
		  echo "postgresql not installed: the PostgreSQL operations tests will be skipped"; } || true
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	test -f $(DEMO_DIR)/shapenet/taxonomy.json || $(VENV)/bin/pointvl fixture $(DEMO_DIR)/shapenet
	$(VENV)/bin/pointvl build --shapenet $(DEMO_DIR)/shapenet --out $(DEMO_DIR)/build --config pointvl/configs/demo.yaml

# Two pytest-xdist workers, each with its own Prefect home (tests/conftest.py): much of the suite's time is
# waiting (servers starting, processes killed and resumed), which the other worker fills. The operations
# tests then run alone: their Prefect server's SQLite stalls for tens of seconds when another test takes
# both cores. The deployed-operations tests run on a PostgreSQL-backed server, as production does
# (tests/ops/conftest.py; skipped without Debian's postgresql, which `make setup` installs).
test: $(STAMP)
	$(PY) -m ruff check pointvl tasks flows prompts schemas benchmarks tests setup.py
	$(PY) -m pytest -q -x -n 2 -m "not slow" --ignore=tests/ops tests
	$(PY) -m pytest -q -x -m "not slow" tests/ops

# Also the slow end-to-end tests (e.g. a review left unanswered until its deadline).
test-all: $(STAMP)
	$(PY) -m pytest -q -x -n 2 --ignore=tests/ops tests
	$(PY) -m pytest -q -x tests/ops

bench: $(STAMP)
	$(PY) -m benchmarks.bench

# ~500 ShapeNet-like models (long-tailed face counts) with 1 and 2 workers; RSS at 48 vs 480 models.
bench-scale: $(STAMP)
	$(PY) -m benchmarks.bench_scale --models $(or $(MODELS),480)

# A deployed ~1,000-item build (64² renders) reviewed page by page through the API: form and sheet sizes per
# page, answer -> next page seconds, and the extrapolation to the paper's 12,347 items (benchmarks/bench_review.py).
bench-review: $(STAMP)
	$(PY) -m benchmarks.bench_review $(if $(VIEWS),--views $(VIEWS))

# What degenerate outputs earn under the training rewards and under `pointvl evaluate` (README "Can the rewards
# be gamed?"), on a built benchmark's shards (default: the demo's).
bench-exploits: $(STAMP)
	test -d $(or $(SHARDS),$(DEMO_DIR)/build/shards) || $(MAKE) demo
	$(PY) -m benchmarks.bench_exploits --shards $(or $(SHARDS),$(DEMO_DIR)/build/shards)

# A Table-3 miniature: the pipeline's own benchmark from the fixture shapes, the tiny policy SFT -> each
# variant, 3 seeds, held-out evaluation with intervals (benchmarks/table3_mini.py; resumes when re-run;
# 37 min on an idle 2-core CPU).
table3-mini: $(STAMP)
	$(PY) -m benchmarks.table3_mini --out $(or $(T3_DIR),table3_mini_out)

lint: $(STAMP)
	$(PY) -m ruff check pointvl tasks flows prompts schemas benchmarks tests setup.py

# SFT -> routed GRPO -> evaluate with the tiny CPU preset on the demo's shards (run `make demo` first).
train-demo: $(STAMP)
	test -d $(DEMO_DIR)/build/shards || $(MAKE) demo
	$(PY) -m pointvl.flows.train --shards $(DEMO_DIR)/build/shards --run $(DEMO_DIR)/train --preset tiny --variant grca_rpc

# The two reference rows on the demo's shards, no model needed: ground truth (upper bound) and the
# train split's per-category mean boxes (an honest baseline); prints the report (README "Evaluation").
EVAL_DIR := $(DEMO_DIR)/eval
eval-demo: $(STAMP)
	test -d $(DEMO_DIR)/build/shards || $(MAKE) demo
	$(VENV)/bin/pointvl predict --reference ground-truth --shards $(DEMO_DIR)/build/shards --out $(EVAL_DIR)/ground_truth.jsonl
	$(VENV)/bin/pointvl predict --reference mean-box --shards $(DEMO_DIR)/build/shards --out $(EVAL_DIR)/mean_box.jsonl
	$(VENV)/bin/pointvl report --shards $(DEMO_DIR)/build/shards --out $(EVAL_DIR)/report \
		--run "ground truth=$(EVAL_DIR)/ground_truth.jsonl" --run "mean box=$(EVAL_DIR)/mean_box.jsonl"

# Operations (README "Operations"): a Prefect server, the deployments of prefect.yaml, workers.
PREFECT := $(VENV)/bin/prefect
PREFECT_HOST ?= 127.0.0.1
PREFECT_PORT ?= 4200
GPU ?= 0
POINTVL_BUILD_CRON ?= 0 3 * * *
POINTVL_SHAPENET ?= $(CURDIR)/$(DEMO_DIR)/shapenet
POINTVL_OUT ?= $(CURDIR)/$(DEMO_DIR)/scheduled
POINTVL_TRAIN_PRESET ?= paper
server deploy worker-cpu worker-gpu: export PREFECT_API_URL ?= http://$(PREFECT_HOST):$(PREFECT_PORT)/api
deploy worker-cpu worker-gpu: export POINTVL_ROOT := $(CURDIR)
deploy: export POINTVL_BUILD_CRON := $(POINTVL_BUILD_CRON)
deploy: export POINTVL_SHAPENET := $(POINTVL_SHAPENET)
deploy: export POINTVL_OUT := $(POINTVL_OUT)
deploy: export POINTVL_TRAIN_PRESET := $(POINTVL_TRAIN_PRESET)

server: $(STAMP)
	PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED=events,flow_runs \
		$(PREFECT) server start --host $(PREFECT_HOST) --port $(PREFECT_PORT)

# The deployed builds hand off to training (POINTVL_TRAIN_PRESET): refused here, in one line naming the fix, when
# that training job could not start on this machine (e.g. its weights are absent), rather than failing every run.
deploy: $(STAMP)
	@$(PY) -m pointvl.cli preflight --deployments prefect.yaml
	$(PREFECT) work-pool create cpu --type process --overwrite
	$(PREFECT) work-pool create gpu --type process --overwrite
	$(PREFECT) --no-prompt deploy --all

# `exec`: make's SIGTERM reaches the worker itself (not a shell that dies and leaves it running). SIGINT at its
# default: Prefect's worker turns SIGTERM into SIGINT (prefect/utilities/processutils/__init__.py:596 at 3.8.8),
# which a worker started from a background job inherits ignored, and would then never stop. Beside the worker,
# `pointvl cancel-watch` ends runs that stay Cancelling after a server outage (README "Workers and
# cancellation"); it exits with the worker.
worker-cpu: $(STAMP)
	$(PY) -m pointvl.cli cancel-watch --pool cpu & \
	exec env --default-signal=INT PREFECT_LOGGING_EXTRA_LOGGERS=pointvl $(PREFECT) worker start --pool cpu

worker-gpu: $(STAMP)
	$(PY) -m pointvl.cli cancel-watch --pool gpu & \
	exec env --default-signal=INT CUDA_VISIBLE_DEVICES=$(GPU) PREFECT_LOGGING_EXTRA_LOGGERS=pointvl \
		$(PREFECT) worker start --pool gpu --work-queue gpu --limit 1 --name gpu-$(GPU)
