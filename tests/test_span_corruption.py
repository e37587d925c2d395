"""Span corruption: lengths, noise statistics, sentinel structure, determinism."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from topk_transformers.data import span_corruption as sc

BASE_SIZE = 1000  # ids 0..999 are ordinary tokens, 1000..1099 the extra ids
EXTRA_IDS = 100


class IdVocab(seqio.PassThroughVocabulary):
  """Token ids are their own encoding; 100 extra ids on top, like T5's vocabulary."""

  def __init__(self, size=BASE_SIZE, extra_ids=EXTRA_IDS):
    super().__init__(size=size, eos_id=1)
    self._extra_ids = extra_ids


VOCAB = IdVocab()
FEATURES = {"inputs": seqio.Feature(VOCAB, add_eos=True), "targets": seqio.Feature(VOCAB, add_eos=True)}


def is_sentinel(ids):
  return np.asarray(ids) >= BASE_SIZE


def reconstruct(inputs, targets):
  """Puts the spans of ``targets`` back in place of the sentinels of ``inputs``."""
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  in_sent = np.flatnonzero(is_sentinel(inputs))
  tg_sent = np.flatnonzero(is_sentinel(targets))
  # Sentinel i is <extra_id_i> = vocab_size - 1 - i, in order, in both sequences.
  expected = VOCAB.vocab_size - 1 - np.arange(len(in_sent))
  np.testing.assert_array_equal(inputs[in_sent], expected)
  np.testing.assert_array_equal(targets[tg_sent], expected)
  assert len(tg_sent) == len(in_sent) and tg_sent[0] == 0, "targets must start with <extra_id_0>"
  spans = np.split(targets, tg_sent[1:])
  pieces, start = [], 0
  for pos, span in zip(in_sent, spans):
    pieces += [inputs[start:pos], span[1:]]
    start = pos + 1
  pieces.append(inputs[start:])
  return np.concatenate(pieces)


def seeds(a, b):
  return [tf.constant([a, a + 1]), tf.constant([b, b + 1])]


def test_random_spans_helper_gives_t5_lengths():
  assert sc.random_spans_helper(512, 0.15, 3.0) == (568, 114)
  assert sc.random_spans_helper(128, 0.15, 3.0) == (141, 29)
  with pytest.raises(ValueError, match="noise_density"):
    sc.random_spans_helper(512, 1.5, 3.0)


@pytest.mark.parametrize("length", [568, 5000])
def test_noise_mask_statistics(length):
  masks = np.stack([sc.random_spans_noise_mask(length, 0.15, seeds(s, 1000 + s), 3.0).numpy()
                    for s in range(40)])
  assert masks.shape == (40, length)
  # Exactly round(0.15 * length) noise tokens in round(noise / 3) spans, every time.
  num_noise = round(0.15 * length)
  np.testing.assert_array_equal(masks.sum(1), num_noise)
  starts = masks & ~np.pad(masks[:, :-1], ((0, 0), (1, 0)))
  np.testing.assert_array_equal(starts.sum(1), round(num_noise / 3))
  assert abs(num_noise / starts.sum(1).mean() - 3.0) < 0.05
  # Span lengths vary (a random partition, not a fixed stride), with mean 3.
  span_lengths = np.concatenate([np.diff(np.flatnonzero(np.diff(np.r_[0, m, 0]))) [::2] for m in masks])
  assert abs(span_lengths.mean() - 3.0) < 0.05 and span_lengths.std() > 1.0 and span_lengths.min() >= 1
  # Non-noise first, noise last; noise is spread evenly over positions.
  assert not masks[:, 0].any() and masks[:, -1].all()
  first_half = masks[:, : length // 2].sum() / masks.sum()
  assert 0.45 < first_half < 0.55
  # Different seeds, different masks.
  assert len({m.tobytes() for m in masks}) == 40


def test_noise_mask_tiny_lengths():
  for length in (1, 2, 3):
    mask = sc.random_spans_noise_mask(length, 0.15, seeds(1, 2), 3.0).numpy()
    assert mask.shape == (length,)
    assert mask.sum() == (1 if length >= 2 else 0)


def test_sentinels_and_reconstruction():
  rng = np.random.default_rng(0)
  tokens = tf.constant(rng.integers(3, BASE_SIZE, size=568), tf.int32)
  mask = sc.random_spans_noise_mask(568, 0.15, seeds(5, 6), 3.0)
  inputs = sc.noise_span_to_sentinel(tokens, mask, VOCAB).numpy()
  targets = sc.nonnoise_span_to_sentinel(tokens, mask, VOCAB).numpy()
  # 568 raw tokens: 483 kept + 28 sentinels = 511 (+ EOS = 512); 85 noise + 28 sentinels = 113 (+ EOS = 114).
  assert (len(inputs), len(targets)) == (511, 113)
  assert is_sentinel(inputs).sum() == is_sentinel(targets).sum() == 28
  np.testing.assert_array_equal(reconstruct(inputs, targets), tokens.numpy())


def make_docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, BASE_SIZE, size=n).astype(np.int32) for n in lengths]


