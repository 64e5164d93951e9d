# The pipeline's file graph, from the code: `python -m common.provenance ... --rules` prints it for one target,
# shots and seed, every path carrying the digest of what it is made from (common/provenance.py), so a changed
# config makes new paths and keeps the old artifacts, and nothing but files is tracked (make -n writes nothing).
# Called from Makefile with PY, CONFIG, TARGET, SEED, OVERRIDES (and STUDY=report|loto, TRANSFER_ROW, EMBED_AS).
ARGS     := --config $(CONFIG) seed=$(SEED) $(OVERRIDES)
# every stage command: $(PY) SCRIPT, after LAUNCH (LAUNCH="srun --gres=gpu:1"), and with GPUS="0 1 2 3" on one
# GPU of the list that no other job holds (common/gpus.py: a lock per GPU; make -j4 experts runs four at once).
# LAUNCH="torchrun ..." or "accelerate launch ...": data parallel inside each stage, with the venv's launcher
# (torchrun on one host, --standalone, unless its arguments say how to meet: --nnodes, --rdzv-*, --master-*)
LAUNCH    ?=
GPUS      ?=
GPU_LOCKS ?= /tmp/pi-tuning-gpus
LAUNCHER  := $(word 1,$(LAUNCH))
ifeq ($(LAUNCHER),torchrun)
TR_ARGS   := $(wordlist 2,$(words $(LAUNCH)),$(LAUNCH))
TR_MEET   := $(if $(filter --standalone --nnodes% --rdzv% --master%,$(TR_ARGS)),,--standalone )
LAUNCH_PY := $(PY) -m torch.distributed.run $(TR_MEET)$(TR_ARGS)
else ifeq ($(LAUNCHER) $(word 2,$(LAUNCH)),accelerate launch)
LAUNCH_PY := $(PY) -m accelerate.commands.launch $(wordlist 3,$(words $(LAUNCH)),$(LAUNCH))
else
LAUNCH_PY := $(LAUNCH) $(PY)
endif
STAGE_CMD := $(if $(strip $(GPUS)),$(PY) -m common.gpus --locks $(GPU_LOCKS) "$(GPUS)" )$(LAUNCH_PY)
EMBED_AS  ?= default

define NL


endef
RULES := $(shell $(PY) -m common.provenance $(CONFIG) $(OVERRIDES) --rules $(TARGET) $(SEED) $(if $(STUDY),--study $(STUDY)) \
           $(if $(filter 1,$(TRANSFER_ROW)),--transfer-row) --embed-as "$(EMBED_AS)" || echo ERROR)
ifneq ($(filter ERROR,$(RULES)),)
$(error $(CONFIG) could not be read; see the line above)
endif
$(eval $(subst %%NL%%,$(NL),$(RULES)))

.PHONY: backbone experts pool-experts embed interpolate evaluate show
.DELETE_ON_ERROR:
show: evaluate  # every config's table of this target, this config's first: written afresh
	@$(PY) -m common.report $(CONFIG) $(OVERRIDES) --tables $(TARGET)
