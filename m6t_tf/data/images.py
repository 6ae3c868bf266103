"""Image files to model pixels inside the TensorFlow graph, exactly as the dataset builder does.

`tools/make_dataset.py` (`load_rgb` then `resize`) turns a user's image file into the uint8
pixels stored in the records: `tf.io.decode_image` (PNG, JPEG, GIF's first frame, BMP), alpha
composited on white, grey replicated to RGB, then an antialiased bilinear resize to a square,
rounded and clipped. `decode_image` repeats those steps with TensorFlow ops only, so that
`m6t_tf.generate --images` and the exported SavedModel (`m6t_tf.export`, where it runs inside
the serving graph) see the pixels the model was trained on; tests/test_generate.py checks the
two agree byte for byte.

`decode_requests` is the same decoding for a batch of untrusted requests (the serving graph):
a request that is not an image, is too large, or does not decode yields an error message for
that request only, never a failed batch.
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


#: What `decode_requests` reports per request; `OK` requests were decoded.
OK, EMPTY, UNKNOWN_FORMAT, TOO_LARGE, UNDECODABLE = 0, 1, 2, 3, 4
#: The formats served, by their leading bytes, in `_FORMAT_NAMES` order (WebP: "RIFF", its
#: size, "WEBP"). `tf.io.decode_image` also reads JPEG XL, whose header is not parsed here, so
#: its size could not be checked before decoding: it is refused.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n",), (b"\xff\xd8\xff",), (b"GIF87a", b"GIF89a"), (b"BM",))
_FORMAT_NAMES = ("PNG", "JPEG", "GIF", "BMP", "WebP")
FORMATS = "PNG, JPEG, GIF, BMP or WebP"


def _format_of(data: tf.Tensor) -> tf.Tensor:
  """<int32>[]: the index in `_FORMAT_NAMES` of the format `data` starts like, -1 for none."""
  webp = tf.logical_and(tf.strings.substr(data, 0, 4) == b"RIFF",
                        tf.strings.substr(tf.strings.join([data, b"\0" * 12]), 8, 4) == b"WEBP")
  kind = tf.where(webp, 4, -1)
  for index in reversed(range(len(_SIGNATURES))):
    hit = tf.reduce_any([tf.strings.substr(data, 0, len(sig)) == sig
                         for sig in _SIGNATURES[index]])
    kind = tf.where(hit, index, kind)
  return kind


def _uint(data: tf.Tensor, start: int, width: int, big_endian: bool) -> tf.Tensor:
  """<int64>[]: the unsigned integer of `width` bytes at `start` of `data` (long enough)."""
  octets = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, width), tf.uint8), tf.int64)
  weights = [256 ** (width - 1 - i if big_endian else i) for i in range(width)]
  return tf.reduce_sum(octets * tf.constant(weights, tf.int64))


def _header_size(data: tf.Tensor, kind: tf.Tensor) -> tf.Tensor:
  """<int64>[2] (height, width) that the file's header declares, read without decoding pixels.

  Raises (when run): for a JPEG whose header does not parse.
  """
  padded = tf.strings.join([data, tf.constant(b"\0" * 32)])  # short files read zeros

  def png():                            # IHDR: width, height as big-endian uint32
    return tf.stack([_uint(padded, 20, 4, True), _uint(padded, 16, 4, True)])

  def jpeg():
    return tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64)

  def gif():                            # logical screen: little-endian uint16
    return tf.stack([_uint(padded, 8, 2, False), _uint(padded, 6, 2, False)])

  def bmp():                            # BITMAPINFOHEADER: int32; a negative height is top-down
    signed = lambda v: tf.where(v >= 2 ** 31, v - 2 ** 32, v)
    return tf.stack([tf.abs(signed(_uint(padded, 22, 4, False))),
                     tf.abs(signed(_uint(padded, 18, 4, False)))])

  def webp():                           # by the first chunk: extended, lossless or lossy
    chunk = tf.strings.substr(padded, 12, 4)
    extended = tf.stack([_uint(padded, 27, 3, False) + 1, _uint(padded, 24, 3, False) + 1])
    bits = _uint(padded, 21, 4, False)  # lossless: 14-bit width - 1, then height - 1
    lossless = tf.stack([bits // 2 ** 14 % 2 ** 14 + 1, bits % 2 ** 14 + 1])
    lossy = tf.stack([_uint(padded, 28, 2, False) % 2 ** 14,
                      _uint(padded, 26, 2, False) % 2 ** 14])
    return tf.where(chunk == b"VP8X", extended, tf.where(chunk == b"VP8L", lossless, lossy))

  return tf.switch_case(tf.maximum(kind, 0), [png, jpeg, gif, bmp, webp])


def decode_requests(data: tf.Tensor, size: int, max_pixels: int):
  """<string>[N] untrusted encoded images -> (<uint8>[N, size, size, 3], <string>[N] errors).

  Each request is decoded as `decode_image` does, or gets an error message (its pixels are
  then zeros): empty bytes, a format other than `FORMATS`, more than `max_pixels`
  pixels declared by the file's header (refused before decoding, so a huge image cannot
  exhaust memory), or a file that does not decode (truncated, corrupt). The decoding runs in
  a `tf.data` pipeline that drops the requests whose decoding raised, so one bad request never
  fails the others.
  """
  n = tf.size(data)
  lengths = tf.strings.length(data)

  def one(index, request):
    kind = _format_of(request)
    hw = tf.cond(kind >= 0, lambda: _header_size(request, kind),
                 lambda: tf.zeros([2], tf.int64))
    status = tf.where(tf.strings.length(request) == 0, EMPTY,
                      tf.where(kind < 0, UNKNOWN_FORMAT,
                               tf.where(hw[0] * hw[1] > max_pixels, TOO_LARGE, OK)))
    pixels = tf.cond(status == OK, lambda: decode_image(request, size),
                     lambda: tf.zeros([size, size, 3], tf.uint8))
    return index, status, hw, pixels

  # A request whose decoding raised is dropped here, and keeps UNDECODABLE below. One request
  # at a time (no parallel map): memory stays that of one image of at most `max_pixels`.
  options = tf.data.Options()
  options.experimental_optimization.map_parallelization = False
  decoded = tf.data.Dataset.from_tensor_slices((tf.range(n), data)).map(one).ignore_errors()
  decoded = decoded.with_options(options)

  def keep(state, element):
    statuses, sizes, images = state
    index, status, hw, pixels = element
    at = [[index]]
    return (tf.tensor_scatter_nd_update(statuses, at, [status]),
            tf.tensor_scatter_nd_update(sizes, at, [hw]),
            tf.tensor_scatter_nd_update(images, at, [pixels]))

  statuses, sizes, images = decoded.reduce(
      (tf.fill([n], UNDECODABLE), tf.zeros([n, 2], tf.int64),
       tf.zeros([n, size, size, 3], tf.uint8)), keep)
  kinds = tf.map_fn(_format_of, data, fn_output_signature=tf.int32)
  name = tf.gather(tf.constant(_FORMAT_NAMES + ("",)),
                   tf.where(kinds < 0, len(_FORMAT_NAMES), kinds))
  text = tf.strings.as_string
  pixels = sizes[:, 0] * sizes[:, 1]
  messages = [
      tf.fill([n], ""),
      tf.fill([n], "empty request: no image bytes"),
      tf.strings.join([f"not a {FORMATS} file (", text(lengths), " bytes)"]),
      tf.strings.join([name, " of ", text(sizes[:, 1]), "x", text(sizes[:, 0]), " = ",
                       text(pixels), " pixels: above this server's limit of ",
                       str(max_pixels), " pixels; send it smaller"]),
      tf.strings.join(["corrupt or truncated ", name, " file (", text(lengths),
                       " bytes): it does not decode"]),
  ]
  errors = tf.gather(tf.stack(messages, axis=1), statuses[:, None], batch_dims=1)[:, 0]
  return images, errors
