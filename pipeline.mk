# The pipeline's file graph. Called from Makefile with PY, CONFIG, TARGET, SEED, OVERRIDES set.
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
VALUES   := $(shell $(PY) -m common.config $(CONFIG) $(OVERRIDES) --stamp --get run_dir tasks.target_shots control interpolate.holdout tasks.pool || echo ERROR)
ifneq ($(filter ERROR,$(VALUES)),)
$(error $(CONFIG) could not be read; see the line above)
endif
RUN      := $(word 1,$(VALUES))
SHOTS    := $(word 2,$(VALUES))
# the transfer row's control (pair-null), for the expert types that have an expert changing nothing
CONTROL  := $(filter-out -,$(word 3,$(VALUES)))
HOLDOUT  := $(word 4,$(VALUES))
POOL     := $(wordlist 5,$(words $(VALUES)),$(VALUES))
ifeq ($(filter $(TARGET),$(POOL)),)
$(error TARGET=$(TARGET) is not in tasks.pool of $(CONFIG) ($(POOL)); pick one of those or add it there)
endif

# each stage also depends on the config it is made from (common/config.py MADE_FROM): stamps that change
# only when their content does
CFG      := $(RUN)/.config
FROM_EXPERT := $(CFG)/expert.json $(CFG)/data.json $(CFG)/tasks.define.json
FROM_TARGET := $(FROM_EXPERT) $(CFG)/tasks.shots_per_class.json
FROM_SIM    := $(CFG)/fisher.json $(CFG)/tasks.pool.json
FROM_SCORED := $(CFG)/evaluate.json $(foreach k,world.val_size world.test_size data.val_size data.test_size,$(CFG)/$(k).json)
NAME     := $(TARGET)-$(if $(filter 0,$(SHOTS)),full,$(SHOTS)shot)-s$(SEED)
BACKBONE := $(RUN)/backbone/meta.json
POOL_EXP := $(foreach t,$(filter-out $(TARGET),$(POOL)),$(RUN)/experts/$(t)/meta.json)
TGT_EXP  := $(RUN)/experts/$(NAME)/meta.json
SIM      := $(RUN)/similarity/$(NAME).json
INTERP   := $(RUN)/interpolated/$(NAME)/meta.json
RESULT   := $(RUN)/results/$(NAME).json
# stacking (interpolate.holdout > 0): every interpolation needs the target's expert refitted without the held-out
FOLD     := $(if $(filter-out 0 0.0,$(HOLDOUT)),$(RUN)/experts/$(NAME).fold/meta.json)

# the study (make report): every baseline of this target/shots/seed, and the transfer matrix row
COMMA    := ,
SPACE    := $(subst ,, )
OTHERS   := $(filter-out $(TARGET),$(POOL))
BASELINE := $(RUN)/experts/$(NAME).2x/meta.json $(RUN)/experts/$(NAME).full-ft/meta.json \
            $(RUN)/interpolated/$(NAME).random/meta.json $(RUN)/interpolated/$(NAME).frozen/meta.json
PAIRS    := $(foreach t,$(OTHERS) $(CONTROL),$(RUN)/interpolated/$(NAME).pair-$(t)/meta.json)
TRANSFER := $(RUN)/results/$(NAME).transfer.json
# the study's embeddings (make report EMBED_AS="... fisher-passes" adds the repeated-shots Fisher: its pool
# Fishers are computed anew, about 3 min more)
EMBED_AS := fisher weights prototypes fisher-batch fisher-raw
EMBEDS   := $(foreach e,$(EMBED_AS),$(RUN)/similarity/$(NAME).$(e).json)
ORACLE   := $(RUN)/interpolated/$(NAME).oracle/meta.json
ifdef STUDY
$(RESULT): $(BASELINE) $(if $(filter 1,$(TRANSFER_ROW)),$(ORACLE) $(EMBEDS))
endif

.PHONY: backbone experts pool-experts embed interpolate evaluate show clean
.DELETE_ON_ERROR:
backbone: $(BACKBONE)
experts: $(POOL_EXP) $(TGT_EXP) $(FOLD)
pool-experts: $(foreach t,$(POOL),$(RUN)/experts/$(t)/meta.json)  # every pool task's (make study: each is a target's pool)
embed: $(SIM)
interpolate: $(INTERP)
evaluate: $(RESULT)
show: $(RESULT)
	@cat $(RUN)/results/$(TARGET).md
clean:
	rm -rf $(RUN)

$(BACKBONE): $(CFG)/world.json $(CFG)/backbone.json $(CFG)/pretrain.json $(CFG)/precision.json
	$(STAGE_CMD) train_expert.py --pretrain $(ARGS)

