# `make demo` and `make test` are the two commands a newcomer needs (see README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_WS ?= demo-workspace

# Where this machine keeps a local torch build behind a pip constraint (/etc/xdg/pip),
# pin exactly that build so pip takes it from disk instead of downloading gigabytes.
# Everywhere else pip resolves torch normally from pyproject.toml.
LOCAL_TORCH := $(shell test -f /etc/xdg/pip/constraints.txt && grep -q 'torch<=2.14.1' /etc/xdg/pip/constraints.txt && echo "torch==2.14.1 torchvision==0.29.1")

.PHONY: install demo dashboard test test-all test-browser bench bench-smoke gpu-check browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(LOCAL_TORCH),$(BIN)/pip install -q $(LOCAL_TORCH))
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the browser tests: Debian's package, never a downloaded browser.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; browser tests will be skipped"; \
	  else echo "warning: chromium not found; browser tests will be skipped"; fi; }

demo: $(STAMP)
	$(BIN)/memaudit demo $(DEMO_WS) --open

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra -m ''

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --smoke

# Verify and measure every GPU path (under 8 minutes on one GPU; see benchmarks/gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info test-artifacts
