# The two commands of the README. Both create .venv on first use and reinstall
# when setup.cfg or pyproject.toml change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/digits
CONFIG ?= configs/digits.py

.PHONY: demo test install clean browser

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Prepare the bundled digits, train, sample 1000 images (100 per class), evaluate.
demo: $(STAMP)
	@start=$$(date +%s); \
	$(PY) -m arjax train --config=$(CONFIG) --workdir=$(WORKDIR) && \
	$(PY) -m arjax sample --config=$(CONFIG) --workdir=$(WORKDIR) && \
	$(PY) -m arjax eval --config=$(CONFIG) --workdir=$(WORKDIR) && \
	echo "demo: $$(( $$(date +%s) - start )) s for data preparation, training, sampling and evaluation"

# The demo page's browser test (tests/test_serve.py) runs in Debian's headless Chromium.
# Installed here where we can (root with apt-get); never fails the build: without them that
# one test is skipped, saying why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "make test: chromium/chromedriver are missing and we are not root: the demo page's browser test will be skipped (sudo apt-get install chromium chromium-driver)"; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "make test: chromium/chromedriver are missing and there is no apt-get: the demo page's browser test will be skipped"; \
	else \
	  echo "make test: installing chromium and chromium-driver for the demo page's browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
	    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; } \
	    || echo "make test: could not install chromium/chromium-driver with apt-get (see above): the demo page's browser test will be skipped"; \
	fi

# CPU tests with 8 simulated devices (tests/conftest.py), two workers for two cores. Tests
# sharing one server process (tests/test_serve.py) stay on one worker (xdist_group).
test: $(STAMP) browser
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15 tests

clean:
	rm -rf $(VENV) workdirs
