# cellmask: every target installs what it needs (into .venv) by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cellmask-installed
# The competition data: ../shared/sartorius when it is there, else where `make data` puts it.
DATA_DIR ?= data/sartorius
DATA     ?= $(if $(wildcard ../shared/sartorius/train.csv),../shared/sartorius,$(DATA_DIR))
SYNTH    ?= data/synthetic
DEMO_REAL ?= runs/demo_real

.PHONY: ablation-real setup demo demo-real data demo-livecell ablation test test-numerics lint format bench synth clean \
	notebooks-clean wheels weights code-dataset push-datasets push push-train pull-runs pull-evaluation submit

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The whole method on a CPU in minutes: synthetic data -> 4 detector branches + the segmenter ->
# the ensemble (flip TTA, WBF) scored beside each branch alone, on synthetic and on real images
# -> submissions/submission.csv (checked).
demo: setup
	$(BIN)/cellmask demo

# The same on the real competition images (DATA: a Kaggle-layout root, default ../shared/sartorius
# when present): every branch, Soft Teacher (with DATA's train_semi_supervised/), the segmenter and
# the Cascade Mask R-CNN baseline at native scale (profile cpu), thresholds tuned on the val fold,
# everything scored on a held-out fold -> benchmarks/REAL.md (about an hour on 2 cores).
demo-real: setup
	@test -f "$(DATA)/train.csv" -a -d "$(DATA)/train" || { echo "make demo-real: no competition data at $(DATA) (looked for $(DATA)/train.csv and $(DATA)/train/); run make data, or pass DATA=DIR"; exit 2; }
	$(BIN)/cellmask demo --data $(DATA) --profile cpu --out runs/demo_real --report benchmarks/REAL.md

# Download and unpack the competition into DATA_DIR (default data/sartorius) with the kaggle CLI
# (.venv/bin/pip install kaggle, and accept the competition's rules on kaggle.com first).
data: setup
	$(KAGGLE) download-data --dir $(DATA_DIR)

# The same with the paper's two stages: every model but Soft Teacher pretrained on synthetic
# LIVECell images, then fine-tuned (about 1.6x the time of `make demo`; runs in runs/demo_livecell).
demo-livecell: setup
	$(BIN)/cellmask demo --livecell

# Paper Table 1's rows: the demo's runs (reused when trained with today's configs) + the Cascade
# Mask R-CNN baseline + LIVECell pretraining -> benchmarks/ABLATION.md and benchmarks/ablation/.
ablation: setup
	$(BIN)/cellmask demo --ablation

# The levers of the real track, each a variant of one make demo-real run (runs/demo_real, which it
# needs; DEMO_REAL=DIR for another) scored on the same held-out fold: synthetic-LIVECell pretraining, the paper's augmentations,
# half-size resize against native windows, Soft Teacher against its supervised twin (5 runs,
# about 40 min on 2 cores), and the class vote before WBF and tuned thresholds (inference only)
# -> benchmarks/REAL_LEVERS.md.
ablation-real: setup
	@test -f "$(DATA)/train.csv" -a -d "$(DATA)/train" || { echo "make ablation-real: no competition data at $(DATA) (looked for $(DATA)/train.csv and $(DATA)/train/); run make data, or pass DATA=DIR"; exit 2; }
	@test -f $(DEMO_REAL)/summary.json || { echo "make ablation-real: no make demo-real run in $(DEMO_REAL) (looked for $(DEMO_REAL)/summary.json); run make demo-real first"; exit 2; }
	$(BIN)/cellmask demo --ablation --data $(DATA) --profile cpu --from-runs $(DEMO_REAL) --out runs/levers_real --ablation-md benchmarks/REAL_LEVERS.md

# The whole suite, and beside it (on the core it leaves idle: most tests use one thread) the tests
# whose outcome rests on float kernels (marked `numerics`: trained models, autocast, interpolation)
# again under each of torch's kernel paths in CAPABILITIES that is not this CPU's own (the suite
# itself runs that one), so a kernel-path difference between CPUs shows on any machine.
test: setup
	@mkdir -p build; native=$$($(BIN)/python -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"); \
	others=""; for cap in $(CAPABILITIES); do [ "$$cap" = "$$native" ] || others="$$others $$cap"; done; \
	echo "== the suite on this CPU's $$native kernels; the numerics tests beside it under:$$others"; \
	$(MAKE) -s test-numerics CAPABILITIES="$$others" > build/numerics.log 2>&1 & npid=$$!; \
	$(BIN)/python -m pytest -q; status=$$?; \
	wait $$npid || status=1; cat build/numerics.log; exit $$status

# The `numerics` tests alone under torch's portable and AVX2 kernels, side by side, each with its
# own temporary folder and log (`make test` runs those that differ from the CPU's own).
CAPABILITIES ?= default avx2
test-numerics: setup
	@mkdir -p build; pids=""; \
	for cap in $(CAPABILITIES); do \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q -m numerics -p no:cacheprovider \
			--basetemp=build/pytest-numerics-$$cap > build/numerics-$$cap.log 2>&1 & pids="$$pids $$!"; \
	done; status=0; for pid in $$pids; do wait $$pid || status=1; done; \
	for cap in $(CAPABILITIES); do \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -c "import torch; print('== kernels:', torch.backends.cpu.get_cpu_capability())"; \
		cat build/numerics-$$cap.log; \
	done; exit $$status

# ruff, and the import floors of src/cellmask (pyproject.toml's [tool.importlinter]: no import
# from a lower floor to a higher one, no import circle).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/bench_metric.py

synth: setup
	$(BIN)/cellmask synth $(SYNTH)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info

# ---------------------------------------------------------------------------------------------
# Kaggle (README: "On Kaggle"). The work is in src/cellmask/kaggle (python -m cellmask.kaggle).
# DRY_RUN=1 prints every kaggle command with its real arguments instead of running it.
# The Kaggle user comes from KAGGLE_USERNAME or ~/.kaggle/kaggle.json, never from this repo.
KAGGLE := $(BIN)/python -m cellmask.kaggle $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run)
RUNS_FROM ?= runs/sartorius

