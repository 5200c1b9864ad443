# Two commands do everything on a fresh machine: `make serve` and `make test`.
#
# Outside an active virtual environment, make creates one in .venv/ (from $(PYTHON), 3.10+) and
# installs into it, so nothing touches the system's Python (which PEP 668 distributions refuse to
# let pip change anyway). Inside an active one ($VIRTUAL_ENV), make installs there instead.
#
# TORCH pins the CPU build this project is tested with; on a CUDA host install your CUDA build of
# torch into the environment first and run `make serve TORCH=` (empty) to keep it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Installing is skipped while this stamp is newer than everything that decides what gets installed.
STAMP := $(VENV)/.ctc-serve-installed

.PHONY: install serve test bench demo-model demo-drafters

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

serve: install
	$(BIN)/ctc-serve $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_engine.py $(ARGS)

demo-model: install
	$(PY) models/build_demo_model.py $(ARGS)

# The demo model's drafters: self-distilled data, then the CTC drafter and the Medusa baseline with
# the same data and steps, then their acceptance on held-out prompts, alone and with prompt lookup
# (see BENCHMARKS.md).
DRAFT_WORK ?= models/.build/drafters
DRAFT_STEPS ?= 3000
demo-drafters: install
	$(BIN)/ctc-drafter distill --out $(DRAFT_WORK)/regen --regenerate --max-conversations 1500 --max-new-tokens 256 --batch-size 48
	$(BIN)/ctc-drafter distill --out $(DRAFT_WORK)/regen-perturbed --regenerate --perturb-numbers --skip-conversations 1500 \
		--max-conversations 2000 --max-new-tokens 256 --batch-size 48
	$(BIN)/ctc-drafter train --data $(DRAFT_WORK)/regen --data $(DRAFT_WORK)/regen-perturbed --out models/demo-llama-ctc \
		--layers 2 --steps $(DRAFT_STEPS) --weight-decay 0.3
	$(BIN)/ctc-drafter train --kind medusa --data $(DRAFT_WORK)/regen --data $(DRAFT_WORK)/regen-perturbed \
		--out models/demo-llama-medusa --steps $(DRAFT_STEPS) --weight-decay 0.3
	$(BIN)/ctc-drafter eval --drafter ngram --drafter models/demo-llama-ctc --drafter models/demo-llama-medusa \
		--drafter models/demo-llama-ctc+ngram --drafter models/demo-llama-medusa+ngram \
		--num-prompts 40 --max-tokens 192 --out $(DRAFT_WORK)/eval.json

# A longer schemathesis run than CI's (tests/test_api_fuzz.py), randomly seeded: all checks, positive
# and negative data, against a real ctc-serve on the demo model. FUZZ_EXAMPLES cases per operation and phase.
.PHONY: fuzz
FUZZ_EXAMPLES ?= 300
fuzz: install
	CTC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) CTC_FUZZ_SEED= CTC_FUZZ_TIMEOUT_S=7200 $(PY) -m pytest -s -q -p no:cacheprovider tests/test_api_fuzz.py
