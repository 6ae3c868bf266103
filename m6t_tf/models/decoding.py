"""Caption decoding with a key/value cache: greedy, beam search and sampling.

The 16 patches and `[CLS]` are encoded once (`M6Transformer.call_cached` with the image); each
step then runs one new position per caption through every block, attending over the cached
keys and values of all earlier positions. The cache has a fixed size, `[R, 16 + L - 1, H, d]`
per block for R rows and captions of at most L tokens, so a whole decode is one `tf.while_loop`
with static shapes inside one `tf.function` (also what the SavedModel of `m6t_tf.export` runs).

Every MoE layer routes a decode call with capacity C = T, the tokens of the call, so no token is
ever dropped and each caption is independent of the other captions in its batch (with the
training capacity factor, a caption would change with its batch-mates). Under Horovod with
experts sharded, C = T is the same on every rank because every rank decodes batches of the same
size, and with `lockstep=True` the loop always runs its L - 2 steps: the all-to-alls of every
step run on every rank, even when a rank's captions have all ended.

Caption positions: 0 is `[CLS]`; tokens 1, 2, ... are generated until `[SEP]`. A caption has at
most L = `max_len` tokens, `[CLS]` and `[SEP]` included (the training `max_len`), so position
L - 1 can only be `[SEP]`: it is forced there, and every returned caption ends with `[SEP]`.
`[PAD]`, `[UNK]`, `[CLS]` and `[MASK]` are never generated, and the first token is neither
`[SEP]` (no empty caption) nor, given the vocabulary, a "##" continuation piece.

Scores. `log_prob` is the model's log-probability of the generated tokens, `[SEP]` included
(the full softmax at temperature 1, whatever filters chose the tokens). Beam search ranks by the
GNMT length penalty (Wu et al. 2016, eq. 14):

    score = log_prob / lp(n),    lp(n) = ((5 + n) / 6) ** alpha

with n the generated tokens including `[SEP]` and alpha = `length_penalty` (0: plain log-prob,
which favours short captions; larger alpha favours longer ones). Greedy and sampling report
score = log_prob.

Sampling draws with stateless ops keyed by (seed, position), so a seed reproduces its samples
for the same batch. Filters apply in this order: temperature, top-k, top-p (nucleus).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from m6t_tf.errors import ConfigError
from m6t_tf.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID

METHODS = ("greedy", "beam", "sample")
#: Ids never generated: padding, unknown, and the special tokens that never follow [CLS].
BANNED_IDS = (PAD_ID, UNK_ID, CLS_ID, MASK_ID)
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How to decode.

  Attributes:
    method: "greedy", "beam" or "sample".
    max_len: L, caption tokens at most, [CLS] and [SEP] included (3 <= L <= max_text_length + 1;
      0 until the caller sets it: generate and export use the training max_len).
    beam_size: K beams kept (beam search); all K are returned, best first.
    length_penalty: alpha of the GNMT length penalty (beam search), >= 0.
    temperature: divides the logits before sampling (> 0).
    top_k: sample among the k most likely tokens only (0 = all).
    top_p: sample from the smallest set of tokens whose probability reaches p (1.0 = all).
    seed: sampling seed.
    num_samples: captions sampled per image (sampling); all are returned, best first.
  """
  method: str = "greedy"
  max_len: int = 0
  beam_size: int = 4
  length_penalty: float = 0.0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  num_samples: int = 1

  def check(self, max_text_length: int, vocab_size: int) -> None:
    """Raises ConfigError (a ValueError) naming the bad option and the allowed range."""
    if self.method not in METHODS:
      raise ConfigError(f"decode method {self.method!r}; allowed: {METHODS}")
    if not 3 <= self.max_len <= max_text_length + 1:
      raise ConfigError(f"max_len={self.max_len} must be in [3, {max_text_length + 1}]: [CLS], "
                       f"at least one token and [SEP], and at most the model's "
                       f"max_text_length={max_text_length} input positions plus [SEP]")
    if self.method == "beam" and not 1 <= self.beam_size <= (vocab_size - len(BANNED_IDS)) // 2:
      raise ConfigError(f"beam_size={self.beam_size} must be >= 1 (and 2·beam_size <= the "
                       f"vocabulary)")
    if not (self.length_penalty >= 0 and math.isfinite(self.length_penalty)):
      raise ConfigError(f"length_penalty={self.length_penalty} must be a finite number >= 0 "
                       f"(GNMT's alpha; 0 turns it off, 0.6-1.0 are usual)")
    if not (self.temperature > 0 and math.isfinite(self.temperature)):
      raise ConfigError(f"temperature={self.temperature} must be > 0 (1.0 samples the model's "
                       f"own distribution)")
    if not 0 <= self.top_k <= vocab_size:
      raise ConfigError(f"top_k={self.top_k} must be in [0, {vocab_size}] (0 = no top-k filter)")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1.0 = no nucleus filter)")
    if self.num_samples < 1:
      raise ConfigError(f"num_samples={self.num_samples} must be >= 1")
    if self.method != "sample" and self.num_samples != 1:
      raise ConfigError(f"num_samples={self.num_samples} needs method='sample'")

  @property
  def num_candidates(self) -> int:
    """Captions returned per image: K beams, the samples, or 1."""
    return {"beam": self.beam_size, "sample": self.num_samples}.get(self.method, 1)


