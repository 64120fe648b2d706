# The two commands of the README. Both create .venv on first use and reinstall
# when setup.cfg or pyproject.toml change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/digits
CONFIG ?= configs/digits.py

.PHONY: demo test install clean

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

# CPU tests with 8 simulated devices (tests/conftest.py), two workers for two cores.
test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) workdirs
