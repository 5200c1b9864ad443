# Two commands do everything on a fresh machine: `make serve` and `make test`.
#
# Outside an active virtual environment, make creates one in .venv/ (from $(PYTHON), 3.11: the
# lock's) and installs into it, so nothing touches the system's Python (which PEP 668 distributions
# refuse to let pip change anyway). Inside an active one ($VIRTUAL_ENV), make installs there instead.
#
# What gets installed is what CI tests: requirements.lock (exact versions with their hashes, checked
# by pip) for every dependency except torch, then torch at the version in requirements-torch.txt,
# then the project itself without dependencies, then `pip check`. torch is outside the hashed lock
# because its CPU build (this machine's and CI's) and its CUDA builds (the Docker image) are
# different files with different hashes; pinning its version pins its CUDA libraries too (its CUDA
# builds require exact versions of them). On a CUDA host, install your CUDA build of that torch
# into the environment first and run `make serve TORCH=` (empty) to keep it.
PYTHON ?= python3
TORCH_PIN := $(shell grep -m1 '^torch==' requirements-torch.txt)
TORCH ?= $(TORCH_PIN)
PYTEST_ARGS ?=
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Installing is skipped while this stamp is newer than everything that decides what gets installed.
STAMP := $(VENV)/.ctc-serve-installed

.PHONY: install lock serve test bench demo-model demo-drafters

install: $(STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ctc-serve needs Python 3.11+ (what CI tests and requirements.lock is resolved for); this is " + sys.version.split()[0] + ": run make with PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) requirements.lock requirements-torch.txt pyproject.toml Makefile
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

# Regenerate requirements.lock after changing pyproject.toml or requirements-torch.txt, resolved
# together with the pinned torch for CI's and the image's platform (CPython 3.11, x86_64 Linux).
# Pins already in the lock are kept where they still fit; `make lock LOCK_ARGS=--upgrade` moves
# everything to the newest versions. uv (pinned, in its own .venv-lock/) resolves; awk then drops
# torch and the CUDA libraries that only torch's CUDA builds pull in (nvidia-*, cuda-*), see above.
LOCK_PYTHON ?= 3.11
LOCK_ARGS ?=
UV := .venv-lock/bin/uv
$(UV):
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q uv==0.13.9

lock: $(UV)
	if [ -f requirements.lock ]; then cp requirements.lock requirements.lock.tmp; fi  # uv keeps the pins it finds there
	$(UV) pip compile --system-certs $(LOCK_ARGS) pyproject.toml --extra test --constraint requirements-torch.txt --generate-hashes \
		--python-version $(LOCK_PYTHON) --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
		--quiet --output-file requirements.lock.tmp
	{ echo "# Everything CI tests except torch, at exact versions with their hashes ($(TORCH_PIN), requirements-torch.txt,"; \
	  echo "# was part of the resolution). torch and its CUDA-only dependencies are left out: see the Makefile."; \
	  awk '/^[^ #]/ { skip = /^(torch==|nvidia-|cuda-)/ } !skip' requirements.lock.tmp; } > requirements.lock
	rm requirements.lock.tmp

serve: install
	$(BIN)/ctc-serve $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_engine.py $(ARGS)

demo-model: install
	$(PY) models/build_demo_model.py $(ARGS)

