"""The generic searches: beam search against brute force, EOS, greedy and sampling, on a toy model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import decoding

EOS = 1


class ToyRNN:
  """A tiny prefix-dependent language model whose cache holds a batch state and a scalar step counter.

  ``tokens_to_logits(w)`` takes the weights as (traced) arguments, so one compiled
  search serves every seed.
  """

  def __init__(self, vocab=4, hidden=8, length=3, seed=0, eos_bias=0.0):
    r = np.random.RandomState(seed)
    self.w = {
        "emb": r.randn(vocab, hidden).astype(np.float32),
        "rec": (r.randn(hidden, hidden) / np.sqrt(hidden)).astype(np.float32),
        "pos": r.randn(length, hidden).astype(np.float32),
        "out": (2.0 * r.randn(hidden, vocab)).astype(np.float32),
        "bias": np.where(np.arange(vocab) == EOS, eos_bias, 0.0).astype(np.float32),
    }
    # Each batch row starts from its own state, so rows decode differently.
    self.h0 = r.randn(16, hidden).astype(np.float32)
    self.h0[0] = 0.0

  def init_cache(self, batch):
    return {"h": jnp.asarray(self.h0[:batch]), "step": jnp.array(0, jnp.int32)}

  @staticmethod
  def tokens_to_logits(w):
    w = jax.tree.map(jnp.asarray, w)

    def step(state):
      h = jnp.tanh(state.cache["h"] @ w["rec"] + w["emb"][state.cur_token[:, 0]] + w["pos"][state.cur_index])
      return h @ w["out"] + w["bias"], {"h": h, "step": state.cache["step"] + 1}
    return step

  def log_prob(self, seq, row=0):
    """log p of the tokens of ``seq`` (NumPy, one sequence of batch row ``row``), token by token."""
    w, h = self.w, self.h0[row]
    prev, total = 0, 0.0
    for i, tok in enumerate(seq):
      h = np.tanh(h @ w["rec"] + w["emb"][prev] + w["pos"][i])
      logits = h @ w["out"] + w["bias"]
      total += logits[tok] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
      prev = tok
    return total


def complete_sequences(vocab, length):
  """Every complete output: tokens up to and including the first EOS, or ``length`` tokens without EOS."""
  other = [t for t in range(vocab) if t != EOS]
  for n in range(1, length + 1):
    for prefix in itertools.product(other, repeat=n - 1):
      yield prefix + (EOS,)
      if n == length:
        for last in other:
          yield prefix + (last,)


def strip(seq):
  seq = list(seq)
  return tuple(seq[:seq.index(EOS) + 1]) if EOS in seq else tuple(seq)


@jax.jit
def toy_beam9(w, cache, alpha):
  return decoding.beam_search(ToyRNN.tokens_to_logits(w), cache, 1, 9, 3, alpha=alpha, eos_id=EOS)


def test_beam_search_matches_brute_force():
  # vocab 4, length 3, beam 9 = 3^2: no hypothesis is ever pruned, so the K best returned must be
  # exactly the K best complete sequences by log p / ((5 + len) / 6)^alpha.
  k = 9
  for alpha, seed in itertools.product([0.0, 0.6, 3.0], range(2)):
    lm = ToyRNN(seed=seed)
    seqs, scores = toy_beam9(lm.w, lm.init_cache(1), alpha)
    brute = sorted(((lm.log_prob(s) / ((5 + len(s)) / 6) ** alpha, s) for s in complete_sequences(4, 3)), reverse=True)
    got = [strip(s) for s in np.asarray(seqs[0])]
    np.testing.assert_allclose(np.asarray(scores[0]), [b[0] for b in brute[:k]], rtol=1e-5, atol=1e-5)
    assert got[0] == brute[0][1]
    assert sorted(got) == sorted(b[1] for b in brute[:k])
    if alpha == 3.0:  # a strong length bonus: the winner runs to the maximum length
      assert len(got[0]) == 3


def test_beam_search_eos_padding_and_scores():
  # A larger vocabulary and a narrow beam: every returned beam is scored as the model scores its tokens,
  # beams come best first, and nothing follows an EOS.
  lm = ToyRNN(vocab=6, length=5, seed=3, eos_bias=1.0)
  alpha = 0.6
  seqs, scores = decoding.beam_search(lm.tokens_to_logits(lm.w), lm.init_cache(2), 2, 3, 5, alpha=alpha, eos_id=EOS)
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  assert seqs.shape == (2, 3, 5)
  saw_eos = False
  for b in range(2):
    assert np.all(np.diff(scores[b]) <= 0)
    for j in range(3):
      s = strip(seqs[b, j])
      assert np.all(seqs[b, j, len(s):] == 0)
      saw_eos |= s[-1] == EOS
      np.testing.assert_allclose(scores[b, j], lm.log_prob(s, b) / ((5 + len(s)) / 6) ** alpha, rtol=1e-5)
  assert not np.array_equal(seqs[0], seqs[1])
  assert saw_eos, "the toy model should end some beams with EOS; pick another seed"


def test_greedy_and_sampling_on_toy_model():
  lm = ToyRNN(vocab=6, length=5, seed=1)
  step = lm.tokens_to_logits(lm.w)
  seqs, logp = decoding.greedy_decode(step, lm.init_cache(1), 1, 5, eos_id=EOS)
  # Greedy is the argmax at every step of its own prefix.
  s = strip(np.asarray(seqs[0]))
  for i in range(len(s)):
    cand = [lm.log_prob(s[:i] + (t,)) for t in range(6)]
    assert int(np.argmax(cand)) == s[i]
  np.testing.assert_allclose(float(logp[0]), lm.log_prob(s), rtol=1e-5)
  # Sampling with a tiny nucleus keeps only the argmax: it is greedy.
  sampled, _ = decoding.temperature_sample(step, lm.init_cache(1), 1, 5, jax.random.PRNGKey(7), temperature=1.5,
                                           topp=1e-6, eos_id=EOS)
  np.testing.assert_array_equal(sampled, seqs)


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.1, 0.25, 0.15]]))
  kept = lambda out: np.asarray(out[0] > decoding.NEG_INF / 2)
  np.testing.assert_array_equal(kept(decoding.filter_logits(logits, topk=2)), [True, False, True, False])
  # Nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.25 reaches it.
  np.testing.assert_array_equal(kept(decoding.filter_logits(logits, topp=0.7)), [True, False, True, False])
  np.testing.assert_array_equal(kept(decoding.filter_logits(logits, topp=0.8)), [True, False, True, True])
  np.testing.assert_array_equal(kept(decoding.filter_logits(logits, topp=0.5)), [True, False, False, False])
  np.testing.assert_array_equal(kept(decoding.filter_logits(logits)), [True] * 4)


def _nucleus_reference(row, topp):
  """NumPy: the smallest set of most likely tokens whose probability reaches ``topp`` (ties kept together)."""
  p = np.exp(row - row.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  cutoff = row[order][before < topp].min()
  return row >= cutoff


def test_filter_logits_filters_each_row_of_a_batch_on_its_own():
  # Two rows whose nuclei differ in size: a cutoff or a sort shared across the batch would mix them.
  logits = jnp.log(jnp.array([[0.5, 0.1, 0.25, 0.15, 1e-3], [0.05, 0.3, 0.3, 0.2, 0.15]]))
  for topp in (0.5, 0.7, 0.8, 0.95):
    out = np.asarray(decoding.filter_logits(logits, topp=topp))
    for b in range(2):
      row = np.asarray(logits[b])
      keep = _nucleus_reference(row, topp)
      np.testing.assert_array_equal(out[b] > decoding.NEG_INF / 2, keep, err_msg=f"topp={topp} row {b}")
      np.testing.assert_array_equal(out[b][keep], row[keep])  # kept logits are unchanged
      np.testing.assert_array_equal(np.asarray(decoding.filter_logits(logits[b:b + 1], topp=topp))[0], out[b])
  both = np.asarray(decoding.filter_logits(logits, topk=3, topp=0.7))
  np.testing.assert_array_equal(both > decoding.NEG_INF / 2,
                                [[True, False, True, False, False], [False, True, True, False, False]])


def per_step(probs):
  """A model whose next-token distribution depends on the step alone: ``probs[min(step, len(probs) - 1)]``."""
  table = jnp.log(jnp.asarray(probs, jnp.float32))

  def step(state):
    row = table[jnp.minimum(state.cur_index, len(probs) - 1)]
    return jnp.broadcast_to(row, (state.cur_token.shape[0], row.shape[0])), state.cache
  return step


@pytest.mark.parametrize("beams, probs", [
    # [EOS] finishes first with log(0.5) / 1; the live [2] has nearly the same log p, which the penalty of a longer
    # output divides: [2, EOS] scores ~log(0.5) / (7/6), better.
    (1, [[1e-3, 0.5, 0.499], [1e-3, 0.998, 1e-3]]),
    # After step 1 the finished set is full ([EOS] and [2, EOS]); the best live [2, 2] can still win with EOS next
    # (it does), the second live [3, 2] cannot: the bound must come from the best live hypothesis.
    (2, [[1e-3, 0.5, 0.3, 0.199], [1e-3, 0.5, 0.45, 0.049], [1e-3, 0.997, 1e-3, 1e-3]]),
], ids=["1_beam", "2_beams"])
def test_beam_search_goes_on_while_the_length_penalty_can_lift_a_live_hypothesis(beams, probs):
  """A search that stopped on a looser bound of what a live hypothesis can reach (log p * max penalty, or a worse
  beam's log p) would return the hypotheses finished first; the brute-force best are longer."""
  alpha, length, vocab = 1.0, 3, len(probs[0])
  seqs, scores = decoding.beam_search(per_step(probs), {"h": jnp.zeros((1, 1))}, 1, beams, length, alpha=alpha,
                                      eos_id=EOS)
  log_p = lambda s: sum(np.log(probs[min(i, len(probs) - 1)][t]) for i, t in enumerate(s))
  brute = sorted(((log_p(s) / ((5 + len(s)) / 6) ** alpha, s) for s in complete_sequences(vocab, length)),
                 reverse=True)[:beams]
  assert max(len(s) for _, s in brute) > 1  # the best include a hypothesis longer than the first finished
  assert [strip(s) for s in np.asarray(seqs[0])] == [s for _, s in brute]
  np.testing.assert_allclose(np.asarray(scores[0]), [score for score, _ in brute], rtol=1e-5)


def test_beam_search_expands_the_2k_best_continuations_as_t5x_does():
  """Both sets are fed from the ``2 * beam_size`` best continuations (the docstring; T5X's search): with one beam, a
  complete [EOS] that is only the third best first token is never seen, although it scores best of all."""
  probs = [[1e-4, 0.2, 0.5, 0.2999], [0.1, 0.25, 0.3, 0.35]]
  seqs, scores = decoding.beam_search(per_step(probs), {"h": jnp.zeros((1, 1))}, 1, 1, 2, alpha=0.0, eos_id=EOS)
  assert strip(np.asarray(seqs[0, 0])) == (2, 3)  # [EOS] (log 0.2) would beat it (log 0.175)
  np.testing.assert_allclose(float(scores[0, 0]), np.log(0.5 * 0.35), rtol=1e-6)
  # With two beams, EOS is among the 4 continuations of step 0 and wins.
  seqs, scores = decoding.beam_search(per_step(probs), {"h": jnp.zeros((1, 1))}, 1, 2, 2, alpha=0.0, eos_id=EOS)
  assert strip(np.asarray(seqs[0, 0])) == (EOS,)
  np.testing.assert_allclose(float(scores[0, 0]), np.log(0.2), rtol=1e-6)


def test_beam_search_without_eos_keeps_the_best_full_length_sequences():
  """``eos_id=None``: every hypothesis runs to the full length; with 16 = 4^2 beams nothing is pruned, so the beams
  are the 16 best of all 64 sequences (brute force), EOS's id an ordinary token."""
  lm = ToyRNN(seed=1)
  seqs, scores = decoding.beam_search(ToyRNN.tokens_to_logits(lm.w), lm.init_cache(1), 1, 16, 3, alpha=0.6,
                                      eos_id=None)
  brute = sorted(((lm.log_prob(s) / (8 / 6) ** 0.6, s) for s in itertools.product(range(4), repeat=3)),
                 reverse=True)[:16]
  assert [tuple(s) for s in np.asarray(seqs[0])] == [s for _, s in brute]
  np.testing.assert_allclose(np.asarray(scores[0]), [score for score, _ in brute], rtol=1e-5)
  assert any(EOS in s[:-1] for _, s in brute)  # an EOS mid-sequence did not end it


def test_beam_search_checks_its_arguments():
  step, cache = per_step([[0.5, 0.5]]), {"h": jnp.zeros((1, 1))}
  for bad, match in ((dict(beam_size=0), "beam_size must be >= 1"), (dict(alpha=-0.5), "alpha must be >= 0"),
                     (dict(eos_id=-1), "eos_id must be a non-negative integer"),
                     (dict(max_decode_length=0), "max_decode_length must be a positive integer")):
    with pytest.raises(ValueError, match=match):
      decoding.beam_search(step, cache, **{"batch_size": 1, "beam_size": 2, "max_decode_length": 3, **bad})


def test_beam_search_defaults_are_t5s_length_penalty_and_eos():
  lm = ToyRNN(vocab=6, length=5, seed=3, eos_bias=1.0)
  search = jax.jit(lambda w, c, **kw: decoding.beam_search(ToyRNN.tokens_to_logits(w), c, 2, 3, 5, **kw),
                   static_argnames=("alpha", "eos_id"))
  default = search(lm.w, lm.init_cache(2))
  jax.tree.map(np.testing.assert_array_equal, default, search(lm.w, lm.init_cache(2), alpha=0.6, eos_id=1))
  # Both matter here: some beams are longer than one token (the penalty changes their scores), some end at EOS early.
  lengths = [len(strip(s)) for s in np.asarray(default[0]).reshape(-1, 5)]
  assert max(lengths) > 1 and min(lengths) < 5 and EOS == 1
