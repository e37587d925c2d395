"""Sampling draws from the right distribution: temperature, top-k and top-p, by frequency; beam against greedy.

A fixed toy distribution over 6 tokens is sampled once per row for many rows
(one decoding step, no EOS). The counts are compared with the distribution the
settings define, written here from the definitions, by a chi-square test at a
fixed seed (so the test is deterministic); the same counts are also checked to
reject the distribution a plausible bug would give (temperature ignored, the
filter ignored), so the test has the power to fail.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from topk_transformers import decoding

from test_decoding import EOS, ToyRNN, strip

# Shuffled so that the allowed tokens are not simply the first ids.
PROBS = np.array([0.14, 0.05, 0.3, 0.1, 0.25, 0.16])  # no ties: filter_logits keeps every tie at the k-th
ROWS = 20000


def fixed(logits):
  def step(state):
    return jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (state.cur_token.shape[0], len(logits))), state.cache
  return step


@functools.lru_cache(maxsize=None)
def sampler(topk, topp):
  """One compiled sampler per filter; the temperature is traced."""
  return jax.jit(lambda rng, t: decoding.temperature_sample(
      fixed(np.log(PROBS)), {"dummy": jnp.zeros((ROWS, 1))}, ROWS, 1, rng, temperature=t, topk=topk, topp=topp,
      eos_id=None))


def sample_counts(seed=0, temperature=1.0, topk=0, topp=0.0):
  seqs, log_probs = sampler(topk, topp)(jax.random.PRNGKey(seed), jnp.float32(temperature))
  tokens = np.asarray(seqs[:, 0])
  # The returned log-probability is the model's, unmodified by temperature or filtering.
  np.testing.assert_allclose(np.asarray(log_probs), np.log(PROBS)[tokens], rtol=1e-5)
  return np.bincount(tokens, minlength=len(PROBS))


def expected(temperature=1.0, topk=0, topp=0.0):
  """The sampling distribution from its definition: temper, keep the top k, then the smallest nucleus >= topp."""
  p = PROBS ** (1.0 / temperature)
  p /= p.sum()
  allowed = np.ones(len(p), bool)
  order = np.argsort(-p, kind="stable")
  if topk:
    allowed[order[topk:]] = False
  if 0.0 < topp < 1.0:
    q = np.where(allowed, p, 0.0) / np.where(allowed, p, 0.0).sum()
    mass, nucleus = 0.0, []
    for t in order:
      if allowed[t] and mass < topp:
        nucleus.append(t)
        mass += q[t]
    allowed &= np.isin(np.arange(len(p)), nucleus)
  p = np.where(allowed, p, 0.0)
  return p / p.sum()


def chi2_pvalue(counts, probs):
  """The chi-square p-value of ``counts`` under ``probs``; 0 if a token outside its support was drawn."""
  support = probs > 0
  if counts[~support].sum():
    return 0.0
  if support.sum() == 1:
    return 1.0
  return stats.chisquare(counts[support], probs[support] * counts.sum()).pvalue


@pytest.mark.parametrize("settings, wrong", [
    (dict(temperature=1.0), dict(temperature=2.0)),
    (dict(temperature=0.5), dict(temperature=1.0)),
    (dict(temperature=2.0), dict(temperature=1.0)),
    (dict(topk=3), dict()),
    (dict(topk=2, temperature=3.0), dict(topk=2)),
    (dict(topp=0.5), dict(topp=0.7)),  # 0.3 + 0.25 reach 0.5: two tokens; 0.7 would take three
    (dict(topp=0.7, temperature=2.0), dict(topp=0.7)),  # the nucleus is that of the tempered distribution
    (dict(topk=4, topp=0.6), dict(topk=4)),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_samples_follow_the_tempered_filtered_distribution(settings, wrong):
  counts = sample_counts(**settings)
  want, bad = expected(**settings), expected(**wrong)
  assert counts[want == 0].sum() == 0, f"drew tokens outside the allowed set: {counts} for {want}"
  assert chi2_pvalue(counts, want) > 1e-4, (counts, want)
  assert chi2_pvalue(counts, bad) < 1e-8, (counts, bad)  # the counts tell the wrong setting apart


def test_top_k_and_top_p_draw_only_the_allowed_tokens():
  assert set(np.flatnonzero(sample_counts(topk=1))) == {2}
  assert set(np.flatnonzero(sample_counts(topk=2, temperature=50.0))) == {2, 4}
  assert set(np.flatnonzero(sample_counts(topp=0.29))) == {2}  # the most likely token reaches 0.29 alone
  assert set(np.flatnonzero(sample_counts(topp=0.31))) == {2, 4}
  assert set(np.flatnonzero(sample_counts(topk=3, temperature=100.0))) == {2, 4, 5}  # nearly uniform, still 3
  assert set(np.flatnonzero(sample_counts(topp=0.7, temperature=0.1))) == {2}  # cold: the top token has > 0.7


def test_temperature_changes_the_samples_under_one_seed():
  lm = ToyRNN(vocab=6, length=5, seed=1)
  step = lm.tokens_to_logits(lm.w)
  sample = jax.jit(lambda t: decoding.temperature_sample(step, lm.init_cache(8), 8, 5, jax.random.PRNGKey(3),
                                                         temperature=t, eos_id=EOS)[0])
  by_t = {t: np.asarray(sample(t)) for t in (0.3, 1.0, 3.0)}
  assert not np.array_equal(by_t[0.3], by_t[1.0]) and not np.array_equal(by_t[1.0], by_t[3.0])
  np.testing.assert_array_equal(np.asarray(sample(1.0)), by_t[1.0])  # the seed fixes the samples
  greedy = np.asarray(decoding.greedy_decode(step, lm.init_cache(8), 8, 5, eos_id=EOS)[0])
  np.testing.assert_array_equal(np.asarray(sample(1e-4)), greedy)  # a cold temperature is the argmax


@pytest.mark.parametrize("seed", range(2))
def test_beam_search_is_at_least_as_good_as_greedy(seed):
  """With no length penalty, one beam follows the greedy path and keeps every complete hypothesis it passes,
  so its best is never worse than greedy's; more beams on this tiny model find at least as good."""
  lm = ToyRNN(vocab=6, length=5, seed=seed, eos_bias=0.5)
  step = lm.tokens_to_logits(lm.w)
  greedy, greedy_logp = decoding.greedy_decode(step, lm.init_cache(4), 4, 5, eos_id=EOS)
  for row in range(4):
    np.testing.assert_allclose(float(greedy_logp[row]), lm.log_prob(strip(np.asarray(greedy[row])), row), rtol=1e-5)
  for beams in (1, 3):
    seqs, scores = decoding.beam_search(step, lm.init_cache(4), 4, beams, 5, alpha=0.0, eos_id=EOS)
    best, best_score = np.asarray(seqs[:, 0]), np.asarray(scores[:, 0])
    for row in range(4):
      np.testing.assert_allclose(best_score[row], lm.log_prob(strip(best[row]), row), rtol=1e-5)
      assert best_score[row] >= float(greedy_logp[row]) - 1e-5, (beams, row)
      if beams == 1 and np.isclose(best_score[row], float(greedy_logp[row]), rtol=1e-6):
        assert strip(best[row]) == strip(np.asarray(greedy[row]))