# The demo model's drafters: self-distilled data, then the CTC drafter (CTC_STEPS steps on the first
# 5,500 conversations, then CTC_MORE_STEPS more from those weights at a lower learning rate, with
# 2,500 more conversations, then CTC_MORE_STEPS more at half that rate, then CTC_MORE_STEPS more at
# that rate with the training split's last 2,043 conversations added) and the Medusa baseline,
# then their acceptance on held-out prompts, alone and with prompt lookup (see BENCHMARKS.md).
DRAFT_WORK ?= models/.build/drafters
DRAFT_STEPS ?= 3000
CTC_STEPS ?= 5000
CTC_MORE_STEPS ?= 2500
# Every CTC stage: the first three self-distilled sets (later stages add theirs) and one recipe.
CTC_DATA = --data $(DRAFT_WORK)/regen --data $(DRAFT_WORK)/regen-perturbed --data $(DRAFT_WORK)/regen-perturbed2
CTC_RECIPE = --layers 1 --frame-inputs anchored --anchors 96 --weight-decay 0.3
demo-drafters: install
	$(BIN)/ctc-drafter distill --out $(DRAFT_WORK)/regen --regenerate --max-conversations 1500 --max-new-tokens 256 --batch-size 48
	$(BIN)/ctc-drafter distill --out $(DRAFT_WORK)/regen-perturbed --regenerate --perturb-numbers --skip-conversations 1500 \
		--max-conversations 2000 --max-new-tokens 256 --batch-size 48
	$(BIN)/ctc-drafter distill --out $(DRAFT_WORK)/regen-perturbed2 --regenerate --perturb-numbers --skip-conversations 3500 \
		--max-conversations 2000 --max-new-tokens 256 --batch-size 48
	$(BIN)/ctc-drafter distill --out $(DRAFT_WORK)/regen-perturbed3 --regenerate --perturb-numbers --skip-conversations 5500 \
		--max-conversations 2500 --max-new-tokens 256 --batch-size 48
	$(BIN)/ctc-drafter distill --out $(DRAFT_WORK)/regen-perturbed4 --regenerate --perturb-numbers --skip-conversations 8000 \
		--max-conversations 2500 --max-new-tokens 256 --batch-size 48
	$(BIN)/ctc-drafter train $(CTC_DATA) --out $(DRAFT_WORK)/ctc-5000 $(CTC_RECIPE) --steps $(CTC_STEPS)
	$(BIN)/ctc-drafter train $(CTC_DATA) --data $(DRAFT_WORK)/regen-perturbed3 --init $(DRAFT_WORK)/ctc-5000 \
		--out $(DRAFT_WORK)/ctc-7500 $(CTC_RECIPE) --steps $(CTC_MORE_STEPS) --lr 5e-4
	$(BIN)/ctc-drafter train $(CTC_DATA) --data $(DRAFT_WORK)/regen-perturbed3 --init $(DRAFT_WORK)/ctc-7500 \
		--out $(DRAFT_WORK)/ctc-10000 $(CTC_RECIPE) --steps $(CTC_MORE_STEPS) --lr 2.5e-4
	$(BIN)/ctc-drafter train $(CTC_DATA) --data $(DRAFT_WORK)/regen-perturbed3 --data $(DRAFT_WORK)/regen-perturbed4 \
		--init $(DRAFT_WORK)/ctc-10000 --out models/demo-llama-ctc $(CTC_RECIPE) --steps $(CTC_MORE_STEPS) --lr 2.5e-4
	$(BIN)/ctc-drafter train --kind medusa --data $(DRAFT_WORK)/regen --data $(DRAFT_WORK)/regen-perturbed \
		--out models/demo-llama-medusa --steps $(DRAFT_STEPS) --weight-decay 0.3
	$(BIN)/ctc-drafter eval --drafter ngram --drafter models/demo-llama-ctc --drafter models/demo-llama-medusa \
		--drafter models/demo-llama-ctc+ngram --drafter models/demo-llama-medusa+ngram \
		--num-prompts 40 --max-tokens 192 --out $(DRAFT_WORK)/eval.json

# The one GPU check (issue 14; bench/gpu_check.py): kernel parity in bf16, batch-1 decode against the
# bandwidth limit and transformers, verify cost eager and with CUDA graphs, speculative vs plain on the
# demo model; one results file under bench/results/, under 8 minutes. On a CUDA host keep its torch:
# `make gpu-check TORCH=`. `make gpu-check GPU_CHECK_ARGS="--smoke --device cpu"`: tiny shapes on the CPU.
.PHONY: gpu-check
GPU_CHECK_ARGS ?=
gpu-check: install
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