def length_penalty(num_tokens, alpha: float):
  """GNMT's lp(n) = ((5 + n) / 6) ** alpha, <float32> like `num_tokens`."""
  n = tf.cast(num_tokens, tf.float32)
  return tf.pow((5.0 + n) / 6.0, alpha)


def continuations(vocab: list[str]) -> np.ndarray:
  """<bool>[V]: the "##" pieces, which continue a word and so cannot start a caption."""
  return np.array([t.startswith("##") for t in vocab])


def _allowed(vocab_size: int, position, max_len: int, first_banned=None) -> tf.Tensor:
  """<bool>[V]: tokens that may stand at caption `position` (only [SEP] at L - 1; at 1 neither
  [SEP] nor a `first_banned` token, so a caption is never empty nor starts with "##")."""
  ids = tf.range(vocab_size)
  ok = tf.reduce_all(ids[:, None] != tf.constant(BANNED_IDS)[None, :], axis=1)
  first = tf.logical_and(ok, ids != SEP_ID)
  if first_banned is not None:
    first = tf.logical_and(first, ~tf.convert_to_tensor(first_banned, tf.bool))
  ok = tf.where(tf.equal(position, 1), first, ok)
  return tf.where(position >= max_len - 1, ids == SEP_ID, ok)


def filter_logits(logits: tf.Tensor, *, temperature: float, top_k: int, top_p: float) -> tf.Tensor:
  """<float32>[R, V] logits / temperature with the top-k and top-p filters (-inf outside)."""
  logits = logits / temperature
  if top_k:
    kth = tf.math.top_k(logits, k=top_k).values[:, -1:]                   # [R, 1]
    logits = tf.where(logits < kth, _NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = tf.sort(logits, axis=-1, direction="DESCENDING")      # [R, V]
    before = tf.cumsum(tf.nn.softmax(sorted_logits), axis=-1, exclusive=True)
    # Keep a token while the mass of the more likely ones is still below p (the first always).
    kept = tf.where(before < top_p, sorted_logits, float("inf"))
    threshold = tf.reduce_min(kept, axis=-1, keepdims=True)               # [R, 1]
    logits = tf.where(logits < threshold, _NEG_INF, logits)
  return logits


def _one_hot_at(position, length: int) -> tf.Tensor:
  return tf.one_hot(position, length, dtype=tf.int32)                     # [L]


def _prefix(network, features: dict, max_len: int, repeats: int, row_mask):
  """Encodes the patches and [CLS] of B images once; rows repeated `repeats` times each.

  Returns logits <float32>[B·repeats, V] of caption position 1, the cache and the row mask.
  """
  image = features.get("image", features.get("patch_features"))
  b = image.shape[0]
  if b is None:
    raise ValueError(f"decoding needs a static batch size, got image shape {image.shape}")
  tokens = tf.fill([b, 1], CLS_ID)
  cache = network.init_cache(b, max_len - 1)
  logits, cache = network.call_cached({**features, "tokens": tokens}, cache, row_mask=row_mask)
  if repeats > 1:
    rep = lambda t: tf.repeat(t, repeats, axis=0)
    cache = tf.nest.map_structure(rep, cache)
    logits = rep(logits)
    row_mask = None if row_mask is None else rep(row_mask)
  return logits[:, 0], cache, row_mask


def decode(network, features: dict, options: DecodeOptions, *, row_mask=None,
           lockstep: bool = False, first_banned=None) -> dict:
  """Captions for a batch of images (run it inside a `tf.function`).

  Args:
    network: an `M6Transformer` with its weights.
    features: {"image": <uint8>[B, H, W, 3]} or {"patch_features": <float>[B, 16, P]}, B static.
    options: a checked `DecodeOptions`.
    row_mask: optional <bool>[B]; False rows are filler (not routed by MoE layers).
    lockstep: always run all L - 2 steps (required under Horovod with experts sharded, so that
      every rank runs the same all-to-alls); otherwise stop once every caption has ended.
    first_banned: optional <bool>[V] tokens that may not start a caption (`continuations`).

  Returns:
    {"tokens": <int32>[B, N, L] ([CLS] ... [SEP] then [PAD]), "log_prob": <float32>[B, N],
     "score": <float32>[B, N], "length": <int32>[B, N] (generated tokens incl. [SEP])},
    N = `options.num_candidates`, sorted by score (best first). Beams that never finished
    (only possible for tiny vocabularies) have score -inf.
  """
  if options.method == "beam":
    return _beam_search(network, features, options, row_mask, lockstep, first_banned)
  return _greedy_or_sample(network, features, options, row_mask, lockstep, first_banned)


def _greedy_or_sample(network, features, options, row_mask, lockstep, first_banned):
  n, big_l = options.num_candidates, options.max_len
  logits, cache, row_mask = _prefix(network, features, big_l, n, row_mask)
  r, v = logits.shape
  sample = options.method == "sample"

  def choose(logits, position, tokens, log_prob, length, done):
    log_probs = tf.nn.log_softmax(logits)                                 # [R, V]
    masked = tf.where(_allowed(v, position, big_l, first_banned)[None], logits, _NEG_INF)
    if sample:
      filtered = filter_logits(masked, temperature=options.temperature, top_k=options.top_k,
                               top_p=options.top_p)
      token = tf.random.stateless_categorical(
          filtered, 1, seed=tf.stack([tf.constant(options.seed, tf.int64),
                                      tf.cast(position, tf.int64)]), dtype=tf.int32)[:, 0]
    else:
      token = tf.argmax(masked, axis=-1, output_type=tf.int32)            # [R]
    token = tf.where(done, PAD_ID, token)
    step_lp = tf.gather(log_probs, token, batch_dims=1)
    log_prob += tf.where(done, 0.0, step_lp)
    length += tf.cast(~done, tf.int32)
    tokens += _one_hot_at(position, big_l)[None] * token[:, None]
    return tokens, log_prob, length, done | (token == SEP_ID)

  tokens = tf.tile(_one_hot_at(0, big_l)[None] * CLS_ID, [r, 1])          # [R, L]
  state = choose(logits, 1, tokens, tf.zeros([r]), tf.zeros([r], tf.int32), tf.zeros([r], tf.bool))

  def cond(i, cache, tokens, log_prob, length, done):
    del cache, tokens, log_prob, length
    go = i < big_l - 1
    return go if lockstep else tf.logical_and(go, ~tf.reduce_all(done))

  def body(i, cache, tokens, log_prob, length, done):
    feed = tokens[:, i][:, None]                                          # [R, 1], [PAD] if done
    logits, cache = network.call_cached({"tokens": feed}, cache, start=i, row_mask=row_mask)
    return (i + 1, cache, *choose(logits[:, 0], i + 1, tokens, log_prob, length, done))

  _, _, tokens, log_prob, length, _ = tf.while_loop(
      cond, body, (tf.constant(1), cache, *state), maximum_iterations=big_l - 2)
  b = r // n
  out = {"tokens": tf.reshape(tokens, [b, n, big_l]), "log_prob": tf.reshape(log_prob, [b, n]),
         "length": tf.reshape(length, [b, n])}
  out["score"] = out["log_prob"]
  return _sort_by_score(out)


def _sort_by_score(out: dict) -> dict:
  order = tf.argsort(out["score"], axis=1, direction="DESCENDING", stable=True)
  return {k: tf.gather(t, order, batch_dims=1) for k, t in out.items()}


def _beam_search(network, features, options, row_mask, lockstep, first_banned):
  """Beam search with separate alive and finished sets (as tensor2tensor / Model Garden).

  Each step extends the K alive beams by every allowed token, keeps the 2K best extensions
  (so at least K do not end), moves those ending in [SEP] into the finished set (scored with
  the length penalty) and keeps the K best others alive. It stops when no alive beam can beat
  the K-th finished one any more: with alpha >= 0 and log-probs <= 0, an alive beam's final
  score is at most log_prob / lp(L - 1).
  """
  k, big_l, alpha = options.beam_size, options.max_len, options.length_penalty
  logits, cache, row_mask = _prefix(network, features, big_l, k, row_mask)
  r, v = logits.shape
  b = r // k
  neg = tf.fill([b, k], _NEG_INF)

  def choose(logits, position, alive_seq, alive_lp, fin_seq, fin_lp, fin_score, fin_len):
    log_probs = tf.reshape(tf.nn.log_softmax(logits), [b, k, v])          # [B, K, V]
    allowed = _allowed(v, position, big_l, first_banned)
    log_probs = tf.where(allowed[None, None], log_probs, _NEG_INF)
    total = tf.reshape(alive_lp[:, :, None] + log_probs, [b, k * v])       # [B, K·V]
    top_lp, flat = tf.math.top_k(total, k=2 * k)                           # [B, 2K]
    beam, token = flat // v, flat % v
    seq = tf.gather(alive_seq, beam, batch_dims=1)                         # [B, 2K, L]
    seq += _one_hot_at(position, big_l)[None, None] * token[:, :, None]
    ends = tf.logical_and(token == SEP_ID, top_lp > _NEG_INF)
    # Finished: the K best of the old finished set and the new endings, by score.
    new_score = tf.where(ends, top_lp / length_penalty(position, alpha), _NEG_INF)
    all_score = tf.concat([fin_score, new_score], 1)                       # [B, 3K]
    fin_score, pick = tf.math.top_k(all_score, k=k)
    gather = lambda old, new: tf.gather(tf.concat([old, new], 1), pick, batch_dims=1)
    fin_seq = gather(fin_seq, seq)
    fin_lp = gather(fin_lp, top_lp)
    fin_len = gather(fin_len, tf.fill([b, 2 * k], position))
    # Alive: the K best extensions that did not end.
    alive_lp, pick = tf.math.top_k(tf.where(ends, _NEG_INF, top_lp), k=k)  # [B, K]
    alive_seq = tf.gather(seq, pick, batch_dims=1)
    parent = tf.gather(beam, pick, batch_dims=1)                            # [B, K]
    return parent, alive_seq, alive_lp, fin_seq, fin_lp, fin_score, fin_len

  first = tf.tile(_one_hot_at(0, big_l)[None, None] * CLS_ID, [b, k, 1])  # [B, K, L]
  # Only beam 0 is alive at first, so the K beams do not start as K copies of one caption.
  alive_lp = tf.concat([tf.zeros([b, 1]), neg[:, 1:]], 1)
  parent, *state = choose(logits, 1, first, alive_lp, first, neg, neg,
                          tf.zeros([b, k], tf.int32))
  max_bound = length_penalty(big_l - 1, alpha)

  def reorder(cache, parent):
    rows = tf.reshape(parent + tf.range(b)[:, None] * k, [-1])             # [B·K]
    return tf.nest.map_structure(lambda t: tf.gather(t, rows), cache)

  def cond(i, cache, parent, alive_seq, alive_lp, fin_seq, fin_lp, fin_score, fin_len):
    del cache, parent, alive_seq, fin_seq, fin_lp, fin_len
    go = i < big_l - 1
    if lockstep:
      return go
    hopeless = fin_score[:, -1] >= tf.reduce_max(alive_lp, axis=1) / max_bound
    return tf.logical_and(go, ~tf.reduce_all(hopeless))

  def body(i, cache, parent, alive_seq, alive_lp, fin_seq, fin_lp, fin_score, fin_len):
    cache = reorder(cache, parent)
    feed = tf.reshape(alive_seq[:, :, i], [r, 1])
    logits, cache = network.call_cached({"tokens": feed}, cache, start=i, row_mask=row_mask)
    return (i + 1, cache, *choose(logits[:, 0], i + 1, alive_seq, alive_lp, fin_seq, fin_lp,
                                  fin_score, fin_len))

  out = tf.while_loop(cond, body, (tf.constant(1), cache, parent, *state),
                      maximum_iterations=big_l - 2)
  fin_seq, fin_lp, fin_score, fin_len = out[5:]
  return {"tokens": fin_seq, "log_prob": fin_lp, "score": fin_score, "length": fin_len}
