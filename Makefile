# shardtrain: `make demo` and `make test` work on a fresh machine; both run `make setup` first.
# Full pipelines: make shards IMAGENET=/data/imagenet SHARDS=/data/shards [FORMAT=lmdb|msgpack]

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# A matched pair from PyPI: torchvision only imports against the torch build it was made for
# (and pip would otherwise take a local CPU-only torch wheel that breaks torchvision).
TORCH_PAIR ?= torch==2.13.0 torchvision==0.28.0
PILLOW_SIMD ?= pillow-simd
IMAGENET ?= /data/imagenet
SHARDS ?= /data/shards
FORMAT ?= lmdb
DEMO ?= demo

.PHONY: setup demo test bench shards shards-160 shards-320 verify info clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	@bash scripts/setup.sh "$(PYTHON)" "$(VENV)" "$(TORCH_PAIR)" "$(PILLOW_SIMD)"
	@touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The main job on the embedded sample data: archives -> shards at 2 sizes in both formats -> verify.
demo: $(STAMP)
	$(BIN)/prep sample --out $(DEMO)/imagenet
	for split in train val; do \
	  $(BIN)/prep build-lmdb --src $(DEMO)/imagenet --out $(DEMO)/shards/lmdb --split $$split --size 160 --size 320 -q && \
	  $(BIN)/prep build-msgpack --src $(DEMO)/imagenet --out $(DEMO)/shards/msgpack --split $$split --size 160 --size 320 -q || exit 1; \
	done
	for dir in $(DEMO)/shards/*/*-*; do $(BIN)/prep verify $$dir -q || exit 1; done
	$(BIN)/prep info $(DEMO)/shards/lmdb/train-160

bench: $(STAMP)
	$(BIN)/python bench/prep.py

# --- full pipelines on real ImageNet: tars -> shards -> verify ---------------------------------
shards-160: $(STAMP)
	$(BIN)/prep build-$(FORMAT) --src $(IMAGENET) --out $(SHARDS) --split train --size 160
	$(BIN)/prep build-$(FORMAT) --src $(IMAGENET) --out $(SHARDS) --split val --size 160

shards-320: $(STAMP)
	$(BIN)/prep build-$(FORMAT) --src $(IMAGENET) --out $(SHARDS) --split train --size 320
	$(BIN)/prep build-$(FORMAT) --src $(IMAGENET) --out $(SHARDS) --split val --size 320

# Both sizes in one pass over the archives: one read and one decode per image.
shards: $(STAMP)
	$(BIN)/prep build-$(FORMAT) --src $(IMAGENET) --out $(SHARDS) --split train --size 160 --size 320
	$(BIN)/prep build-$(FORMAT) --src $(IMAGENET) --out $(SHARDS) --split val --size 160 --size 320

verify: $(STAMP)
	for dir in $(SHARDS)/*-*; do $(BIN)/prep verify $$dir --source $(IMAGENET) || exit 1; done

info: $(STAMP)
	for dir in $(SHARDS)/*-*; do $(BIN)/prep info $$dir; done

clean-demo:
	rm -rf $(DEMO)
