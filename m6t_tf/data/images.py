"""Image files to model pixels inside the TensorFlow graph, exactly as the dataset builder does.

`tools/make_dataset.py` (`load_rgb` then `resize`) turns a user's image file into the uint8
pixels stored in the records: `tf.io.decode_image` (PNG, JPEG, GIF's first frame, BMP), alpha
composited on white, grey replicated to RGB, then an antialiased bilinear resize to a square,
rounded and clipped. `decode_image` repeats those steps with TensorFlow ops only, so that
`m6t_tf.generate --images` and the exported SavedModel (`m6t_tf.export`, where it runs inside
the serving graph) see the pixels the model was trained on; tests/test_generate.py checks the
two agree byte for byte.
"""

from __future__ import annotations

import tensorflow as tf


def decode_image(data: tf.Tensor, size: int) -> tf.Tensor:
  """<string>[] encoded PNG/JPEG/GIF/BMP bytes -> <uint8>[size, size, 3].

  Raises (when run): InvalidArgumentError for bytes that are not a decodable image.
  """
  img = tf.io.decode_image(data, channels=0, expand_animations=False)      # uint8 [H, W, C]
  channels = tf.shape(img)[-1]

  def composite():                     # grey+alpha or RGBA: alpha over white
    alpha = tf.cast(img[..., -1:], tf.float32) / 255.0
    color = tf.cast(img[..., :-1], tf.float32)
    return tf.cast(tf.round(color * alpha + 255.0 * (1.0 - alpha)), tf.uint8)

  img = tf.cond(tf.logical_or(channels == 2, channels == 4), composite, lambda: img)
  img = tf.cond(tf.shape(img)[-1] == 1, lambda: tf.tile(img, [1, 1, 3]), lambda: img)
  img = tf.ensure_shape(img, [None, None, 3])

  def resized():
    out = tf.image.resize(tf.cast(img, tf.float32), [size, size], method="bilinear",
                          antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

  same = tf.reduce_all(tf.shape(img)[:2] == size)
  return tf.ensure_shape(tf.cond(same, lambda: img, resized), [size, size, 3])


def decode_images(data: tf.Tensor, size: int) -> tf.Tensor:
  """<string>[N] encoded images -> <uint8>[N, size, size, 3]."""
  return tf.map_fn(lambda d: decode_image(d, size), data,
                   fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
