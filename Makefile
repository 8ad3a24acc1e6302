# Two commands matter: `make demo` and `make test`. Each bootstraps .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean venv notebook

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
