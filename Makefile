# shardtrain: `make demo` and `make test` work on a fresh machine; both run `make setup` first.
# Full pipelines: make shards IMAGENET=/data/imagenet SHARDS=/data/shards [FORMAT=lmdb|msgpack]

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
BENCH_STAMP := $(VENV)/.bench-setup-done
# A matched pair from PyPI: torchvision only imports against the torch build it was made for
# (and pip would otherwise take a local CPU-only torch wheel that breaks torchvision).
TORCH_PAIR ?= torch==2.13.0 torchvision==0.28.0
PILLOW_SIMD ?= pillow-simd
IMAGENET ?= /data/imagenet
SHARDS ?= /data/shards
FORMAT ?= lmdb
DEMO ?= demo

GPUS ?= 8
.PHONY: setup demo test test-quick lint bench bench-peers bench-scale shards shards-160 shards-320 verify info clean-demo \
	train-imagenet18 train-rn50 train-rn18 bench-train

setup: $(STAMP)

# setup.py and the C source: a changed native decoder is rebuilt (pip's editable install compiles it).
$(STAMP): pyproject.toml setup.py train/data/native/decode_native.c train/data/native/decode_resample.h
	@bash scripts/setup.sh "$(PYTHON)" "$(VENV)" "$(TORCH_PAIR)" "$(PILLOW_SIMD)"
	@touch $@

# pytest-xdist: one worker per core (at most 4); --dist loadfile keeps a file's tests (and its
# module-scoped fixtures) on one worker. Plain `pytest` still runs everything in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST)

# ruff (line length 100, pyproject.toml): formatting and lint, the whole repository.
LINT_PATHS ?= .
lint: $(STAMP)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/ruff check $(LINT_PATHS)

# The quick tier while editing (< ~1 min): everything but the tests marked slow.
test-quick: $(STAMP)
	$(PYTEST) -m "not slow"

# The main job on the embedded sample data, on CPU in a few minutes: ImageNet-format archives ->
# shards at 2 sizes in both formats -> verify -> train ResNet-18 (phases/demo.json) -> report.
demo: $(STAMP)
	$(BIN)/prep sample --out $(DEMO)/imagenet
	for split in train val; do \
	  $(BIN)/prep build-lmdb --src $(DEMO)/imagenet --out $(DEMO)/shards/lmdb --split $$split --size 160 --size 320 -q && \
	  $(BIN)/prep build-msgpack --src $(DEMO)/imagenet --out $(DEMO)/shards/msgpack --split $$split --size 160 --size 320 -q || exit 1; \
	done
	for dir in $(DEMO)/shards/*/*-*; do $(BIN)/prep verify $$dir -q || exit 1; done
	$(BIN)/prep info $(DEMO)/shards/lmdb/train-160
	$(BIN)/train run --phases phases/demo.json --data $(DEMO)/shards/lmdb --out $(DEMO)/runs/demo --resume auto --workers 2
	$(BIN)/train report $(DEMO)/runs/demo

# Bench extras (webdataset, scikit-image for the real-photo fixture); setup re-checks that
# pillow-simd is still the active PIL afterwards, since scikit-image pulls Pillow back in.
$(BENCH_STAMP): $(STAMP)
	@bash scripts/setup.sh "$(PYTHON)" "$(VENV)" "$(TORCH_PAIR)" "$(PILLOW_SIMD)" "test,hf,bench"
	@touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python bench/prep.py
	$(BIN)/python bench/loader.py

# Full-size rehearsal: ImageNet's exact counts and layout from small real-photo crops (~10 GB of
# archives, ~6 GB of shards at a time; an hour on 2 cores). SCALE=0.01 for a quick look.
SCALE_DATA ?= bench/.cache/scale
SCALE ?= 1
bench-scale: $(BENCH_STAMP)
	$(BIN)/python bench/scale.py --data $(SCALE_DATA) --scale $(SCALE) all

# FFCV and DALI's CPU pipeline in their own venv (bench/.peers-venv), against ours and the issue-10
# threaded prototype in interleaved rounds (bench/loader.py then shows them as rows (7) too).
bench-peers: $(BENCH_STAMP)
	bash bench/setup_peers.sh
	$(BIN)/python bench/loader_peers.py

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

# --- training on the shards (torchrun: one process per GPU; batch_size in phases/*.json is per GPU) --
train-imagenet18: $(STAMP)
	$(BIN)/torchrun --nproc_per_node=$(GPUS) -m train run --phases phases/imagenet18-1x8.json --data $(SHARDS) --out runs/imagenet18 --resume auto

train-rn50: $(STAMP)
	$(BIN)/torchrun --nproc_per_node=$(GPUS) -m train run --phases phases/rn50-16ep.json --data $(SHARDS) --out runs/rn50-16ep --resume auto

train-rn18: $(STAMP)
	$(BIN)/train run --phases phases/rn18-16ep.json --data $(SHARDS) --out runs/rn18-16ep --resume auto

# Per phase: model ceiling on synthetic on-device data vs end-to-end from shards (are you data-bound?)
bench-train: $(STAMP)
	$(BIN)/train bench --phases phases/rn50-16ep.json --data $(SHARDS)

clean-demo:
	rm -rf $(DEMO)