# Strip outputs, execution counts and metadata from notebooks/*.ipynb (the tests require it).
notebooks-clean: setup
	$(KAGGLE) notebooks-clean

# datasets/cellmask-wheels: what Kaggle's image lacks (datasets/cellmask-wheels/base_image.json) + our wheel.
wheels: setup
	$(KAGGLE) wheels

# datasets/cellmask-weights: best.pt + config.yaml of each run, the segmenter, the tuned predict config.
# Default: every run under $(RUNS_FROM); or RUNS="runs/a runs/b" SEGMENTER=runs/seg PREDICT_CONFIG=file.
# Only finished runs (every planned epoch, status.json) are packed, unless ACCEPT_UNFINISHED=1.
weights: setup
	$(KAGGLE) weights --from $(RUNS_FROM) $(if $(RUNS),--runs $(RUNS)) $(if $(SEGMENTER),--segmenter $(SEGMENTER)) \
		$(if $(PREDICT_CONFIG),--predict-config $(PREDICT_CONFIG)) $(if $(filter 1 yes true,$(ACCEPT_UNFINISHED)),--accept-unfinished)

# datasets/cellmask-code: configs/, src/, notebooks/ (the kernels read their configs from it).
code-dataset: setup
	$(KAGGLE) code-dataset

# kaggle datasets version (create on first use) of the weights, wheels and code datasets
# (ONLY="cellmask-wheels cellmask-code": just those).
push-datasets: setup
	$(KAGGLE) push-datasets $(if $(MSG),--message "$(MSG)") $(if $(ONLY),--only $(ONLY))

# kaggle kernels push of the offline inference kernel (kernel-metadata.json, notebooks/07_inference.ipynb),
# once the datasets it attaches are ready (ACCELERATOR=NvidiaTeslaT4: kaggle kernels push --accelerator).
push: setup
	$(KAGGLE) push $(if $(ACCELERATOR),--accelerator $(ACCELERATOR))

# A training notebook as a kernel, once the datasets it attaches are live on Kaggle:
# make push-train NB=02_finetune_faster_rcnn_swin_t
# (01_pretrain_livecell: BRANCH=faster_rcnn_swin_t, required, pushes one branch's pretraining).
# EPOCHS, OVERRIDES (space-separated KEY=VALUE) go into the notebook's parameters; a session
# stops training before 11.5 h from its start with last.pt written, and
# RESUME_FROM=<you>/<slug>/<version> pushes a new version that attaches that version's output and
# continues its run from the next step (with the run's own config and epochs; EXTEND=1 EPOCHS=N
# for a longer schedule).
PUSH_TRAIN_USAGE := usage: make push-train NB=<notebook, e.g. 02_finetune_faster_rcnn_swin_t> [BRANCH=<config>, required for 01] [EPOCHS=N] [RESUME_FROM=<owner>/<kernel slug>/<version> [EXTEND=1]] [OVERRIDES="key=value ..."] [ACCELERATOR=NvidiaTeslaT4]
push-train: setup
	@test -n "$(NB)" || { echo "$(PUSH_TRAIN_USAGE)"; exit 2; }
	@case "$(NB)" in *01_pretrain_livecell*) test -n "$(BRANCH)" || { echo "make push-train: 01_pretrain_livecell pushes one branch per kernel: BRANCH is required"; echo "$(PUSH_TRAIN_USAGE)"; exit 2; };; esac
	$(KAGGLE) push-train $(NB) $(if $(BRANCH),--branch $(BRANCH)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
		$(if $(RESUME_FROM),--resume-from $(RESUME_FROM)) $(if $(OVERRIDES),--overrides $(OVERRIDES)) \
		$(if $(filter 1 yes true,$(EXTEND)),--extend) $(if $(ACCELERATOR),--accelerator $(ACCELERATOR))

# Download the training kernels' outputs (02-06) into runs/, for make weights: per run best.pt,
# config.yaml, metrics.csv and status.json only (not last.pt nor the epoch checkpoints).
pull-runs: setup
	$(KAGGLE) pull-runs

# Download 08's output (the ablation and evaluate/tune/tuned.predict.yaml) into runs/.
pull-evaluation: setup
	$(KAGGLE) pull-evaluation

# Push 07 once its datasets are ready, wait for that version's run to complete, submit its
# submission.csv (VERSION=N: submit that version; ACCELERATOR=..: as for make push).
submit: setup
	$(KAGGLE) submit $(if $(MSG),--message "$(MSG)") $(if $(VERSION),--version $(VERSION)) \
		$(if $(ACCELERATOR),--accelerator $(ACCELERATOR))