# The CTC-drafter paper's comparison on the demo model (issue 17, bench/paper_table.py): every drafter
# kind alone and with prompt lookup, acceptance length and batch-1 speedup on MT-bench (both turns,
# per category) and GSM8K. Drafters already under models/ are loaded; a missing one is trained:
# the 1,500-step ones by their recipe below, the others for PAPER_STEPS steps of PAPER_BATCH
# conversations on PAPER_CONVERSATIONS self-distilled ones (the recipe of the two shorter
# EAGLE-style drafters; Medusa and CTC shipped longer, see BENCHMARKS.md). PAPER_ARGS go to the
# table script (e.g. --gsm8k 20 --max-tokens 128; --smoke for a seconds-long plumbing check).
PAPER_WORK ?= models/.build/paper
PAPER_CONVERSATIONS ?= 600
PAPER_STEPS ?= 80
PAPER_BATCH ?= 4
PAPER_ARGS ?=
PAPER_TRAIN = $(BIN)/ctc-drafter train --data $(PAPER_WORK)/regen --steps $(PAPER_STEPS) --conversations-per-step $(PAPER_BATCH)
PAPER_DRAFTERS = models/demo-llama-medusa models/demo-llama-hydra models/demo-llama-eagle models/demo-llama-eagle-ctc \
	models/demo-llama-eagle-ctc-long models/demo-llama-ctc models/demo-llama-ctc-1500
.PHONY: paper-table
paper-table: install $(addsuffix /model.safetensors,$(PAPER_DRAFTERS))
	$(PY) -m bench.paper_table $(PAPER_ARGS)

$(PAPER_WORK)/regen/meta.json:
	$(BIN)/ctc-drafter distill --out $(PAPER_WORK)/regen --regenerate --max-conversations $(PAPER_CONVERSATIONS) \
		--max-new-tokens 256 --batch-size 48
# The data is made inside each recipe, not as a prerequisite: a shipped drafter is never retrained
# because its data is newer or absent, and a fresh clone does not distill data nobody needs.
models/demo-llama-eagle/model.safetensors:
	$(MAKE) $(PAPER_WORK)/regen/meta.json
	$(PAPER_TRAIN) --kind eagle --out models/demo-llama-eagle
models/demo-llama-eagle-ctc/model.safetensors:
	$(MAKE) $(PAPER_WORK)/regen/meta.json
	$(PAPER_TRAIN) --kind eagle --ctc-weight 0.01 --out models/demo-llama-eagle-ctc
# The equal-budget drafters (BENCHMARKS.md, "A longer EAGLE-style training" and "Equal budget"): the
# first 1,500 self-distilled conversations of `make demo-drafters`, 1,500 steps of 8, seed 0, for
# the EAGLE-style drafter (CTC weight 0.01), Hydra and the parallel CTC drafter alike (about 30-45
# minutes each on two cores; the CTC drafter with anchored frames and 96 anchors per conversation,
# the recipe that drew level with Hydra).
$(DRAFT_WORK)/regen/meta.json:
	$(BIN)/ctc-drafter distill --out $(DRAFT_WORK)/regen --regenerate --max-conversations 1500 --max-new-tokens 256 --batch-size 48
EQUAL_TRAIN = $(BIN)/ctc-drafter train --data $(DRAFT_WORK)/regen --steps 1500 --conversations-per-step 8 --seed 0
models/demo-llama-eagle-ctc-long/model.safetensors:
	$(MAKE) $(DRAFT_WORK)/regen/meta.json
	$(EQUAL_TRAIN) --kind eagle --ctc-weight 0.01 --out models/demo-llama-eagle-ctc-long
models/demo-llama-hydra/model.safetensors:
	$(MAKE) $(DRAFT_WORK)/regen/meta.json
	$(EQUAL_TRAIN) --kind hydra --out models/demo-llama-hydra
models/demo-llama-ctc-1500/model.safetensors:
	$(MAKE) $(DRAFT_WORK)/regen/meta.json
	$(EQUAL_TRAIN) --kind ctc --layers 2 --frame-inputs anchored --anchors 96 --out models/demo-llama-ctc-1500
models/demo-llama-medusa/model.safetensors:
	$(MAKE) $(PAPER_WORK)/regen/meta.json
	$(PAPER_TRAIN) --kind medusa --out models/demo-llama-medusa
models/demo-llama-ctc/model.safetensors:
	$(MAKE) $(PAPER_WORK)/regen/meta.json
	$(PAPER_TRAIN) --kind ctc --layers 1 --frame-inputs anchored --anchors 96 --out models/demo-llama-ctc

