# Two commands do everything on a fresh machine: `make serve` and `make test`.
# TORCH pins the CPU build this project is tested with; on a CUDA host install your CUDA
# build of torch first and run `make serve TORCH=` (empty) to keep it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install serve test bench demo-model

install:
	$(if $(TORCH),$(PYTHON) -m pip install -q "$(TORCH)")
	$(PYTHON) -m pip install -q -e ".[test]"

serve: install
	ctc-serve $(ARGS)

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: install
	$(PYTHON) bench/bench_engine.py $(ARGS)

demo-model: install
	$(PYTHON) models/build_demo_model.py $(ARGS)
