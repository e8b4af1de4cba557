# Headless Chromium for the browser tests (tests/test_report_browser.py, pytest marker `browser`).
# Included by the main Makefile (`-include mk/*.mk`); `make test` depends on $(TEST_DEPS).
# Debian's package: `playwright install` and other browser downloads cannot work offline, apt can.

BROWSER := /usr/bin/chromium
BROWSER_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BROWSER):
	@command -v apt-get >/dev/null || { echo "$(BROWSER) is missing and apt-get is not available: install Chromium by hand, or run 'make test-fast' (skips browser tests)" >&2; exit 1; }
	$(BROWSER_SUDO) apt-get update -qq
	$(BROWSER_SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
	@test -x $(BROWSER) && $(BROWSER) --version

TEST_DEPS += $(BROWSER)
