"""Configuration fuzzing: any bindings end in a one-line ConfigError or in a valid configuration.

Hypothesis draws bindings for `train.*`, `MoEConfig.*`, `M6Transformer.*` and the size macros
of gin/base.gin — negative, zero, huge, wrong types, unknown strings, and valid values — on top
of gin/demo.gin shrunk by gin/tiny.gin, and runs each through the trainer's validation path
only (`configurables.validate_run`: gin parsing, every `train.*` rule, the network's and the MoE
layers' own checks; no data is read and no weight is made). Every case must end in a
`ConfigError` whose message is one line, or pass; anything else (a TypeError from comparing a
string with a number, a KeyError, a traceback) is a bug. When the error names bindings that fix
it (`ConfigError.fix`), applying them must clear that error.
"""

import os

import gin
import hypothesis
from hypothesis import strategies as st
import pytest
import tensorflow as tf

from m6t_tf.run import configurables
from m6t_tf.errors import ConfigError
from m6t_tf.run import config as config_lib
from tests.support import REPO

FILES = [os.path.join(REPO, "gin", f) for f in ("demo.gin", "tiny.gin")]
# The demo data's facts are pinned, so no case reads the data (MAX_LEN = None would).
BASE = ["MAX_LEN = 12", "REAL_TOKEN_FRACTION = 1.0"]

TRAIN_KEYS = [f"train.{name}" for name, _ in config_lib.fields() if name != "model_dir"]
MOE_KEYS = [f"MoEConfig.{k}" for k in (
    "num_experts", "routing", "k", "capacity_factor", "eval_capacity_factor", "capacity_mode",
    "normalization", "dispatch", "aux_loss_weight", "z_loss_weight", "min_capacity",
    "second_expert_policy", "drop_policy", "max_tokens_per_expert_factor", "num_groups",
    "capacity_token_fraction")]
NETWORK_KEYS = [f"M6Transformer.{k}" for k in (
    "norm", "activation", "positions", "moe_placement", "moe_every", "moe_attention",
    "dropout_rate", "init_std")]
MACROS = ["HIDDEN", "INTERMEDIATE", "NUM_LAYERS", "NUM_HEADS", "HEAD_SIZE", "NUM_EXPERTS", "K",
          "CAPACITY_FACTOR", "CAPACITY_MODE", "ROUTING", "DROPOUT", "INIT_STD", "AUX_LOSS",
          "Z_LOSS", "MOE_EVERY", "SECOND_EXPERT", "DROP_POLICY", "VOCAB_SIZE"]
KEYS = TRAIN_KEYS + MOE_KEYS + NETWORK_KEYS + MACROS

# Gin literals: what a user could type after `=`.
VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "3", "7", "8", "64", "10**0", "1000000000000",
                     "-0.5", "0.0", "0.5", "1.0", "1.25", "2.0", "1e-9", "1e400", "-1e400",
                     "True", "False", "None", "'bogus'", "''", "'ten'", "[1, 2]", "(2,)",
                     "{'a': 1}", "'top_k'", "'prototype'", "'dropless'", "'1'", "'k'",
                     "'random'", "'probability'", "'cosine'", "'linear'", "'adafactor'",
                     "'features'", "'fail'", "'block'", "'experts'", "['block_0']",
                     "['block_9']", "'einsum'", "'swiglu'", "'relu'", "'pre_rms'", "'rope'",
                     "'every_k'", "'none'", "'renormalize'"]),
    st.integers(-3, 70).map(str),
    st.floats(-2.0, 3.0, allow_nan=False).map(repr))


def _validate(bindings):
  gin.clear_config()
  configurables.parse(FILES, BASE + list(bindings), [REPO])
  return configurables.validate_run(model_dir="unused", num_workers=1)


def _outcome(bindings):
  """None if the bindings validate, else the ConfigError (any other exception propagates)."""
  try:
    _validate(bindings)
    return None
  except ConfigError as e:
    return e


@pytest.mark.slow
class ConfigFuzzTest(tf.test.TestCase):

  def tearDown(self):
    gin.clear_config()
    super().tearDown()

  def test_the_base_config_validates(self):
    self.assertIsNone(_outcome([]))

  @hypothesis.settings(max_examples=320, deadline=None, derandomize=True,
                       suppress_health_check=list(hypothesis.HealthCheck))
  @hypothesis.given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
  def test_any_bindings_end_in_one_line_or_validate(self, pairs):
    bindings = [f"{k} = {v}" for k, v in pairs]
    error = _outcome(bindings)
    if error is None:
      return
    message = str(error)
    self.assertNotIn("\n", message, bindings)
    self.assertTrue(message.strip(), bindings)
    if error.fix:
      # The fix clears this error: validation passes, or stops at another problem.
      after = _outcome(bindings + list(error.fix))
      self.assertTrue(after is None or str(after) != message,
                      f"{bindings} + fix {error.fix} still fails: {message}")

  def test_every_suggested_fix_of_each_rule_is_valid(self):
    # One case per rule with a fix; each fix applied must make the config valid.
    cases = [["train.num_steps = 1", "train.lr_decay = 'cosine'", "train.warmup_steps = 10"],
             ["train.num_steps = 1", "train.lr_decay = 'cosine'", "train.warmup_steps = 0",
              "train.warmup_fraction = 0.9"],
             ["train.num_steps = 30", "train.lr_decay = 'linear'", "train.warmup_steps = 30"],
             ["train.shuffle_buffer = 0"], ["train.keep_checkpoints = 0"],
             ["train.on_bad_record = 'bogus'"], ["train.stall_timeout_s = -1"],
             ["train.optimizer = 'sgd'"], ["train.num_steps = 0"],
             ["train.learning_rate = -1.0"], ["train.eval_captions = -2"]]
    for bindings in cases:
      with self.subTest(bindings):
        error = _outcome(bindings)
        self.assertIsNotNone(error, bindings)
        self.assertTrue(error.fix, f"{bindings}: {error} offers no fix")
        for b in error.fix:
          self.assertIn(f"--gin_bindings={b}", str(error))
        self.assertIsNone(_outcome(bindings + list(error.fix)), (bindings, error.fix))


if __name__ == "__main__":
  tf.test.main()
