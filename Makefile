# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
export KEDRO_DISABLE_TELEMETRY := 1

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_RAW := data/01_raw/rsna-demo
DEMO_DONE := $(DEMO_RAW)/demo_data.json
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast install dicom-tools pacs-tools lint demo-data clean-demo gpu-wheels mlflow-ui viz screenshots

demo: $(INSTALLED) $(DEMO_DONE)  ## create .venv, generate the demo dataset if absent, run every pipeline on it
	$(BIN)/kedro run --env demo

# Two workers, each taking a whole module (--dist loadfile): a module's fixtures (its demo
# run, the Ray cluster) are built once. 17 min in one process here, 13-15.5 with two
# (tests/README.md); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(INSTALLED) dicom-tools pacs-tools  ## create/update .venv and run the test suite
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: $(INSTALLED)  ## the quick loop: everything but the tests marked slow (about 80 s)
	$(BIN)/pytest -m "not slow" -q

install: $(INSTALLED)

# Debian's dicom3tools: its dciodvfy validates the DICOM Structured Reports in the tests.
# Installed with apt-get where it may be (root, or sudo); elsewhere the tests say what is missing.
dicom-tools:
	@command -v dciodvfy >/dev/null || command -v apt-get >/dev/null || exit 0; \
	command -v dciodvfy >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dicom3tools >/dev/null; } || \
		echo "warning: could not install dicom3tools (dciodvfy); its SR validation test is skipped"

# Debian's Orthanc with its DICOMweb plugin and web viewer: the real PACS the PACS tests start
# on 127.0.0.1 (tests/orthanc.py). Installed like dicom3tools; elsewhere those tests say what is
# missing and skip.
pacs-tools:
	@command -v Orthanc >/dev/null && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || \
	command -v apt-get >/dev/null || exit 0; \
	command -v Orthanc >/dev/null && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install \
		-y -qq orthanc orthanc-dicomweb orthanc-webviewer >/dev/null; } || \
		echo "warning: could not install orthanc, orthanc-dicomweb; the PACS tests are skipped"

# Reinstalls only when pyproject.toml changes (torch is never downloaded again).
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	touch $@

demo-data: $(DEMO_DONE)

# The demo_data pipeline writes demo_data.json after everything else: a generation stopped
# part-way here leaves none (it is removed first), one stopped in a `kedro run --pipelines
# demo_data` leaves label CSVs newer than it; both rerun. A changed generator or its settings
# regenerate from an empty folder.
$(DEMO_DONE): conf/base/parameters_demo_data.yml $(wildcard src/pneumonia_kedro/demo/*.py) \
		$(wildcard $(DEMO_RAW)/stage_2_*.csv) | $(INSTALLED)
	rm -rf $(DEMO_RAW)/stage_2_* $(DEMO_RAW)/.complete $@
	$(BIN)/kedro run --env demo --pipelines demo_data

mlflow-ui: $(INSTALLED)  ## the MLflow UI on http://127.0.0.1:5000 (PORT=... for another port)
	$(BIN)/python -m pneumonia_kedro.ui mlflow $(if $(PORT),--port $(PORT))

viz: $(INSTALLED)  ## kedro-viz of the demo environment on http://127.0.0.1:4141 (PORT=..., FOLDS=3)
	$(BIN)/python -m pneumonia_kedro.ui viz $(if $(PORT),--port $(PORT)) $(if $(FOLDS),--folds $(FOLDS))

# README screenshots, regenerated from the local MLflow store and the current pipelines, and a
# delivered overlay in a temporary Orthanc's web viewer (ONLY=orthanc: that picture alone);
# Debian's chromium and Orthanc's web viewer are installed first when missing (root, or sudo).
screenshots: $(INSTALLED) pacs-tools
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)
	[ -e /usr/share/orthanc/plugins/libOrthancWebViewer.so ] || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq orthanc-webviewer)
	$(BIN)/python docs/screenshots.py $(if $(ONLY),--only $(ONLY))

lint: $(INSTALLED)
	$(BIN)/ruff check .

clean-demo:  ## remove the generated demo dataset and every demo output
	rm -rf $(DEMO_RAW) data/0[2-8]_*/demo

# Wheels that benchmarks/gpu_check.sh installs on a GPU machine that has only PyTorch.
gpu-wheels: $(INSTALLED)
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 -d benchmarks/wheels pydicom==3.0.2
