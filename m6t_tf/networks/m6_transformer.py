"""The M6 Transformer over `[16 image patches ; caption tokens]` (arXiv 2105.15082, appendix A.1).

Patches attend to each other (bidirectionally); caption tokens are causal and see every patch.
The network returns next-token logits for the caption positions only.

Parameter count (tied embeddings, post-LN, FFN experts without biases), for V vocabulary,
P patch width, S = 16 + L positions, N layers, H·d = M, X MoE layers:

    embeddings  V·M + S·M + P·M + M (patch bias) + 2·M (embedding LayerNorm) + V (output bias)
    attention   N · (4·M·M + 4·M + 2·M)        Q, K, V, output with biases, and its LayerNorm
    dense FFN   (N − X) · (2·M·I + 2·M)
    MoE FFN     X · (M·E + 2·E·M·I + 2·M)      router, experts, LayerNorm
`tools/plan.py` implements the general formula (RMSNorm, SwiGLU, MoE attention) and its test
checks it against `count_params()` of the built model for every gin file.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from m6t_tf.layers import attention as attention_lib
from m6t_tf.layers import dropout as dropout_lib
from m6t_tf.layers import embeddings
from m6t_tf.layers import feedforward
from m6t_tf.layers import moe as moe_lib
from m6t_tf.layers import moe_options
from m6t_tf.layers import normalization

PLACEMENTS = ("all", "every_k", "last_k", "none")
#: Recomputation (`train.remat`): what each block recomputes in the backward pass instead of
#: storing (a list of block names recomputes those blocks whole).
REMATS = ("none", "block", "attention", "experts")
NORMS = ("post_ln", "pre_rms")
POSITIONS = ("learned", "rope")


#: Keyword arguments of every MoE layer of the network, configured by gin (`MoEConfig.*`): the
#: gin-bound fields of `MoEOptions` (every registered router's options included), with the
#: base model's E = 32 as the default of `num_experts`. `kwargs()` gives the layer's arguments.
MoEConfig = moe_options.gin_config_class("MoEConfig", __name__, num_experts=32)


def moe_layer_indices(num_layers: int, placement: str, every: int) -> list[int]:
  """Which of the N layers have an MoE FFN.

  "all": every layer (M6-T); "every_k": the last of every K layers, i.e. K-1, 2K-1, ... (the
  second paper's Every-K); "last_k": the last K layers; "none": the dense baseline.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"moe_placement={placement!r}; allowed: {PLACEMENTS}")
  if placement == "all":
    return list(range(num_layers))
  if placement == "none":
    return []
  if every < 1:
    raise ValueError(f"moe_every={every} must be >= 1 for placement {placement!r}")
  if placement == "every_k":
    return [i for i in range(num_layers) if (i + 1) % every == 0]
  return list(range(max(0, num_layers - every), num_layers))


def prefix_causal_mask(num_patches: int, text_length: int) -> tf.Tensor:
  """<bool>[S, S]: patches see patches; text position i sees all patches and text ≤ i."""
  s = num_patches + text_length
  i = tf.range(s)[:, None]
  j = tf.range(s)[None, :]
  return tf.logical_or(j < num_patches, tf.logical_and(i >= num_patches, j <= i))


def _sum_losses(losses) -> tf.Tensor:
  """<float32>[] sum of loss tensors (0 for none): a fixed output of recomputed functions."""
  return tf.add_n([tf.cast(l, tf.float32) for l in losses]) if losses else tf.zeros([], tf.float32)


@keras.saving.register_keras_serializable(package="m6t_tf")
class TransformerBlock(keras.layers.Layer):
  """Self-attention and FFN (dense or MoE), post-LN (BERT/M6) or pre-RMSNorm (LLaMA-2)."""

  def __init__(self, *, num_heads: int, head_size: int, intermediate_size: int, norm: str,
               activation: str, use_rope: bool, dropout_rate: float, init_std: float,
               moe: Optional[dict] = None, moe_attention: Optional[dict] = None, **kwargs):
    super().__init__(**kwargs)
    if norm not in NORMS:
      raise ValueError(f"norm={norm!r}; allowed: {NORMS}")
    self.num_heads, self.head_size = num_heads, head_size
    self.intermediate_size = intermediate_size
    self.norm, self.activation, self.use_rope = norm, activation, use_rope
    self.dropout_rate, self.init_std = dropout_rate, init_std
    self.moe = dict(moe) if moe else None
    self.moe_attention = dict(moe_attention) if moe_attention else None
    self.attention = attention_lib.SelfAttention(
        num_heads, head_size, init_std=init_std, dropout_rate=dropout_rate, use_rope=use_rope,
        moe_projections=self.moe_attention, name="attention")
    if self.moe:
      self.ffn = moe_lib.MoE(intermediate_size=intermediate_size, activation=activation,
                             init_std=init_std, name="moe", **self.moe)
    else:
      self.ffn = feedforward.FeedForward(intermediate_size, activation=activation,
                                         init_std=init_std, name="ffn")
    make_norm = ((lambda n: keras.layers.LayerNormalization(epsilon=1e-12, name=n))
                 if norm == "post_ln" else (lambda n: normalization.RMSNorm(name=n)))
    self.attention_norm = make_norm("attention_norm")
    self.ffn_norm = make_norm("ffn_norm")
    self._dropout = dropout_lib.Dropout(dropout_rate)
    # One seed per training call; every random draw of the block derives from it (see
    # `m6t_tf.layers.dropout`), so a recomputed forward draws the same masks. Its state is an
    # RNG state the trainer reseeds each step from (seed, rank, step).
    self.seed_generator = keras.random.SeedGenerator(name="seed_generator")
    #: "none" | "block" | "attention" | "experts": set by `M6Transformer.set_remat`.
    self.remat = "none"

  def build(self, input_shape):
    for layer in (self.attention, self.ffn, self.attention_norm, self.ffn_norm):
      layer.build(input_shape)
    self.built = True

  def call(self, x, mask, training=None, token_mask=None, cache=None, cache_index=None,
           moe_capacity=None):
    """<float>[B, S, M] -> <float>[B, S, M]; with a KV `cache`, (output, updated cache).

    `cache`, `cache_index` and `moe_capacity` are those of `SelfAttention.call`; `moe_capacity`
    also sets C of the MoE FFN. In training, `self.remat` selects what is recomputed in the
    backward pass; the MoE losses of the block are then returned by the recomputed functions
    and added here, so their gradient reaches the routers.
    """
    if cache is not None:
      return self._forward(x, mask, training, token_mask, cache, cache_index, moe_capacity)
    seed = self.seed_generator.next() if training else None
    remat = self.remat if training else "none"
    emitted = []

    def body(t):
      out, losses = self._forward(t, mask, training, token_mask, None, None, moe_capacity,
                                  remat=remat)
      emitted.append(bool(losses))
      return out, _sum_losses(losses)

    with dropout_lib.seed_scope(seed):
      out, loss = dropout_lib.maybe_remat(body, remat == "block")(x)
    if emitted and emitted[0]:
      self.add_loss(loss)
    return out

  def _forward(self, x, mask, training, token_mask, cache, cache_index, moe_capacity,
               remat="none"):
    """The block's computation. Without a cache returns (output, [MoE loss tensors])."""
    probe = self.__dict__.get("_probe")  # set by M6Transformer.start_probe, never in graphs
    record = (lambda name, t: probe.append((f"{self.name}/{name}", t))) if probe is not None \
        else (lambda name, t: None)
    ffn_name = "moe" if self.moe else "ffn"
    losses = []

    def sublayer(fn, rematerialize):
      """Runs fn(t) with its own seed (and, without a cache, its losses collected)."""
      if cache is not None:
        return fn
      def unit(t):
        with moe_lib.collect_losses() as sink:
          out = fn(t)
        emitted.append(bool(sink))
        return out, _sum_losses(sink)
      emitted = []
      run = dropout_lib.maybe_remat(unit, rematerialize)

      def call(t):
        out, loss = run(t)
        if emitted[0]:
          losses.append(loss)
        return out
      return call

    attend = sublayer(
        lambda t: self.attention(t, mask, training=training, token_mask=token_mask, cache=cache,
                                 cache_index=cache_index, moe_capacity=moe_capacity),
        remat == "attention")
    ffn_kwargs = {"capacity": moe_capacity} if self.moe else {}
    # "experts": the expert FFNs of an MoE layer (between its all-to-alls), a dense FFN whole.
    if self.moe:
      self.ffn.remat_experts = remat == "experts"
    ffn = sublayer(lambda t: self.ffn(t, training=training, token_mask=token_mask, **ffn_kwargs),
                   remat == "experts" and not self.moe)
    if self.norm == "post_ln":
      h = attend(x)
      if cache is not None:
        h, cache = h
      record("attention", h)
      x = self.attention_norm(x + self._dropout(h, training=training))
      h = ffn(x)
      record(ffn_name, h)
      out = self.ffn_norm(x + self._dropout(h, training=training))
      return (out, cache) if cache is not None else (out, losses)
    h = attend(self.attention_norm(x))
    if cache is not None:
      h, cache = h
    record("attention", h)
    x = x + self._dropout(h, training=training)
    h = ffn(self.ffn_norm(x))
    record(ffn_name, h)
    out = x + self._dropout(h, training=training)
    return (out, cache) if cache is not None else (out, losses)

  def get_config(self):
    config = super().get_config()
    config.update(num_heads=self.num_heads, head_size=self.head_size,
                  intermediate_size=self.intermediate_size, norm=self.norm,
                  activation=self.activation, use_rope=self.use_rope,
                  dropout_rate=self.dropout_rate, init_std=self.init_std, moe=self.moe,
                  moe_attention=self.moe_attention)
    return config


@keras.saving.register_keras_serializable(package="m6t_tf")
class M6Transformer(keras.layers.Layer):
  """Inputs `{"image" <uint8>[B,H,W,3] | "patch_features" <float>[B,16,P], "tokens" <int32>[B,L]}`.

  Returns logits <float32>[B, L, V] where position i predicts caption token i+1 (the caller
  feeds `tokens[:, :-1]` and scores against `tokens[:, 1:]`).

  Args:
    vocab_size: V (21128, BERT-Chinese).
    hidden_size: M.  num_layers: N.  num_heads, head_size: H × d (16 × 64 in M6).
    intermediate_size: I of dense FFNs and experts.
    max_text_length: longest caption input (positions table is 16 + this).
    norm: "post_ln" (BERT/M6) or "pre_rms" (second paper).
    activation: "relu" | "gelu" | "swiglu".
    positions: "learned" (M6) or "rope" (second paper).
    dropout_rate: on attention probabilities and on the attention/FFN outputs (0.1).
    init_std: truncated-normal std (0.02; 0.002 at 1T).
    moe: an `MoEConfig` (or dict); None with placement "none" gives the dense baseline.
    moe_placement: "all" | "every_k" | "last_k" | "none".  moe_every: K.
    moe_attention: make Q, K, V, output MoEs of linear experts in the MoE layers (paper §3.4).
  """

  def __init__(self, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
               head_size: int, intermediate_size: int, max_text_length: int,
               norm: str = "post_ln", activation: str = "gelu", positions: str = "learned",
               dropout_rate: float = 0.1, init_std: float = 0.02, moe=None,
               moe_placement: str = "all", moe_every: int = 4, moe_attention: bool = False,
               **kwargs):
    super().__init__(**kwargs)
    if positions not in POSITIONS:
      raise ValueError(f"positions={positions!r}; allowed: {POSITIONS}")
    if num_heads * head_size < 1 or hidden_size % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
    if isinstance(moe, MoEConfig):
      moe = moe.kwargs()
    if moe_placement != "none" and not moe:
      raise ValueError(f"moe_placement={moe_placement!r} needs an MoE config (moe=...)")
    self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
    self.num_heads, self.head_size = num_heads, head_size
    self.intermediate_size, self.max_text_length = intermediate_size, max_text_length
    self.norm, self.activation, self.positions = norm, activation, positions
    self.dropout_rate, self.init_std = dropout_rate, init_std
    self.moe = dict(moe) if moe else None
    self.moe_placement, self.moe_every, self.moe_attention = moe_placement, moe_every, moe_attention
    self.moe_layers = moe_layer_indices(num_layers, moe_placement, moe_every)

    init = keras.initializers.TruncatedNormal(stddev=init_std)
    self.token_embedding = keras.layers.Embedding(vocab_size, hidden_size,
                                                  embeddings_initializer=init, name="token_embedding")
    self.patch_embedding = embeddings.PatchEmbedding(hidden_size, init_std=init_std,
                                                     name="patch_embedding")
    self.position_embedding = (
        embeddings.PositionEmbedding(embeddings.NUM_PATCHES + max_text_length, init_std=init_std,
                                     name="position_embedding") if positions == "learned" else None)
    self.embedding_norm = (keras.layers.LayerNormalization(epsilon=1e-12, name="embedding_norm")
                           if norm == "post_ln" else None)
    self.final_norm = normalization.RMSNorm(name="final_norm") if norm == "pre_rms" else None
    self._dropout = dropout_lib.Dropout(dropout_rate)
    self.blocks = []
    for i in range(num_layers):
      is_moe = i in self.moe_layers
      self.blocks.append(TransformerBlock(
          num_heads=num_heads, head_size=head_size, intermediate_size=intermediate_size,
          norm=norm, activation=activation, use_rope=positions == "rope",
          dropout_rate=dropout_rate, init_std=init_std, moe=self.moe if is_moe else None,
          moe_attention=self.moe if (is_moe and moe_attention) else None, name=f"block_{i}"))

  def build(self, input_shape):
    image_shape = input_shape.get("image", input_shape.get("patch_features"))
    self.token_embedding.build(None)
    self.patch_embedding.build(image_shape)
    s_shape = (None, embeddings.NUM_PATCHES + self.max_text_length, self.hidden_size)
    if self.position_embedding is not None:
      self.position_embedding.build(s_shape)
    for layer in (self.embedding_norm, self.final_norm, *self.blocks):
      if layer is not None:
        layer.build(s_shape)
    self.output_bias = self.add_weight(name="output_bias", shape=(self.vocab_size,),
                                       initializer="zeros")
    self.built = True

  def call(self, inputs, training=None, moe_no_drop=False):
    """Logits <float32>[B, L, V]; `moe_no_drop` routes with C = T (no token dropped)."""
    tokens = inputs["tokens"]                                                # [B, L]
    image = inputs["image"] if "image" in inputs else inputs["patch_features"]
    length = tokens.shape[1]
    if length is None or length > self.max_text_length:
      raise ValueError(f"caption input length {length} must be static and <= "
                       f"max_text_length={self.max_text_length}")
    patches = self.patch_embedding(image)                                   # [B, 16, M]
    text = self.token_embedding(tokens)                                     # [B, L, M]
    x = tf.concat([tf.cast(patches, self.compute_dtype), tf.cast(text, self.compute_dtype)], 1)
    if self.position_embedding is not None:
      x = self.position_embedding(x)
    if self.embedding_norm is not None:
      x = self.embedding_norm(x)
    x = self._dropout(x, training=training)
    num_patches = embeddings.NUM_PATCHES
    mask = prefix_causal_mask(num_patches, length)                          # [S, S]
    # Padding caption tokens are not routed (they would take expert capacity for nothing), nor
    # are the patches of all-padding filler rows (evaluation pads its last batches with them).
    real_example = tokens[:, :1] != 0                                       # [B, 1]
    patch_mask = tf.broadcast_to(real_example, tf.shape(patches)[:2])
    token_mask = tf.concat([patch_mask, tokens != 0], axis=1)
    probe = self.__dict__.get("_probe")
    if probe is not None:
      probe.append(("embeddings", x))
    capacity = self._no_drop_capacity(x) if moe_no_drop else None
    for block in self.blocks:
      x = block(x, mask, training=training, token_mask=token_mask, moe_capacity=capacity)
    return self._logits(x[:, num_patches:])

  def _logits(self, text_states):
    if self.final_norm is not None:
      text_states = self.final_norm(text_states)
    text_states = tf.cast(text_states, tf.float32)                          # [B, L, M]
    # Tied output embedding; logits in float32 so the softmax over 21128 entries is stable.
    table = tf.cast(self.token_embedding.embeddings, tf.float32)
    return tf.einsum("BLM,VM->BLV", text_states, table) + tf.cast(self.output_bias, tf.float32)

  @staticmethod
  def _no_drop_capacity(x) -> int:
    """C = T, the tokens of this call: no expert can overflow, so no token is ever dropped and
    each token's output does not depend on the other tokens of the call (batch invariance)."""
    b, s = x.shape[0], x.shape[1]
    if b is None or s is None:
      raise ValueError(f"decoding needs static batch and length, got {x.shape}")
    return b * s

  def init_cache(self, batch_size: int, text_length: Optional[int] = None) -> list[dict]:
    """An empty KV cache: per block {"key", "value": zeros <float>[B, 16 + L, H, d]}.

    Args:
      batch_size: B (rows of the decode batch, beams included).
      text_length: caption positions to hold (default `max_text_length`).
    """
    length = text_length or self.max_text_length
    if length > self.max_text_length:
      raise ValueError(f"text_length={length} exceeds max_text_length={self.max_text_length}")
    shape = [batch_size, embeddings.NUM_PATCHES + length, self.num_heads, self.head_size]
    return [{"key": tf.zeros(shape, self.compute_dtype),
             "value": tf.zeros(shape, self.compute_dtype)} for _ in self.blocks]

  def call_cached(self, inputs, cache: list[dict], *, start=0, row_mask=None):
    """Runs new positions through every block, reading and extending the KV cache.

    The prefix call passes the image and `tokens` from caption position 0 (the patches and
    `[CLS]` are encoded once); each decode step then passes only `tokens` <int32>[B, 1] at
    caption position `start`. Every MoE layer routes with C = T (see `_no_drop_capacity`), so
    no token is dropped and a caption does not depend on the rest of its batch. Inference only
    (no dropout).

    Args:
      inputs: {"tokens": <int32>[B, L]} plus "image" or "patch_features" for the prefix.
      cache: from `init_cache` (or the previous call).
      start: caption position of `tokens[:, 0]` (int or <int32>[] tensor); 0 with the image.
      row_mask: optional <bool>[B]: False rows (filler) are not routed by the MoE layers.

    Returns:
      (logits <float32>[B, L, V], updated cache).
    """
    tokens = inputs["tokens"]                                               # [B, L]
    length = tokens.shape[1]
    num_patches = embeddings.NUM_PATCHES
    x = tf.cast(self.token_embedding(tokens), self.compute_dtype)           # [B, L, M]
    token_mask = tokens != 0
    with_image = "image" in inputs or "patch_features" in inputs
    if with_image:
      image = inputs["image"] if "image" in inputs else inputs["patch_features"]
      patches = tf.cast(self.patch_embedding(image), self.compute_dtype)    # [B, 16, M]
      x = tf.concat([patches, x], axis=1)                                   # [B, 16 + L, M]
      token_mask = tf.concat([tf.ones(tf.shape(patches)[:2], tf.bool), token_mask], axis=1)
      first = 0                                                             # absolute position
    else:
      first = num_patches + start
    if row_mask is not None:
      token_mask = tf.logical_and(token_mask, row_mask[:, None])
    s = x.shape[1]
    positions = first + tf.range(s)                                         # [S]
    if self.position_embedding is not None:
      x = x + tf.cast(tf.gather(self.position_embedding.embeddings, positions), x.dtype)[None]
    if self.embedding_norm is not None:
      x = self.embedding_norm(x)
    # Key j is visible to the query at absolute position p iff j is a patch, or p is a caption
    # position and j <= p: `prefix_causal_mask`, rows [first, first + S) of the full mask.
    keys = tf.range(cache[0]["key"].shape[1])[None, :]                      # [1, S_cache]
    query = positions[:, None]                                              # [S, 1]
    mask = tf.logical_or(keys < num_patches,
                         tf.logical_and(query >= num_patches, keys <= query))  # [S, S_cache]
    capacity = self._no_drop_capacity(x)
    new_cache = []
    for block, block_cache in zip(self.blocks, cache):
      x, block_cache = block(x, mask, training=False, token_mask=token_mask, cache=block_cache,
                             cache_index=first, moe_capacity=capacity)
      new_cache.append(block_cache)
    return self._logits(x[:, s - length:]), new_cache

  def set_remat(self, remat) -> None:
    """What the blocks recompute in the backward pass instead of storing (`train.remat`).

    Args:
      remat: "none"; "block" (every block whole: attention, FFN and, in MoE layers, routing and
        both all-to-alls, which the backward pass therefore repeats); "attention" (the
        self-attention of every block); "experts" (the expert FFNs of MoE layers, between their
        all-to-alls, and dense FFNs whole); or a list of block names ("block_0", ...) to
        recompute whole.
    Routing is computed again from the same inputs and weights, so it is identical; dropout
    masks are drawn again from the same seeds (`m6t_tf.layers.dropout`).
    """
    names = [b.name for b in self.blocks]
    if isinstance(remat, str):
      if remat not in REMATS:
        raise ValueError(f"remat={remat!r}; allowed: {REMATS} or a list of block names "
                         f"(e.g. ['block_0'])")
      modes = {name: remat for name in names}
    else:
      unknown = [n for n in remat if n not in names]
      if unknown:
        raise ValueError(f"remat names {unknown} are not blocks of this network; its blocks: "
                         f"{names[0]} … {names[-1]}")
      modes = {name: "block" if name in remat else "none" for name in names}
    for block in self.blocks:
      block.remat = modes[block.name]

  def start_probe(self) -> list:
    """Records (name, output) of the embeddings and of each block's attention and FFN during
    the next eager calls, to find where values first go non-finite. Returns the record list."""
    probe = []
    for layer in (self, *self.blocks):
      object.__setattr__(layer, "_probe", probe)  # plain attribute: not tracked by Keras
    return probe

  def stop_probe(self) -> None:
    for layer in (self, *self.blocks):
      object.__setattr__(layer, "_probe", None)

  @property
  def moe_sublayers(self) -> list:
    """Every MoE layer of the network (FFN and, with MoE attention, the projections)."""
    out = []
    for block in self.blocks:
      if isinstance(block.ffn, moe_lib.MoE):
        out.append(block.ffn)
      if block.moe_attention:
        a = block.attention
        out.extend([a.query, a.key, a.value, a.output_proj])
    return out

  def get_config(self):
    config = super().get_config()
    config.update(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                  num_layers=self.num_layers, num_heads=self.num_heads, head_size=self.head_size,
                  intermediate_size=self.intermediate_size, max_text_length=self.max_text_length,
                  norm=self.norm, activation=self.activation, positions=self.positions,
                  dropout_rate=self.dropout_rate, init_std=self.init_std, moe=self.moe,
                  moe_placement=self.moe_placement, moe_every=self.moe_every,
                  moe_attention=self.moe_attention)
    return config