def test_temperature_sample_defaults_pad_after_eos_and_check_their_arguments():
  """The defaults are temperature 1, no filter and T5's EOS (1); rows that finish are padded with 0."""
  lm = ToyRNN(vocab=6, length=6, seed=1, eos_bias=1.5)
  step = lm.tokens_to_logits(lm.w)
  key = jax.random.PRNGKey(3)
  default = np.asarray(decoding.temperature_sample(step, lm.init_cache(16), 16, 6, key)[0])
  explicit = np.asarray(decoding.temperature_sample(step, lm.init_cache(16), 16, 6, key, temperature=1.0, topk=0,
                                                    topp=0.0, eos_id=1)[0])
  np.testing.assert_array_equal(default, explicit)
  assert EOS == 1
  ended = [row for row in default if EOS in row[:-1]]
  assert len(ended) >= 4, default  # enough rows stop early for the padding to be seen
  for row in ended:
    np.testing.assert_array_equal(row[list(row).index(EOS) + 1:], 0)
  # Without EOS the rows run on: they differ from the default's after their first EOS.
  assert not np.array_equal(np.asarray(decoding.temperature_sample(step, lm.init_cache(16), 16, 6, key,
                                                                   eos_id=None)[0]), default)
  cache = lm.init_cache(1)
  with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1\.0$"):
    decoding.temperature_sample(step, cache, 1, 6, key, temperature=-1.0)
  for topk, topp in ((-1, 0.5), (0, 1.5), (0, -0.1)):
    with pytest.raises(ValueError, match=rf"^need topk >= 0 and 0 <= topp <= 1, got topk={topk}, topp={topp}$"):
      decoding.temperature_sample(step, cache, 1, 6, key, topk=topk, topp=topp)
  with pytest.raises(ValueError, match=r"^sampling with temperature > 0 needs an rng$"):
    decoding.temperature_sample(step, cache, 1, 6, None)
  with pytest.raises(ValueError, match=r"^eos_id must be a non-negative integer or None, got -1$"):
    decoding.temperature_sample(step, cache, 1, 6, key, eos_id=-1)
  # topp = 1 is allowed (and keeps every token).
  np.testing.assert_array_equal(
      np.asarray(decoding.temperature_sample(step, lm.init_cache(16), 16, 6, key, topp=1.0)[0]), default)


def test_each_step_sees_the_tokens_decoded_so_far():
  """``DecodingState.sequences`` holds the tokens before ``cur_index`` and 0 from it on (checked against NumPy)."""
  vocab, length = 7, 6
  weights = jnp.arange(1, length + 1)

  def step(state):
    # The next token is a function of the whole buffer: any token in the wrong place changes the sequence.
    nxt = (jnp.sum(state.sequences * weights, axis=1) + state.cur_index + state.cur_token[:, 0]) % vocab
    return 10.0 * jax.nn.one_hot(nxt, vocab), state.cache

  seqs = np.asarray(decoding.greedy_decode(step, {"dummy": jnp.zeros((2, 1))}, 2, length, eos_id=None)[0])
  buf, prev = np.zeros(length, np.int64), 0
  for i in range(length):
    buf[i] = prev = (np.sum(buf * np.arange(1, length + 1)) + i + prev) % vocab
  np.testing.assert_array_equal(seqs, np.stack([buf, buf]))
  assert len(set(buf)) > 2, buf
