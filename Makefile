# The two commands a newcomer runs: `make demo` and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test bench lint train-demo server deploy worker-cpu worker-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v apt-get >/dev/null && ! ldconfig -p | grep -q libusb-1.0.so.0 && \
		{ (apt-get update -qq && apt-get install -y -qq libusb-1.0-0) || \
		  echo "Open3D needs Debian's libusb-1.0-0: install it as root"; } || true
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pointvl fixture $(DEMO_DIR)/shapenet
	$(VENV)/bin/pointvl build --shapenet $(DEMO_DIR)/shapenet --out $(DEMO_DIR)/build

test: $(STAMP)
	$(PY) -m ruff check pointvl tasks flows tests
	$(PY) -m pytest -q -x tests

bench: $(STAMP)
	$(PY) -m pointvl.bench

lint: $(STAMP)
	$(PY) -m ruff check pointvl tasks flows tests
