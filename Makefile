# The two entry points a newcomer needs: `make demo` and `make test`.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv system-deps

$(BIN)/streamrec: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

venv: $(BIN)/streamrec

# Test-only system tools: kcat (independent Kafka client) and Prometheus.
# Java 17 and Maven are expected on the machine (the local Kafka broker is built from Maven jars).
system-deps:
	@command -v kcat >/dev/null && command -v promtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat prometheus >/dev/null; }

demo: venv
	$(BIN)/streamrec demo

test: venv system-deps
	$(BIN)/python -m pytest -q
