# VENV=path uses (or builds) another virtual environment; PYTHON=path/to/python skips the venv and runs with it.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?=
RUN := $(if $(PYTHON),$(PYTHON),$(BIN)/python)
DEPS := $(if $(PYTHON),,venv)
TEST_DEPS := $(if $(PYTHON),,$(VENV)/.installed-test)

.PHONY: venv app scale test demo clean

# The venv is rebuilt only when requirements.txt changes; the test dependencies are added when a requirements file changes.
$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# What the suite uses beyond training and inference (requirements-test.txt: the page, faiss, ONNX, pytest, Selenium)
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-app.txt requirements-scale.txt
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $@

# The recognition page's optional dependencies (FastAPI, uvicorn): python app.py --help
app: venv
	$(BIN)/python -m pip install -q -r requirements-app.txt

# Retrieval at scale and serving, optional: faiss-cpu (predict.py --knn faiss), onnx and onnxruntime (export.py)
scale: venv
	$(BIN)/python -m pip install -q -r requirements-scale.txt

# The whole suite, as CI runs it; the browser tests skip (named) where Chromium and chromedriver are missing.
# TEST_WORKERS processes share the tests (pytest-xdist; 2 by default: each builds its own session fixtures);
# TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: $(TEST_DEPS)
	$(RUN) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup tests

# The whole pipeline on a synthetic GLDv2, CPU only: prints GAP classifier / retrieval / ensemble.
demo: $(DEPS)
	PYTHON=$(RUN) bash scripts/demo.sh demo_out

clean:
	rm -rf demo_out .pytest_cache
