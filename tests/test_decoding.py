"""Incremental decoding (m6t_tf.models.decoding): the KV cache computes the full model's function.

Small random networks (init_std 0.2, so that logits are decisive and captions varied) in the
configurations the gin files use: pre-RMSNorm + RoPE + SwiGLU with MoE attention and top-2
routing, and post-LN + learned positions + GeLU with "2 top-1" prototype routing. Capacity
factor 0.5 makes the training capacity drop tokens, so a decode that routed with it would change
captions with their batch (the batch-invariance test catches that).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from m6t_tf.models import decoding
from m6t_tf.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from m6t_tf.networks import m6_transformer

VOCAB = 21128
MAX_LEN = 8         # caption tokens incl. [CLS] and [SEP]
CONFIGS = {
    "pre_rms_rope_swiglu_moe_attention_top2": dict(
        norm="pre_rms", positions="rope", activation="swiglu", moe_attention=True,
        moe=m6_transformer.MoEConfig(num_experts=4, routing="top_k", k=2, capacity_factor=0.5)),
    "post_ln_learned_gelu_prototype": dict(
        norm="post_ln", positions="learned", activation="gelu", moe_attention=False,
        moe=m6_transformer.MoEConfig(num_experts=4, routing="prototype", k=2,
                                     capacity_factor=0.5)),
}


def make_network(config: dict, seed: int = 0) -> m6_transformer.M6Transformer:
  keras.utils.set_random_seed(seed)
  net = m6_transformer.M6Transformer(
      vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, head_size=16,
      intermediate_size=48, max_text_length=MAX_LEN - 1, dropout_rate=0.0, init_std=0.2,
      **config)
  net({"image": tf.zeros([1, 16, 16, 3], tf.uint8), "tokens": tf.ones([1, 2], tf.int32)})
  return net


def images(n: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, [n, 16, 16, 3], dtype=np.uint8)


def run(net, image, options, row_mask=None, lockstep=False, graph=False, first_banned=None):
  """Decodes eagerly (fast for a test: no trace) or in a `tf.function` as generate does."""
  mask = tf.ones([len(image)], tf.bool) if row_mask is None else tf.constant(row_mask)
  fn = lambda x, m: decoding.decode(net, {"image": x}, options, row_mask=m, lockstep=lockstep,
                                    first_banned=first_banned)
  if graph:
    fn = tf.function(fn)
  return {k: v.numpy() for k, v in fn(tf.constant(image), mask).items()}


def teacher_forced_log_prob(net, image, tokens) -> np.ndarray:
  """<float>[B, L-1]: log p(tokens[:, i+1] | image, tokens[:, :i+1]) by the full model."""
  logits = net({"image": tf.constant(image), "tokens": tf.constant(tokens[:, :-1])},
               moe_no_drop=True)
  return tf.gather(tf.nn.log_softmax(logits), tokens[:, 1:], batch_dims=2).numpy()


def allowed(position: int) -> np.ndarray:
  return decoding._allowed(VOCAB, position, MAX_LEN).numpy()  # pylint: disable=protected-access


@pytest.mark.slow
class CachedDecodingTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.nets = {name: make_network(config) for name, config in CONFIGS.items()}
    cls.image = images(3)
    cls.greedy = {name: run(net, cls.image, decoding.DecodeOptions(max_len=MAX_LEN))
                  for name, net in cls.nets.items()}

  def test_cache_equals_recomputing_the_prefix(self):
    """Greedy with the cache == greedy re-running the whole prefix each step; logits to 1e-5."""
    for name, net in self.nets.items():
      with self.subTest(name):
        out = self.greedy[name]
        tokens = np.zeros([3, MAX_LEN], np.int32)
        tokens[:, 0] = CLS_ID
        done = np.zeros(3, bool)
        for pos in range(1, MAX_LEN):
          logits = net({"image": tf.constant(self.image), "tokens": tf.constant(tokens[:, :pos])},
                        moe_no_drop=True)[:, -1].numpy()
          nxt = np.where(allowed(pos)[None], logits, -np.inf).argmax(-1)
          tokens[:, pos] = np.where(done, PAD_ID, nxt)
          done |= tokens[:, pos] == SEP_ID
        self.assertAllEqual(out["tokens"][:, 0], tokens)
        self.assertGreater(len(set(tokens[:, 1:].ravel())), 5, "degenerate captions")
        # Logits of every step from the cache, teacher-forced on those tokens.
        full = net({"image": tf.constant(self.image), "tokens": tf.constant(tokens[:, :-1])},
                   moe_no_drop=True).numpy()
        cache = net.init_cache(3, MAX_LEN - 1)
        step, cache = net.call_cached({"image": tf.constant(self.image),
                                       "tokens": tf.constant(tokens[:, :1])}, cache)
        cached = [step.numpy()]
        for i in range(1, MAX_LEN - 1):
          step, cache = net.call_cached({"tokens": tf.constant(tokens[:, i:i + 1])}, cache,
                                        start=i)
          cached.append(step.numpy())
        self.assertAllClose(np.concatenate(cached, 1), full, atol=1e-5, rtol=0)
        # Log-probs reported by the decoder are the model's.
        lp = teacher_forced_log_prob(net, self.image, tokens)
        n = out["length"][:, 0]
        want = [lp[b, :n[b]].sum() for b in range(3)]
        self.assertAllClose(out["log_prob"][:, 0], want, atol=1e-4)
        self.assertAllEqual(tokens[np.arange(3), n], [SEP_ID] * 3)

  def test_graph_and_lockstep_equal_eager_early_stop(self):
    """The `tf.function` that generate runs, all L - 2 steps (Horovod) == eager, early stop."""
    name = "post_ln_learned_gelu_prototype"
    graph = run(self.nets[name], self.image, decoding.DecodeOptions(max_len=MAX_LEN),
                lockstep=True, graph=True)
    for k, v in self.greedy[name].items():
      self.assertAllClose(graph[k], v, atol=1e-5, msg=k)
    options = decoding.DecodeOptions(method="beam", max_len=MAX_LEN, beam_size=3,
                                     length_penalty=0.6)
    a = run(self.nets[name], self.image, options)
    b = run(self.nets[name], self.image, options, lockstep=True)
    for k in a:
      self.assertAllClose(a[k], b[k], atol=1e-5, msg=k)

  def test_beam_size_one_is_greedy(self):
    name = "post_ln_learned_gelu_prototype"
    greedy = self.greedy[name]
    beam = run(self.nets[name], self.image, decoding.DecodeOptions(method="beam", beam_size=1,
                                                                   max_len=MAX_LEN))
    self.assertAllEqual(beam["tokens"], greedy["tokens"])
    self.assertAllClose(beam["log_prob"], greedy["log_prob"], atol=1e-5)

  def test_beam_scores_are_length_penalised_model_log_probs(self):
    net = self.nets["pre_rms_rope_swiglu_moe_attention_top2"]
    for alpha in (0.0, 1.0):
      with self.subTest(alpha=alpha):
        k = 4
        out = run(net, self.image, decoding.DecodeOptions(method="beam", beam_size=k,
                                                          length_penalty=alpha, max_len=MAX_LEN))
        tokens = out["tokens"].reshape(3 * k, MAX_LEN)
        lp = teacher_forced_log_prob(net, np.repeat(self.image, k, 0), tokens)
        n = out["length"].reshape(-1)
        log_prob = np.array([lp[i, :n[i]].sum() for i in range(3 * k)])
        self.assertAllClose(out["log_prob"].reshape(-1), log_prob, atol=1e-4)
        want = log_prob / ((5.0 + n) / 6.0) ** alpha
        self.assertAllClose(out["score"].reshape(-1), want, atol=1e-4)
        self.assertTrue(np.all(np.diff(out["score"], axis=1) <= 0), "beams not sorted")
        self.assertAllEqual(tokens[np.arange(3 * k), n], [SEP_ID] * (3 * k))
        for b in range(3):
          self.assertLen({tuple(t) for t in out["tokens"][b]}, k)
        if alpha == 0.0:
          greedy = self.greedy["pre_rms_rope_swiglu_moe_attention_top2"]
          # Beam search keeps the greedy path among its candidates' competitors: it is never worse.
          self.assertTrue(np.all(out["score"][:, 0] >= greedy["score"][:, 0] - 1e-5))

  def test_sampling(self):
    net = self.nets["post_ln_learned_gelu_prototype"]
    greedy = self.greedy["post_ln_learned_gelu_prototype"]
    top1 = run(net, self.image, decoding.DecodeOptions(method="sample", top_k=1, seed=3,
                                                       max_len=MAX_LEN))
    self.assertAllEqual(top1["tokens"], greedy["tokens"])
    options = decoding.DecodeOptions(method="sample", seed=7, num_samples=2, temperature=1.5,
                                     top_p=0.95, max_len=MAX_LEN)
    a, b = run(net, self.image, options), run(net, self.image, options)
    self.assertAllEqual(a["tokens"], b["tokens"])
    c = run(net, self.image, decoding.DecodeOptions(
        method="sample", seed=8, num_samples=2, temperature=1.5, top_p=0.95, max_len=MAX_LEN))
    self.assertNotAllEqual(a["tokens"], c["tokens"])
    self.assertNotAllEqual(a["tokens"][:, 0], greedy["tokens"][:, 0])
    lp = teacher_forced_log_prob(net, np.repeat(self.image, 2, 0), a["tokens"].reshape(6, -1))
    n = a["length"].reshape(-1)
    self.assertAllClose(a["log_prob"].reshape(-1), [lp[i, :n[i]].sum() for i in range(6)],
                        atol=1e-4)
    self.assertTrue(np.all(np.diff(a["score"], axis=1) <= 0))

  def test_first_token_rules(self):
    """The first token is never [SEP] (checked by every run above) nor a `first_banned` one."""
    name = "post_ln_learned_gelu_prototype"
    first = self.greedy[name]["tokens"][:, 0, 1]
    banned = np.zeros(VOCAB, bool)
    banned[first] = True
    out = run(self.nets[name], self.image, decoding.DecodeOptions(max_len=4),
              first_banned=banned)
    self.assertFalse(np.any(banned[out["tokens"][:, 0, 1]]))
    self.assertAllEqual(decoding.continuations(["[PAD]", "##s", "猫", "#"]),
                        [False, True, False, False])

  def test_filters(self):
    logits = tf.constant([[0.0, 1.0, 2.0, 3.0]])
    self.assertAllEqual(np.isfinite(decoding.filter_logits(
        logits, temperature=1.0, top_k=2, top_p=1.0).numpy()), [[False, False, True, True]])
    # softmax = [.032, .087, .237, .644]: p = 0.7 keeps the two largest, p = 0.6 the largest.
    for p, keep in ((0.7, [False, False, True, True]), (0.6, [False, False, False, True])):
      self.assertAllEqual(np.isfinite(decoding.filter_logits(
          logits, temperature=1.0, top_k=0, top_p=p).numpy()), [keep])
    self.assertAllClose(decoding.filter_logits(logits, temperature=2.0, top_k=0, top_p=1.0),
                        logits / 2)

  def test_bad_options(self):
    for kwargs, needle in ((dict(method="nucleus"), "decode method"),
                           (dict(max_len=2), "max_len=2"), (dict(max_len=99), "max_len=99"),
                           (dict(method="beam", beam_size=0), "beam_size=0"),
                           (dict(length_penalty=-1.0), "length_penalty=-1.0"),
                           (dict(temperature=0.0), "temperature=0.0"),
                           (dict(top_p=0.0), "top_p=0.0"), (dict(top_k=-1), "top_k=-1"),
                           (dict(num_samples=2), "num_samples=2")):
      with self.subTest(needle), self.assertRaisesRegex(ValueError, needle):
        decoding.DecodeOptions(**{"max_len": MAX_LEN, **kwargs}).check(MAX_LEN - 1, VOCAB)


@pytest.mark.slow
class BatchInvarianceTest(tf.test.TestCase):

  def test_caption_independent_of_batch(self):
    """An image's caption is the same alone, in a batch of 7 and in a batch of 64."""
    net = make_network(CONFIGS["pre_rms_rope_swiglu_moe_attention_top2"], seed=2)
    image = images(64, seed=5)
    options = decoding.DecodeOptions(max_len=MAX_LEN)
    big = run(net, image, options)["tokens"][:, 0]
    seven = run(net, image[10:17], options)["tokens"][:, 0]
    self.assertAllEqual(seven, big[10:17])
    self.assertAllEqual(run(net, image[12:13], options)["tokens"][:, 0], big[12:13])
    # Filler rows (masked out, as under Horovod) change nothing either.
    padded = run(net, np.concatenate([image[10:17], image[:3] * 0]), options,
                 row_mask=[True] * 7 + [False] * 3)["tokens"][:7, 0]
    self.assertAllEqual(padded, big[10:17])
    self.assertGreater(len({tuple(t) for t in big}), 20, "captions barely depend on the image")
    for layer in net.moe_sublayers:  # the last decode call dropped nothing
      self.assertEqual(float(layer.stats["dropped_fraction"].numpy()), 0.0)