# The CTC-weight study (issue 17, point 2; bench/ctc_weight_study.py, BENCHMARKS.md): the EAGLE-style
# drafter at CTC weights STUDY_EAGLE_WEIGHTS (STUDY_STEPS steps) and the parallel CTC drafter alone and
# with the frame->label cross-entropy at STUDY_CTC_AUX_WEIGHTS (STUDY_CTC_STEPS steps), every row on the
# same STUDY_CONVERSATIONS self-distilled conversations, STUDY_BATCH per step, seed 0; then acceptance on
# STUDY_PROMPTS held-out GSM8K prompts. Finished steps are skipped (a rerun resumes); an empty weight
# list skips its family. Table: $(STUDY_WORK)/table.md. STUDY_ARGS go to the script (--smoke: a minute).
STUDY_WORK ?= models/.build/study
STUDY_CONVERSATIONS ?= 600
STUDY_STEPS ?= 600
STUDY_CTC_STEPS ?= 600
STUDY_BATCH ?= 4
STUDY_PROMPTS ?= 20
STUDY_MAX_TOKENS ?= 128
STUDY_EAGLE_WEIGHTS ?= 0 0.001 0.01 0.1
STUDY_CTC_AUX_WEIGHTS ?= 0 0.1 0.5 1.0
STUDY_ARGS ?=
.PHONY: ctc-weight-study
ctc-weight-study: install
	$(PY) -m bench.ctc_weight_study --work $(STUDY_WORK) --conversations $(STUDY_CONVERSATIONS) \
		--steps $(STUDY_STEPS) --ctc-steps $(STUDY_CTC_STEPS) --batch $(STUDY_BATCH) \
		--num-prompts $(STUDY_PROMPTS) --max-tokens $(STUDY_MAX_TOKENS) \
		--eagle-weights $(STUDY_EAGLE_WEIGHTS) --ctc-aux-weights $(STUDY_CTC_AUX_WEIGHTS) $(STUDY_ARGS)

# A longer schemathesis run than CI's (tests/test_api_fuzz.py), randomly seeded: all checks, positive
# and negative data, against a real ctc-serve on the demo model. FUZZ_EXAMPLES cases per operation and phase.
.PHONY: fuzz
FUZZ_EXAMPLES ?= 300
fuzz: install
	CTC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) CTC_FUZZ_SEED= CTC_FUZZ_TIMEOUT_S=7200 $(PY) -m pytest -s -q -p no:cacheprovider tests/test_api_fuzz.py

# Offline checks of the Kubernetes manifests (docker/k8s/), with tools pinned in their own .venv-tools/
# (checkov pulls in far more than the project needs): kubernetes-validate checks every resource
# against the bundled schemas of the oldest and newest Kubernetes we target, strictly (unknown
# fields fail), and fails on any warning too (a misspelt kind is only a warning to it). The
# ServiceMonitor is left out: a CRD, not in those schemas (tests/test_k8s_manifests.py checks its
# fields against the Service). Then checkov's Kubernetes policies; the few skipped are annotated
# with their reasons in the manifests.
.PHONY: k8s-check
TOOLS := .venv-tools
K8S_VERSIONS ?= 1.30.0 1.37.0
K8S_SCHEMA_FILES := $(filter-out docker/k8s/kustomization.yaml docker/k8s/servicemonitor.yaml,$(wildcard docker/k8s/*.yaml))
$(TOOLS)/.installed: Makefile
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q kubernetes-validate==1.37.0 checkov==3.3.30
	touch $@

k8s-check: $(TOOLS)/.installed
	for v in $(K8S_VERSIONS); do \
	  out=$$($(TOOLS)/bin/kubernetes-validate --strict --quiet -k $$v $(K8S_SCHEMA_FILES) 2>&1); rc=$$?; \
	  echo "kubernetes-validate $$v: $${out:-all valid}"; [ $$rc -eq 0 ] && [ -z "$$out" ] || exit 1; \
	done
	$(TOOLS)/bin/checkov --directory docker/k8s --framework kubernetes --skip-download --compact --quiet
