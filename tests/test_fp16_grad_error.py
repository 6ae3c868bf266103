"""tools/fp16_grad_error.py: its statistics on hand-made values, and its argument errors.

(The measurement itself runs two `horovodrun` launches, minutes of CPU: it is a tool, not a
test; `tests/test_parallel_fp16_gradients.py` tests the FP16 reduction it measures.)
"""

import numpy as np
import pytest

from m6t_tf.cli import ConfigError
from tests import support

fp16_grad_error = support.load_tool("tools/fp16_grad_error.py")


def test_statistics_of_hand_made_values():
  reference = np.array([1.0, 2.0, 4.0, 0.0, 8.0], np.float32)
  values = np.array([1.0, 2.2, 0.0, 5.0, 8.0], np.float32)
  s = fp16_grad_error.statistics_of(reference, values)
  # Over the 4 non-zero references: relative errors 0, 0.1, 1 (flushed), 0.
  assert s["flushed_fraction"] == 0.25
  assert s["largest_flushed"] == 4.0
  assert s["median_rel_error"] == pytest.approx(0.05, rel=1e-5)
  assert s["p99_rel_error"] == pytest.approx(0.1 + 0.97 * 0.9, rel=1e-5)
  assert s["norm_rel_error"] == pytest.approx(np.hypot(0.2, 4.0) / np.sqrt(85.0), rel=1e-5)


def test_bad_arguments_name_the_choices():
  with pytest.raises(ConfigError, match="--configs='huge': unknown"):
    fp16_grad_error.parse_args(["--configs=huge"])
  with pytest.raises(ConfigError, match="--ranks"):
    fp16_grad_error.parse_args(["--ranks=1"])
  args = fp16_grad_error.parse_args(["--configs=demo"])
  assert args.names == ["demo"]