@pytest.mark.slow
class OuterGroupsDecodingTest(tf.test.TestCase):

  def test_groups_decode_any_number_of_images(self):
    """num_groups=2 and 3: one image (a prefix of T = 17 positions, then T = 1 per step) and
    three (T = 51, then 3). Decoding drops nothing (C = T), so the groups change no caption:
    equal to the same weights with one group. (The trainer's evaluation decodes in the
    `tf.function` generate runs: test_eval_captions.)"""
    options = decoding.DecodeOptions(max_len=MAX_LEN)
    image = images(3, seed=4)
    moe = lambda groups: m6_transformer.MoEConfig(num_experts=4, routing="top_k", k=2,
                                                  capacity_factor=0.5, num_groups=groups)
    base = CONFIGS["post_ln_learned_gelu_prototype"]
    single = make_network(dict(base, moe=moe(1)), seed=3)
    want = run(single, image, options)
    self.assertGreater(len({tuple(t) for t in want["tokens"][:, 0]}), 1)
    for groups in (2, 3):
      with self.subTest(groups=groups):
        grouped = make_network(dict(base, moe=moe(groups)), seed=3)
        grouped.set_weights(single.get_weights())
        three = run(grouped, image, options)
        self.assertAllEqual(three["tokens"], want["tokens"])
        self.assertAllClose(three["log_prob"], want["log_prob"], atol=1e-5)
        one = run(grouped, image[1:2], options)
        self.assertAllEqual(one["tokens"], want["tokens"][1:2])
        self.assertAllClose(one["log_prob"], want["log_prob"][1:2], atol=1e-5)
        for layer in grouped.moe_sublayers:
          self.assertEqual(layer.num_groups, groups)
          self.assertEqual(float(layer.stats["dropped_fraction"].numpy()), 0.0)


if __name__ == "__main__":
  tf.test.main()