$(TGT_EXP): $(BACKBONE) $(FROM_TARGET)
	$(STAGE_CMD) train_expert.py --task $(TARGET) --shots $(SHOTS) $(ARGS)

$(RUN)/experts/%/meta.json: $(BACKBONE) $(FROM_EXPERT)
	$(STAGE_CMD) train_expert.py --task $* $(ARGS)

$(SIM): $(POOL_EXP) $(TGT_EXP) $(FROM_SIM)
	$(STAGE_CMD) embed_tasks.py --target $(TARGET) $(ARGS)

$(RESULT): $(INTERP) $(TGT_EXP) $(FROM_SCORED)
	$(STAGE_CMD) evaluate.py --target $(TARGET) $(ARGS)

# one baseline or comparison run alone (make -f pipeline.mk .../snli-ve-64shot-s0.oracle/meta.json)
$(RUN)/similarity/$(NAME).%.json: $(POOL_EXP) $(TGT_EXP) $(FROM_SIM)
	$(STAGE_CMD) embed_tasks.py --target $(TARGET) --embedding $* $(ARGS)

$(RUN)/experts/$(NAME).%/meta.json: $(BACKBONE) $(FROM_TARGET)
	$(STAGE_CMD) train_expert.py --task $(TARGET) --shots $(SHOTS) --variant $* $(ARGS)

$(RUN)/experts/$(NAME).fold/meta.json: $(BACKBONE) $(FROM_TARGET) $(CFG)/interpolate.holdout.json
	$(STAGE_CMD) train_expert.py --task $(TARGET) --shots $(SHOTS) --variant fold $(ARGS)

$(RUN)/interpolated/$(NAME).%/meta.json: $(SIM) $(FOLD) $(CFG)/interpolate.json
	$(STAGE_CMD) interpolate.py --target $(TARGET) --variant $* $(ARGS)

# the study: runs that would load the same backbone one after another share one process (each run in it
# is seeded as if alone, a test checks it): both embeddings, the target-side baselines, π-Tuning with its
# interpolation baselines, all pair runs
$(EMBEDS) &: $(POOL_EXP) $(TGT_EXP) $(FROM_SIM)
	$(STAGE_CMD) embed_tasks.py --target $(TARGET) --embedding $(subst $(SPACE),$(COMMA),$(EMBED_AS)) $(ARGS)

$(RUN)/experts/$(NAME).2x/meta.json $(RUN)/experts/$(NAME).full-ft/meta.json &: $(BACKBONE) $(FROM_TARGET)
	$(STAGE_CMD) train_expert.py --task $(TARGET) --shots $(SHOTS) --variant 2x,full-ft $(ARGS)

ifdef STUDY
$(INTERP) $(RUN)/interpolated/$(NAME).random/meta.json $(RUN)/interpolated/$(NAME).frozen/meta.json &: $(SIM) $(FOLD) $(CFG)/interpolate.json
	$(STAGE_CMD) interpolate.py --target $(TARGET) --variant pi,random,frozen $(ARGS)
else
$(INTERP): $(SIM) $(FOLD) $(CFG)/interpolate.json
	$(STAGE_CMD) interpolate.py --target $(TARGET) $(ARGS)
endif

# A pair run is made from the target's expert and one pool expert (common/config.py MADE_FROM["pair"]), not
# from the pool or the retrieval: the row's process makes only the pair runs missing or older than what they are
# made from (or from what is not made yet), so a pool that grows adds its new pair runs and keeps the others.
PAIR_FROM = $(TGT_EXP) $(FOLD) $(CFG)/interpolate.json $(if $(filter $(1),$(CONTROL)),,$(RUN)/experts/$(1)/meta.json)
PAIR_DUE  = $(shell m=$(RUN)/interpolated/$(NAME).pair-$(1)/meta.json; [ -f $$m ] && [ -z "$$(find $(call PAIR_FROM,$(1)) -newer $$m 2>&1)" ] || echo pair-$(1))
PAIRS_DUE = $(strip $(foreach t,$(OTHERS) $(CONTROL),$(call PAIR_DUE,$(t))))
$(PAIRS) &: $(POOL_EXP) $(TGT_EXP) $(FOLD) $(CFG)/interpolate.json | $(SIM)
	$(if $(PAIRS_DUE),$(STAGE_CMD) interpolate.py --target $(TARGET) --variant $(subst $(SPACE),$(COMMA),$(PAIRS_DUE)) $(ARGS),@:)

$(TRANSFER): $(PAIRS) $(TGT_EXP) $(FROM_SCORED) $(CFG)/tasks.pool.json
	$(STAGE_CMD) evaluate.py --target $(TARGET) --transfer $(ARGS)

$(ORACLE): $(TRANSFER)
