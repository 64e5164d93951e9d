# π-Tuning, end to end:  make all TARGET=snli-ve   (PROFILE=mini, SEED=0 by default)
# Every artifact is a file; make reruns only what is missing or older than what it is made from.
PROFILE   ?= mini
TARGET    ?= snli-ve
SEED      ?= 0
SEEDS     ?= 0 1 2
OVERRIDES ?=
CONFIG    := configs/$(PROFILE).yaml
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PIPELINE   = $(MAKE) --no-print-directory -f pipeline.mk PY=$(PY) CONFIG=$(CONFIG) TARGET=$(TARGET)

.PHONY: help all backbone experts embed interpolate evaluate seeds test bench clean

help:
	@echo "make all TARGET=snli-ve [PROFILE=mini SEED=0]     the whole pipeline; prints the results table"
	@echo "make backbone | experts | embed | interpolate | evaluate   one stage (and what it needs)"
	@echo "make seeds TARGET=snli-ve SEEDS='0 1 2'            the target side over several seeds (mean ± std)"
	@echo "make test | bench | clean                          OVERRIDES='key=value ...' reach every stage"

# the virtual environment, created on first use
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# the pipeline's file graph lives in pipeline.mk, read once the venv can parse the profile
all: $(STAMP)
	@$(PIPELINE) SEED=$(SEED) OVERRIDES="$(OVERRIDES)" evaluate show

backbone experts embed interpolate evaluate: $(STAMP)
	@$(PIPELINE) SEED=$(SEED) OVERRIDES="$(OVERRIDES)" $@

seeds: $(STAMP)
	@for s in $(SEEDS); do $(PIPELINE) SEED=$$s OVERRIDES="$(OVERRIDES)" evaluate || exit 1; done
	@$(PIPELINE) SEED=$(SEED) OVERRIDES="$(OVERRIDES)" show

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/merge_bench.py --threads 1
	$(PY) bench/step_bench.py

clean: $(STAMP)
	@$(PIPELINE) OVERRIDES="$(OVERRIDES)" clean
