# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint install clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The dashboard's browser tests (tests/test_dashboard.py) drive Debian's chromium and
# chromium-driver. Installed here when missing and we are root with apt-get; otherwise
# those tests skip, saying why.
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
APT_LOG := /tmp/evomerge-apt-chromium.log

browser:
	@if [ -x "$(CHROMIUM)" ] && [ -x "$(CHROMEDRIVER)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver for the dashboard's browser tests (log: $(APT_LOG))"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver; } >$(APT_LOG) 2>&1 \
		|| { tail -n 5 $(APT_LOG); echo "WARNING: chromium could not be installed: the dashboard's browser tests will be SKIPPED"; }; \
	else \
		echo "WARNING: no $(CHROMIUM) / $(CHROMEDRIVER), and no root with apt-get to install them:"; \
		echo "WARNING: the dashboard's browser tests will be SKIPPED (apt-get install chromium chromium-driver)"; \
	fi

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/ruff check .
	HF_HUB_OFFLINE=1 EVOMERGE_CHROMIUM=$(CHROMIUM) EVOMERGE_CHROMEDRIVER=$(CHROMEDRIVER) $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/evomerge demo

clean:
	rm -rf $(VENV) build *.egg-info
