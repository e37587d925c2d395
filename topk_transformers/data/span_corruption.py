"""T5's span-corruption objective as tf.data ops, usable as a seqio preprocessor.

Span corruption (Raffel et al., 2020, section 3.1.4) drops ~15% of the tokens of
a text in spans of mean length 3. Each dropped span is replaced in the inputs
by one sentinel; the targets list the dropped spans, each after its sentinel::

  tokens   The cat sat on the mat and purred
  inputs   The <X0> on the <X1> purred
  targets  <X0> cat sat <X1> mat and

The sentinels are the vocabulary's extra ids counted down from the end:
``<extra_id_i>`` is ``vocabulary.vocab_size - 1 - i`` (seqio's
``SentencePieceVocabulary`` appends its extra ids in reverse for this).

The pipeline, as T5 builds it (seqio ships none of it, and this project does
not depend on the ``t5`` package):

1. :func:`select_random_chunk`: drop empty documents; of a document longer than
   ``max_chunk_length`` tokens keep one random aligned chunk.
2. :func:`reduce_concat_tokens`: concatenate documents in groups of 128, so
   that almost no example is short.
3. :func:`split_tokens`: cut the stream into pieces of the raw length that
   :func:`random_spans_helper` computes from the inputs length (568 tokens for
   512 inputs).
4. :func:`denoise`: draw the noise mask (:func:`random_spans_noise_mask`) and
   replace noise / non-noise spans by sentinels in inputs / targets.

EOS is not added here: seqio's ``append_eos_after_trim`` does it, and the
lengths above count it (568 raw tokens -> 511 + EOS inputs, 113 + EOS targets).

Randomness uses stateless ops with seeds from ``seqio.map_over_dataset(num_seeds=...)``,
so ``Task.get_dataset(seed=...)`` (or ``seqio.map_seed_manager``) makes the
output deterministic.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import seqio
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
# The map functions below have no Python control flow on tensors; skipping
# AutoGraph's source transformation saves seconds of tracing per pipeline.
_plain = tf.autograph.experimental.do_not_convert


def random_spans_helper(inputs_length: int,
                        noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> Tuple[int, int]:
  """Raw tokens per example, and the targets length, for a given inputs length.

  Finds the longest raw sequence whose corrupted inputs (non-noise tokens, one
  sentinel per span, one EOS) fit in ``inputs_length``. Both returned lengths
  count the EOS. ``random_spans_helper(512) == (568, 114)``, T5's numbers.
  """
  if inputs_length < 2:
    raise ValueError(f"inputs_length must be >= 2, got {inputs_length!r}")
  if not 0.0 < noise_density < 1.0:
    raise ValueError(f"noise_density must be in (0, 1), got {noise_density!r}")
  if mean_noise_span_length < 1.0:
    raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length!r}")

  def lengths(raw_length):
    # The same rounding as random_spans_noise_mask, so the mask of a raw example
    # produces exactly these lengths.
    num_noise = int(round(raw_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    inputs = raw_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1
    targets = num_noise + num_spans * extra_tokens_per_span_targets + 1
    return inputs, targets

  raw_length = inputs_length - 1
  while lengths(raw_length + 1)[0] <= inputs_length:
    raw_length += 1
  return raw_length, lengths(raw_length)[1]


def num_noise_spans(length: int, noise_density: float, mean_noise_span_length: float) -> int:
  """The number of noise spans (hence sentinels) in an example of ``length`` raw tokens."""
  length = max(length, 2)
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  return max(int(round(num_noise / mean_noise_span_length)), 1)


def _random_partition(total, num_parts, seed):
  """Lengths of ``num_parts`` nonempty segments that split ``total`` items, uniformly at random."""
  # Pick num_parts - 1 distinct cut points among the total - 1 gaps between items.
  scores = tf.random.stateless_uniform([total - 1], seed=seed)
  cuts = tf.sort(tf.math.top_k(scores, k=num_parts - 1).indices + 1)
  bounds = tf.concat([[0], cuts, [total]], axis=0)
  return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(length,
                            noise_density: float,
                            seeds: Sequence,
                            mean_noise_span_length: float = 3.0) -> tf.Tensor:
  """A boolean noise mask of ``length`` with spans of mean length ``mean_noise_span_length``.

  ``round(length * noise_density)`` tokens are noise (at least one, and at
  least one is not), in ``round(num_noise / mean_noise_span_length)`` spans (at
  least one). Noise and non-noise span lengths are uniform random partitions;
  the mask alternates non-noise, noise, ..., so it always starts with non-noise
  and ends with noise.

  Args:
    length: int32 scalar, the number of tokens.
    noise_density: fraction of tokens to mask.
    seeds: two stateless seeds (shape [2] each), for noise and non-noise spans.
    mean_noise_span_length: mean length of a noise span.
  """
  length = tf.cast(length, tf.int32)
  # Lengths 0 and 1 are drawn as 2 and cut back, avoiding empty partitions.
  work_length = tf.maximum(length, 2)
  num_noise = tf.cast(tf.round(tf.cast(work_length, tf.float32) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, work_length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  noise_lengths = _random_partition(num_noise, num_spans, seeds[0])
  nonnoise_lengths = _random_partition(work_length - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
  span_is_noise = tf.tile([0, 1], [num_spans])
  mask = tf.repeat(span_is_noise, span_lengths) > 0
  return mask[:length]


def sentinel_id(vocabulary: seqio.Vocabulary, index=0):
  """Id of ``<extra_id_{index}>``: the extra ids count down from the last id."""
  return vocabulary.vocab_size - 1 - index


def noise_span_to_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary) -> tf.Tensor:
  """Replaces each noise span by one sentinel: span i -> ``<extra_id_i>``."""
  previous_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
  span_start = tf.logical_and(noise_mask, tf.logical_not(previous_is_noise))
  span_rest = tf.logical_and(noise_mask, previous_is_noise)
  span_index = tf.cumsum(tf.cast(span_start, tokens.dtype)) - 1
  tokens = tf.where(span_start, tf.cast(sentinel_id(vocabulary), tokens.dtype) - span_index, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(span_rest))


def nonnoise_span_to_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary) -> tf.Tensor:
  """The targets side: each non-noise span becomes one sentinel."""
  return noise_span_to_sentinel(tokens, tf.logical_not(noise_mask), vocabulary)


def _drop_empty(dataset: tf.data.Dataset, feature_key: str) -> tf.data.Dataset:
  return dataset.filter(_plain(lambda x: tf.size(x[feature_key]) > 0))


def select_random_chunk(dataset: tf.data.Dataset,
                        max_length: int = 65536,
                        feature_key: str = "targets",
                        passthrough_feature_keys: Sequence[str] = ()) -> tf.data.Dataset:
  """Drops empty documents; keeps one random ``max_length``-aligned chunk of each other.

  T5 does this so a very long document does not dominate a batch of 128.
  """

  @seqio.map_over_dataset(num_seeds=1)
  @_plain
  def chunk(x, seed):
    tokens = x[feature_key]
    num_chunks = (tf.size(tokens) + max_length - 1) // max_length
    start = max_length * tf.random.stateless_uniform([], seed, maxval=num_chunks, dtype=tf.int32)
    out = {k: x[k] for k in passthrough_feature_keys}
    out[feature_key] = tokens[start:start + max_length]
    return out

  return chunk(_drop_empty(dataset, feature_key))


def reduce_concat_tokens(dataset: tf.data.Dataset, feature_key: str = "targets",
                         batch_size: int = 128) -> tf.data.Dataset:
  """Concatenates the tokens of each group of ``batch_size`` consecutive documents."""

  @_plain
  def concat(x):
    tokens = x[feature_key]
    flat = tokens.flat_values if isinstance(tokens, tf.RaggedTensor) else tf.reshape(tokens, [-1])
    return {feature_key: flat}

  dataset = dataset.map(_plain(lambda x: {feature_key: x[feature_key]}), num_parallel_calls=AUTOTUNE)
  return dataset.ragged_batch(batch_size).map(concat, num_parallel_calls=AUTOTUNE)


def split_tokens(dataset: tf.data.Dataset, max_tokens_per_segment: int,
                 feature_key: str = "targets") -> tf.data.Dataset:
  """Cuts each token sequence into pieces of ``max_tokens_per_segment`` (the last one shorter)."""
  if max_tokens_per_segment < 1:
    raise ValueError(f"max_tokens_per_segment must be >= 1, got {max_tokens_per_segment!r}")

  @_plain
  def split(x):
    tokens = x[feature_key]
    n = tf.size(tokens)
    num_full = n // max_tokens_per_segment
    remainder = n - num_full * max_tokens_per_segment
    row_lengths = tf.concat([tf.fill([num_full], max_tokens_per_segment),
                             tf.fill([tf.minimum(remainder, 1)], remainder)], axis=0)
    return {feature_key: tf.RaggedTensor.from_row_lengths(tokens, row_lengths)}

  @_plain
  def densify(x):
    tokens = x[feature_key]
    tokens = tokens.to_tensor() if isinstance(tokens, tf.RaggedTensor) else tokens
    return {feature_key: tf.reshape(tokens, [-1])}

  dataset = _drop_empty(dataset, feature_key).map(split, num_parallel_calls=AUTOTUNE)
  return dataset.unbatch().map(densify, num_parallel_calls=AUTOTUNE)


def denoise(dataset: tf.data.Dataset,
            vocabulary: seqio.Vocabulary,
            noise_density: float = 0.15,
            mean_noise_span_length: float = 3.0,
            input_feature_key: str = "inputs",
            passthrough_feature_keys: Sequence[str] = ()) -> tf.data.Dataset:
  """Maps ``{'targets': tokens}`` to span-corrupted ``{'inputs', 'targets'}``."""

  @seqio.map_over_dataset(num_seeds=2)
  @_plain
  def corrupt(x, seeds):
    tokens = x["targets"]
    mask = random_spans_noise_mask(tf.size(tokens), noise_density, seeds, mean_noise_span_length)
    out = {k: x[k] for k in passthrough_feature_keys}
    out[input_feature_key] = noise_span_to_sentinel(tokens, mask, vocabulary)
    out["targets"] = nonnoise_span_to_sentinel(tokens, mask, vocabulary)
    return out

  return corrupt(dataset)


def span_corruption(dataset: tf.data.Dataset,
                    sequence_length: Optional[Mapping[str, int]],
                    output_features: Mapping[str, seqio.Feature],
                    mean_noise_span_length: float = 3.0,
                    noise_density: float = 0.15,
                    input_feature_key: str = "inputs",
                    merge_examples_to_reduce_padding: bool = True,
                    max_chunk_length: int = 65536) -> tf.data.Dataset:
  """The seqio preprocessor: tokenized ``{'targets': document}`` -> ``{'inputs', 'targets'}``.

  seqio passes ``sequence_length`` and ``output_features``. Put it after
  ``seqio.preprocessors.tokenize`` and before
  ``seqio.preprocessors.append_eos_after_trim``. The targets feature length
  must be at least the one :func:`random_spans_helper` gives (114 for 512).
  """
  if not sequence_length or input_feature_key not in sequence_length:
    raise ValueError(f"span_corruption needs sequence_length[{input_feature_key!r}], got {sequence_length!r}")
  inputs_length = sequence_length[input_feature_key]
  raw_length, targets_length = random_spans_helper(inputs_length, noise_density, mean_noise_span_length)
  if sequence_length.get("targets", targets_length) < targets_length:
    raise ValueError(f"targets length {sequence_length['targets']} is too short for span corruption of "
                     f"inputs length {inputs_length}: needs {targets_length}")
  vocabulary = output_features["targets"].vocabulary
  if input_feature_key in output_features and output_features[input_feature_key].vocabulary is not vocabulary \
      and output_features[input_feature_key].vocabulary != vocabulary:
    raise ValueError("span_corruption needs the same vocabulary for inputs and targets")
  spans = num_noise_spans(raw_length, noise_density, mean_noise_span_length)
  if vocabulary.extra_ids < spans:
    raise ValueError(f"span corruption of {raw_length} tokens needs {spans} sentinels, "
                     f"but the vocabulary has extra_ids={vocabulary.extra_ids}")

  dataset = select_random_chunk(dataset, max_length=max_chunk_length)
  if merge_examples_to_reduce_padding:
    dataset = reduce_concat_tokens(dataset, batch_size=128)
  dataset = split_tokens(dataset, max_tokens_per_segment=raw_length)
  return denoise(dataset, vocabulary, noise_density, mean_noise_span_length, input_feature_key)
