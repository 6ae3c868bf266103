# The two commands of the README:
#   make train   # set up, build the demo dataset, train gin/demo.gin, print validation perplexity
#   make test    # set up, then run the whole test suite
# Every target depends on `setup`, which is a no-op (about a second) when nothing changed.

SHELL := /bin/bash
PY := .venv/bin/python
MODEL_DIR ?= runs/demo
PYTEST_ARGS ?=
# Test processes: 2 fills the 2 cores CI has; each is a TensorFlow process (~1 GB), and the
# multi-process tests start 2-4 ranks of their own. `make test PYTEST_WORKERS=0` runs in one.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: setup data train evaluate caption test test-fast clean

# `make setup GPU=1` on a GPU node: tensorflow[and-cuda] and Horovod with NCCL (docs/gpu.md "The
# NCCL build"); without GPU= the command is exactly the CPU one.
setup:
	@$(if $(GPU),M6T_GPU=$(GPU) )bash tools/setup_env.sh

data: setup
	@$(PY) tools/build_demo_data.py

train: data
	$(PY) -m m6t_tf.train --gin_file=gin/demo.gin --model_dir=$(MODEL_DIR)
	$(PY) -m m6t_tf.evaluate --model_dir=$(MODEL_DIR)

evaluate: setup
	$(PY) -m m6t_tf.evaluate --model_dir=$(MODEL_DIR)

# After `make train`: greedy captions of the validation split, BLEU/CIDEr-D next to the two
# baselines, and the page runs/demo/captions.html.
caption: setup
	$(PY) -m m6t_tf.generate --model_dir=$(MODEL_DIR) --split=validation \
	    --html=$(MODEL_DIR)/captions.html

# matplotlib (requirements-plots.txt) so that the experiment scripts' smoke tests run too.
# Markers and options: pytest.ini; shared fixtures: tests/conftest.py.
test: experiments-setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The unit tests: no worker process, nothing slow (pytest.ini's markers); a few minutes.
test-fast: data
	@echo "make test-fast: tests marked neither multiprocess nor slow (make test runs them all)"
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not multiprocess and not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

# The MoE benchmark's peers (Keras-Hub, Model Garden) into .venv, --no-deps: see requirements-bench.txt.
#   make bench                       # full run, table (~25 min on 2 cores; docs/bench_moe.md)
#   make bench BENCH_ARGS="--smoke --format=json"
.PHONY: bench-setup bench
BENCH_ARGS ?=
bench-setup: setup
	@$(PY) -m pip install -q --no-deps -r requirements-bench.txt 2> >(grep -v "is ignored: it is neither" >&2)

bench: bench-setup
	$(PY) tools/bench_moe.py $(BENCH_ARGS)

# The paper's experiments at demo scale (docs/results/README.md): 63 training runs (routing ×
# capacity, auxiliary loss, MoE attention, routing options, model size; three seeds each, 300
# steps; ~85 min on 2 cores, two at a time), then the scripts' tables and plots (with step
# timing and captions of the final models), FLOPs per routing and the dense comparison.
#   make experiments                                   # writes docs/results/*.png, *.md, *.json
#   make experiments EXPERIMENT_ARGS="--steps=600 --seeds=0,1,2,3,4 --model_root=runs/exp600"
.PHONY: experiments-setup experiments
EXPERIMENT_ARGS ?=
PLOTS_STAMP = .venv/.stamp-plots-$(shell sha256sum requirements-plots.txt | cut -c1-16)
experiments-setup: data $(PLOTS_STAMP)
$(PLOTS_STAMP): requirements-plots.txt
	@$(PY) -m pip install -q -r requirements-plots.txt 2> >(grep -v "is ignored: it is neither" >&2)
	@touch $@

experiments: experiments-setup
	$(PY) tools/experiments/train_runs.py $(EXPERIMENT_ARGS)
	$(PY) tools/experiments/routing.py $(EXPERIMENT_ARGS)
	$(PY) tools/experiments/aux_loss.py $(EXPERIMENT_ARGS)
	$(PY) tools/experiments/moe_attention.py $(EXPERIMENT_ARGS)
	$(PY) tools/experiments/routing_options.py $(EXPERIMENT_ARGS)
	$(PY) tools/experiments/scale.py $(EXPERIMENT_ARGS)
	$(PY) tools/experiments/flops.py
	$(PY) tools/compare_dense.py --dense_gin=gin/demo.gin --moe_gin=tools/experiments/gin/top1.gin \
	    --moe_gin=tools/experiments/gin/2top1_cap_k.gin --moe_gin=tools/experiments/gin/top2_cap_k.gin \
	    --moe_gin=tools/experiments/gin/4top1_cap_k.gin --moe_gin=tools/experiments/gin/top4_cap_k.gin \
	    --out=docs/results/compare_dense.json > docs/results/compare_dense.md

# The GPU (NCCL) flavour built and checked on any machine, GPU or not, in its own venv so that
# .venv (the suite's) is never touched; not part of `make test`. Then, on a GPU node:
# `make setup GPU=1 && bash tools/gpu_check.sh`.
.PHONY: gpu-build-check
GPU_VENV ?= .venv-gpu
gpu-build-check:
	@M6T_GPU=1 M6T_VENV=$(GPU_VENV) bash tools/setup_env.sh
	@PYTHON=$(GPU_VENV)/bin/python bash tools/gpu_check.sh --build-only
