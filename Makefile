# VENV=path uses (or builds) another virtual environment; PYTHON=path/to/python skips the venv and runs with it.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?=
RUN := $(if $(PYTHON),$(PYTHON),$(BIN)/python)
DEPS := $(if $(PYTHON),,venv)

.PHONY: venv app scale test demo clean

# The venv is rebuilt only when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# The recognition page's optional dependencies (FastAPI, uvicorn): python app.py --help
app: venv
	$(BIN)/python -m pip install -q -r requirements-app.txt

# Retrieval at scale and serving, optional: faiss-cpu (predict.py --knn faiss), onnx and onnxruntime (export.py)
scale: venv
	$(BIN)/python -m pip install -q -r requirements-scale.txt

test: $(DEPS)
	$(RUN) -m pytest -q tests

# The whole pipeline on a synthetic GLDv2, CPU only: prints GAP classifier / retrieval / ensemble.
demo: $(DEPS)
	PYTHON=$(RUN) bash scripts/demo.sh demo_out

clean:
	rm -rf demo_out .pytest_cache
