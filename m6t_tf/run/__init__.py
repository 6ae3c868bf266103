"""The run layer: what the entry points (`python -m m6t_tf.train`, `evaluate`, `generate`, ...)
call — the run configuration, the trainer and its loop, evaluation, caption generation,
checkpoints and the gin wiring."""
