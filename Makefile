# beam-influence: `make demo`, `make test`, `make bench` each bootstrap .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py requirements/constraints.txt 2>/dev/null | sha1sum | cut -c1-12)
DEMO_OUT ?= demo_out

.PHONY: venv demo test test-fast test-slow bench clean

venv: $(STAMP)

$(STAMP): setup.py requirements/constraints.txt
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -q --upgrade pip
	$(VENV_PY) -m pip install -q -c requirements/constraints.txt -e '.[tf,dev]'
	rm -f $(VENV)/.installed-* && touch $@

-include mk/*.mk

demo: $(STAMP)
	$(VENV_PY) -m pipelines.demo --output $(DEMO_OUT)

# Two processes for everything but the real runners; the Flink/Prism tests share one cluster, serially.
test: $(STAMP) $(TEST_DEPS)
	$(VENV_PY) -m pytest -q -n 2 tests -m "not slow and not flink and not prism"
	$(VENV_PY) -m pytest -q tests -m "(flink or prism) and not slow"

test-slow: $(STAMP)
	$(VENV_PY) -m pytest -q tests -m slow

test-fast: $(STAMP)
	$(VENV_PY) -m pytest -q tests -m "not flink and not prism and not browser and not slow"

bench: $(STAMP)
	$(VENV_PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .cache $(DEMO_OUT) .pytest_cache
