# The two commands a newcomer needs: `make demo` and `make test`. Both create and use .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint kubernetes bench

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	# The stand-in's gRPC protos; --no-deps: the package requires `tensorflow`, which would land beside tensorflow-cpu.
	$(VENV)/bin/pip install --quiet --no-deps 'tensorflow-serving-api>=2.13,<2.22'
	# The test harness (operator/localcluster, neuron_modelgen, tfserving_standin) is not in the wheel: a path entry.
	$(VENV)/bin/python -c 'import site, pathlib; pathlib.Path(site.getsitepackages()[0], "neuronmodel-harness.pth").write_text(str(pathlib.Path("operator").resolve()) + "\n")'
	touch $(STAMP)

kubernetes:
	bash operator/localcluster/build-kubernetes.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) kubernetes lint
	$(VENV)/bin/pytest

demo: $(STAMP) kubernetes
	$(VENV)/bin/python -m localcluster.demo

bench: $(STAMP)
	$(VENV)/bin/python bench/rewrite_bench.py
