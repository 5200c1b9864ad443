# Two commands do everything on a fresh machine: `make serve` and `make test`.
# TORCH pins the CPU build this project is tested with; on a CUDA host install your CUDA
# build of torch first and run `make serve TORCH=` (empty) to keep it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install serve test bench demo-model demo-drafters

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

# The demo model's drafters: self-distilled data, then the CTC drafter and the Medusa baseline with
# the same data and steps, then their acceptance on held-out prompts, alone and with prompt lookup
# (see BENCHMARKS.md).
DRAFT_WORK ?= models/.build/drafters
DRAFT_STEPS ?= 3000
demo-drafters: install
	ctc-drafter distill --out $(DRAFT_WORK)/regen --regenerate --max-conversations 1500 --max-new-tokens 256 --batch-size 48
	ctc-drafter distill --out $(DRAFT_WORK)/regen-perturbed --regenerate --perturb-numbers --skip-conversations 1500 \
		--max-conversations 2000 --max-new-tokens 256 --batch-size 48
	ctc-drafter train --data $(DRAFT_WORK)/regen --data $(DRAFT_WORK)/regen-perturbed --out models/demo-llama-ctc \
		--layers 2 --steps $(DRAFT_STEPS) --weight-decay 0.3
	ctc-drafter train --kind medusa --data $(DRAFT_WORK)/regen --data $(DRAFT_WORK)/regen-perturbed \
		--out models/demo-llama-medusa --steps $(DRAFT_STEPS) --weight-decay 0.3
	ctc-drafter eval --drafter ngram --drafter models/demo-llama-ctc --drafter models/demo-llama-medusa \
		--drafter models/demo-llama-ctc+ngram --drafter models/demo-llama-medusa+ngram \
		--num-prompts 40 --max-tokens 192 --out $(DRAFT_WORK)/eval.json
