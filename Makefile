# π-Tuning, end to end:  make all TARGET=snli-ve   (PROFILE=mini, SEED=0 by default)
# Every artifact is a file; make reruns only what is missing or older than what it is made from.
PROFILE   ?= mini
TARGET    ?= snli-ve
SEED      ?= 0
SEEDS     ?= 0 1 2
OVERRIDES ?=
REPORT_SHOTS   ?= 32 64
REPORT_SEEDS   ?= 0 1 2 3 4
TRANSFER_SHOTS ?= 64
JOBS           ?= 2
CONFIG    := configs/$(PROFILE).yaml
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PIPELINE   = $(MAKE) --no-print-directory -f pipeline.mk PY=$(PY) CONFIG=$(CONFIG) TARGET=$(TARGET)

.PHONY: help all backbone experts embed interpolate evaluate seeds report study loto compare check test test-fast test-slow bench clean prune
PROFILES = $(filter-out paper_tasks,$(basename $(notdir $(wildcard configs/*.yaml))))

help:
	@echo "make all TARGET=snli-ve [PROFILE=mini SEED=0]     the whole pipeline; prints the results table"
	@echo "make backbone | experts | embed | interpolate | evaluate   one stage (and what it needs)"
	@echo "make seeds TARGET=snli-ve SEEDS='0 1 2'            the target side over several seeds (mean ± std)"
	@echo "make report TARGET=snli-ve                        every baseline over REPORT_SHOTS x REPORT_SEEDS,"
	@echo "                                                   the transfer matrix, runs/<profile>/report.md + plots"
	@echo "make study TARGETS='snli-ve shape nli'            the report's study for each target, one config, every"
	@echo "                                                   embedding; runs/<profile>/study.md + study/"
	@echo "make loto                                          every pool task as the target in turn, the rest its"
	@echo "                                                   pool; runs/<profile>/loto.md"
	@echo "make compare TARGET=snli-ve AGAINST='k=v ...'     this config's results against another's, seed by seed"
	@echo "make prune                                         delete the artifacts this config would not make"
	@echo "make clean                                         delete runs/<profile>/ entirely, the backbone too"
	@echo "make test | test-fast | test-slow | bench          OVERRIDES='key=value ...' reach every stage"
	@echo "profiles (PROFILE=, configs/<profile>.yaml): $(PROFILES)"

# the virtual environment, created on first use, with the exact versions of constraints.txt. pip's own
# bytecode pass compiles all of torch and transformers (about a minute here); instead the modules the stages
# and tests use are compiled by importing them once (about 20 s), the rest when first imported
WARM := import torch, torch.distributed.run, torchvision, peft, accelerate, matplotlib.pyplot, pyarrow.parquet, pytest, xdist, filelock, psutil; \
        import transformers as t; t.Florence2ForConditionalGeneration, t.T5ForConditionalGeneration; \
        import train_expert, embed_tasks, interpolate, evaluate, common.report, common.readers
$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -r requirements.txt -c constraints.txt
	PYTHONDONTWRITEBYTECODE= $(PY) -c "$(WARM)"
	touch $@

# PROFILE=rehearsal: its checkpoint and data files, generated offline (common/rehearsal.py) before anything reads them
REHEARSAL_ASSETS ?= runs/rehearsal-assets
ASSETS := $(if $(filter rehearsal,$(PROFILE)),$(REHEARSAL_ASSETS))
$(REHEARSAL_ASSETS): common/rehearsal.py common/world.py | $(STAMP)
	$(PY) -m common.rehearsal $@

# the pipeline's file graph lives in pipeline.mk, made by the code (common/provenance.py); every config error stops
# in one line before the first stage (`check`: common/checks.py)
CHECK = $(PY) -m common.checks $(CONFIG) $(OVERRIDES) --targets
check: $(STAMP) $(ASSETS)
	@$(CHECK) $(TARGET)

all: $(STAMP) $(ASSETS)
	@$(CHECK) $(TARGET)
	+@$(PIPELINE) SEED=$(SEED) OVERRIDES="$(OVERRIDES)" show

backbone experts embed interpolate evaluate: $(STAMP) $(ASSETS)
	@$(CHECK) $(TARGET)
	+@$(PIPELINE) SEED=$(SEED) OVERRIDES="$(OVERRIDES)" $@

seeds: $(STAMP) $(ASSETS)
	@$(CHECK) $(TARGET)
	+@for s in $(SEEDS); do $(PIPELINE) SEED=$$s OVERRIDES="$(OVERRIDES)" evaluate || exit 1; done
	+@$(PIPELINE) SEED=$(SEED) OVERRIDES="$(OVERRIDES)" show

# the study: the backbone on every core, the pool experts, then every shots x seed pipeline, JOBS stages
# at a time across all of them (one torch thread each; make's job server), then the report
# the transfer rows first: the costliest pipelines start early, so the last one to finish is a short one
STUDY_SHOTS = $(filter $(TRANSFER_SHOTS),$(REPORT_SHOTS)) $(filter-out $(TRANSFER_SHOTS),$(REPORT_SHOTS))
STUDY_RUNS = $(foreach t,$(1),$(foreach s,$(STUDY_SHOTS),$(foreach r,$(REPORT_SEEDS),of/$(t)/$(s)/$(r))))
report: $(STAMP) $(ASSETS)
	@$(CHECK) $(TARGET) --shots "$(REPORT_SHOTS)"
	+@$(PIPELINE) SEED=$(SEED) OVERRIDES="$(OVERRIDES)" backbone
	+@$(PIPELINE) -j$(JOBS) SEED=$(SEED) OVERRIDES="threads=1 $(OVERRIDES)" experts
	+@$(MAKE) --no-print-directory -j$(JOBS) $(call STUDY_RUNS,$(TARGET))
	$(PY) evaluate.py --report --target $(TARGET) --config $(CONFIG) $(OVERRIDES)

# one target / shots / seed pipeline of the study, with its baselines (and the transfer row at TRANSFER_SHOTS)
of/%: $(STAMP)
	+@set -- $(subst /, ,$*); $(MAKE) --no-print-directory -f pipeline.mk PY=$(PY) CONFIG=$(CONFIG) TARGET=$$1 \
	  SEED=$$3 STUDY=report TRANSFER_ROW=$(if $(filter $(word 2,$(subst /, ,$*)),$(TRANSFER_SHOTS)),1,0) \
	  EMBED_AS="$(EMBED_AS)" OVERRIDES="tasks.target_shots=$$2 threads=1 $(OVERRIDES)" evaluate

# the study over several targets, one config for all: every pool expert, then each target's shots x seed
# pipelines (as make report runs them, with every embedding of common/embeddings.py), then one study report
# shape, not colour, is the vision target: colour sits at its ceiling, where no expert can add (docs/study.md)
TARGETS  ?= snli-ve shape nli
EMBED_AS ?= default
study: $(STAMP) $(ASSETS)
	@$(CHECK) $(TARGETS) --shots "$(REPORT_SHOTS)"
	+@$(PIPELINE) SEED=$(SEED) OVERRIDES="$(OVERRIDES)" backbone
	+@$(PIPELINE) -j$(JOBS) SEED=$(SEED) OVERRIDES="threads=1 $(OVERRIDES)" pool-experts
	+@$(MAKE) --no-print-directory -j$(JOBS) $(call STUDY_RUNS,$(TARGETS)) EMBED_AS=all
	$(PY) evaluate.py --study $(TARGETS) --config $(CONFIG) $(OVERRIDES)

# every task of the pool as the target in turn, the others its pool (leave one target out): π-Tuning as configured,
# random-k, the paper's Fisher retrieval and the retrieval chosen on validation, over REPORT_SHOTS x REPORT_SEEDS,
# without the transfer rows, the untrained merges and the validation scores (selection keeps its own); then
# runs/<profile>/loto.md. The shots outermost: the most shots first, for every target
LOTO_TARGETS ?= $(shell $(PY) -m common.checks $(CONFIG) $(OVERRIDES) --pool-targets)
LOTO_RUNS = $(foreach s,$(REPORT_SHOTS),$(foreach t,$(1),$(foreach r,$(REPORT_SEEDS),loto/$(t)/$(s)/$(r))))
LOTO_EVAL = evaluate.merges=false evaluate.validation=false
loto: $(STAMP) $(ASSETS)
	@$(CHECK) $(LOTO_TARGETS) --shots "$(REPORT_SHOTS)"
	+@$(PIPELINE) SEED=$(SEED) OVERRIDES="$(OVERRIDES)" backbone
	+@$(PIPELINE) -j$(JOBS) SEED=$(SEED) OVERRIDES="threads=1 $(OVERRIDES)" pool-experts
	+@$(MAKE) --no-print-directory -j$(JOBS) $(call LOTO_RUNS,$(LOTO_TARGETS))
	$(PY) evaluate.py --loto $(LOTO_TARGETS) --config $(CONFIG) $(LOTO_EVAL) $(OVERRIDES)

loto/%: $(STAMP)
	+@set -- $(subst /, ,$*); $(MAKE) --no-print-directory -f pipeline.mk PY=$(PY) CONFIG=$(CONFIG) TARGET=$$1 \
	  SEED=$$3 STUDY=loto OVERRIDES="tasks.target_shots=$$2 threads=1 $(LOTO_EVAL) $(OVERRIDES)" evaluate

# this config's results for TARGET against another's (AGAINST: the overrides that make it), on the seeds both ran
AGAINST ?=
compare: $(STAMP) $(ASSETS)
	$(PY) evaluate.py --compare "$(AGAINST)" --target $(TARGET) --config $(CONFIG) $(OVERRIDES)

# one pytest worker per core (pytest-xdist), one torch thread each; a worker that runs out of tests takes
# half of the other's queue (worksteal), so neither sits idle at the end
# make test: all but the `slow` group (minutes each: the rehearsal end to end, single- and two-process), which
# make test-slow runs; CI runs both
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m ruff format --check . && $(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal -m "not slow" tests

# the tests that run no stage (seconds): config, merge, metrics, report, registries, readers
test-fast: $(STAMP)
	$(PY) -m ruff format --check . && $(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_JOBS) -m "not slow and not pipeline" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

bench: $(STAMP)
	$(PY) bench/merge_bench.py --threads 1
	$(PY) bench/step_bench.py

# prune: the artifacts of runs/<profile>/ that this config would not make (other configs', older code's);
# clean: the whole of runs/<profile>/, the backbone included
prune: $(STAMP)
	$(PY) -m common.provenance $(CONFIG) $(OVERRIDES) --prune

clean: $(STAMP)
	@d=$$($(PY) -m common.provenance $(CONFIG) $(OVERRIDES) --get run_dir) && echo "removing $$d (every artifact of \
	profile $(PROFILE), the backbone too)" && rm -rf "$$d"
