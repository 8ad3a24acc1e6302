# Two commands matter: `make demo` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench mutate clean venv notebook

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,notebooks,celery,channels,prometheus]'
	command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
		|| echo "warning: redis-server could not be installed; the Celery tests will be skipped" >&2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m streams demo

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy

test: lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider

# Open the replay notebook (on RECORDING=path, default: the shipped demo recording).
notebook: $(STAMP)
	$(PY) -c "import notebook" 2>/dev/null || $(PY) -m pip install -q -e '.[jupyter]'
	FACILITATOR_RECORDING=$(RECORDING) $(VENV)/bin/jupyter notebook --ip 127.0.0.1 \
		$(if $(filter 0,$(shell id -u)),--allow-root) notebooks/replay_recorded_traffic.ipynb

bench: $(STAMP)
	$(PY) -m bench

# Mutation testing of operators/ and the outbox core (configured in pyproject.toml [tool.mutmut]); not
# part of `make test`. A fresh run every time (mutmut would keep stale verdicts after test changes), on
# 2 CPUs; mutmut's own output goes to mutants/mutmut-run.log. Prints one line per file, then the score.
mutate: $(STAMP)
	rm -rf mutants && mkdir mutants
	$(VENV)/bin/mutmut run --max-children 2 > mutants/mutmut-run.log 2>&1 \
		|| { tail -c 4000 mutants/mutmut-run.log; exit 1; }
	$(PY) tests/mutation/score.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants
