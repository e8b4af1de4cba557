# Runners fragment (included by the main Makefile): a real standalone Flink
# cluster + Beam's Prism runner for tests/test_runners_smoke.py.
#   make runners-fetch   # cached: Beam Flink job server jar + Flink dist (.cache/flink), prism (.cache/prism)
#   make test-runners    # smoke pipeline on Flink and Prism vs FnApiRunner
# `make test` fetches them too (the Flink and Prism tests run in CI); SKIP_RUNNERS=1 opts out.

PRISM_VERSION ?= v2.77.0
PRISM_DIR     := .cache/prism
PRISM_BIN     := $(PRISM_DIR)/bin/prism
PRISM_STAMP   := $(PRISM_DIR)/.built-$(PRISM_VERSION)
# fetch.sh needs a python with pip for `pip download`; the venv's if it exists.
RUNNERS_PY     = $(if $(wildcard $(VENV_PY)),$(VENV_PY),python3)

.PHONY: runners-fetch flink-fetch prism-build test-runners

runners-fetch: flink-fetch prism-build

# fetch.sh is itself cached/idempotent: it only prints what it has when done before.
flink-fetch:
	PYTHON=$(RUNNERS_PY) bash tools/flink/fetch.sh

prism-build: $(PRISM_STAMP)

$(PRISM_STAMP):
	mkdir -p $(PRISM_DIR)/bin
	GOBIN=$(abspath $(PRISM_DIR)/bin) go install github.com/apache/beam/sdks/v2/go/cmd/prism@$(PRISM_VERSION)
	test -x $(PRISM_BIN)
	rm -f $(PRISM_DIR)/.built-* && touch $@
	@echo "prism $(PRISM_VERSION): $(PRISM_BIN)"

test-runners: $(STAMP) runners-fetch
	$(VENV_PY) -m pytest -q -s tests/test_runners_smoke.py tests/test_flink_pipelines.py

ifneq ($(SKIP_RUNNERS),1)
TEST_DEPS += runners-fetch
endif