def docs_dataset(docs):
  return tf.data.Dataset.from_generator(lambda: ({"targets": d} for d in docs),
                                        output_signature={"targets": tf.TensorSpec([None], tf.int32)})


def run_pipeline(docs, inputs_length=512, targets_length=114, seed=42, **kwargs):
  with seqio.map_seed_manager(seed):
    ds = sc.span_corruption(docs_dataset(docs), {"inputs": inputs_length, "targets": targets_length},
                            FEATURES, **kwargs)
  ds = seqio.preprocessors.append_eos_after_trim(ds, output_features=FEATURES,
                                                  sequence_length={"inputs": inputs_length, "targets": targets_length})
  return list(ds.as_numpy_iterator())


def test_pipeline_lengths_density_and_reconstruction():
  # Empty documents among real ones are skipped; the stream survives them.
  docs = make_docs([3000, 0, 1700, 0, 0, 2500, 1, 900])
  examples = run_pipeline(docs)
  stream = np.concatenate([d for d in docs if len(d)])
  full = [e for e in examples if len(e["inputs"]) == 512]
  assert len(full) == len(stream) // 568 and len(examples) == len(full) + 1
  for e in examples:
    assert e["inputs"][-1] == 1 and e["targets"][-1] == 1  # EOS
    assert len(e["inputs"]) <= 512 and len(e["targets"]) <= 114
  for e in full:
    assert len(e["targets"]) == 114
  # Corrupted examples put back together give the documents, in order, without the empty ones.
  rebuilt = np.concatenate([reconstruct(e["inputs"][:-1], e["targets"][:-1]) for e in examples])
  np.testing.assert_array_equal(rebuilt, stream)
  # Noise density over the full examples: 85 of 568 tokens.
  noise = sum(len(e["targets"]) - 1 - is_sentinel(e["targets"]).sum() for e in full)
  assert noise / (568 * len(full)) == pytest.approx(0.15, abs=0.002)


@pytest.mark.parametrize("inputs_length", [64, 128])
def test_pipeline_fills_other_lengths_exactly(inputs_length):
  raw, targets_length = sc.random_spans_helper(inputs_length)
  examples = run_pipeline(make_docs([5 * raw + 7]), inputs_length, targets_length)
  assert [len(e["inputs"]) for e in examples[:5]] == [inputs_length] * 5
  assert [len(e["targets"]) for e in examples[:5]] == [targets_length] * 5


def test_pipeline_is_deterministic_given_seed():
  docs = make_docs([4000, 2000], seed=3)
  a, b, c = run_pipeline(docs, seed=7), run_pipeline(docs, seed=7), run_pipeline(docs, seed=8)
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_select_random_chunk_keeps_one_aligned_chunk():
  doc = np.arange(3, 3 + 250, dtype=np.int32)
  starts = set()
  for seed in range(6):
    with seqio.map_seed_manager(seed):
      ds = sc.select_random_chunk(docs_dataset([doc, doc[:0]]), max_length=100)
    (chunk,) = [x["targets"] for x in ds.as_numpy_iterator()]  # the empty document is dropped
    start = int(chunk[0]) - 3
    assert start in (0, 100, 200)
    np.testing.assert_array_equal(chunk, doc[start:start + 100])
    starts.add(start)
  assert len(starts) > 1


def test_split_tokens_covers_everything():
  ds = sc.split_tokens(docs_dataset([np.arange(10, dtype=np.int32), np.arange(3, dtype=np.int32)]), 4)
  assert [x["targets"].tolist() for x in ds.as_numpy_iterator()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2]]


def test_bad_settings_are_one_line_errors():
  ds = docs_dataset(make_docs([10]))
  with pytest.raises(ValueError, match="targets length 100 is too short.*needs 114"):
    sc.span_corruption(ds, {"inputs": 512, "targets": 100}, FEATURES)
  few = IdVocab(extra_ids=10)
  with pytest.raises(ValueError, match="needs 28 sentinels.*extra_ids=10"):
    sc.span_corruption(ds, {"inputs": 512, "targets": 114}, {"targets": seqio.Feature(few)})
  with pytest.raises(ValueError, match="sequence_length"):
    sc.span_corruption(ds, None, FEATURES)
