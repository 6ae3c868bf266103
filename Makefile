# The two commands of the README:
#   make train   # set up, build the demo dataset, train gin/demo.gin, print validation perplexity
#   make test    # set up, then run the whole test suite
# Every target depends on `setup`, which is a no-op (about a second) when nothing changed.

SHELL := /bin/bash
PY := .venv/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
MODEL_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup data train evaluate test test-fast clean

setup:
	@bash tools/setup_env.sh

data: setup
	@$(PY) tools/build_demo_data.py

train: data
	$(PY) -m m6t_tf.train --gin_file=gin/demo.gin --model_dir=$(MODEL_DIR)
	$(PY) -m m6t_tf.evaluate --model_dir=$(MODEL_DIR)

evaluate: setup
	$(PY) -m m6t_tf.evaluate --model_dir=$(MODEL_DIR)

test: data
	$(PY) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

# The MoE benchmark's peers (Keras-Hub, Model Garden) into .venv, --no-deps: see requirements-bench.txt.
#   make bench                       # full run, table (~15 min on 2 cores; docs/bench_moe.md)
#   make bench BENCH_ARGS="--smoke --format=json"
.PHONY: bench-setup bench
BENCH_ARGS ?=
bench-setup: setup
	@$(PY) -m pip install -q --no-deps -r requirements-bench.txt 2> >(grep -v "is ignored: it is neither" >&2)

bench: bench-setup
	$(PY) tools/bench_moe.py $(BENCH_ARGS)
