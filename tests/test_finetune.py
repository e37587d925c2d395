"""Fine-tuning from a pretrained checkpoint (train.train's initial_checkpoint_path, runs/finetune.gin) and GLUE."""

from __future__ import annotations

import os

import gin
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from topk_transformers import errors, gin_utils, train
from topk_transformers.data import tasks, vocab
from topk_transformers.errors import ConfigError
from topk_transformers.t5 import convert

pytest.importorskip("torch")  # save_tiny_hf_t5 saves a transformers T5
pytest.importorskip("transformers")

WORDS = "the of and to in is was for on that with river city king war music church school island water".split()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  d = tmp_path_factory.mktemp("spm")
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(WORDS, size=12)) for _ in range(200)]
  lines += ["sst2 rte sentence sentence1 sentence2 positive negative entailment not_entailment"] * 20
  (d / "corpus.txt").write_text("\n".join(lines) + "\n")
  return vocab.train_sentencepiece([str(d / "corpus.txt")], str(d / "tiny"), vocab_size=50)


@pytest.fixture(autouse=True)
def clean_gin(tmp_path, monkeypatch):
  monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(tmp_path / "cache"))
  yield
  gin.clear_config()
  for benchmark in tasks.GLUE_LABELS:
    tasks.register_glue_task(benchmark)


def test_glue_formats_and_labels_match_tfds():
  for benchmark, names in tasks.GLUE_LABELS.items():
    info = tfds.builder(f"glue/{benchmark}:{tasks.GLUE_TFDS_VERSION}").info
    assert tuple(info.features["label"].names) == names
    assert set(tasks.GLUE_TEXT_FEATURES[benchmark]) == set(info.features) - {"label", "idx"}


@pytest.mark.parametrize("benchmark", ["sst2", "rte"])
def test_glue_task_on_mock_tfds(spm, tmp_path, benchmark):
  v = vocab.get_vocabulary(spm, extra_ids=100)
  task = tasks.register_glue_task(benchmark, vocabulary=v, tfds_data_dir=str(tmp_path))
  assert task.name == f"glue_{benchmark}_v2"
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = list(tfds.load(f"glue/{benchmark}", split="validation", data_dir=str(tmp_path)).as_numpy_iterator())
    examples = list(task.get_dataset({"inputs": 256, "targets": 32}, split="validation", shuffle=False)
                    .as_numpy_iterator())
  assert len(examples) == len(raw) == 6
  keys = tasks.GLUE_TEXT_FEATURES[benchmark]
  for e, r in zip(examples, raw):
    assert e["targets"][-1] == 1 and e["inputs"][-1] == 1  # EOS
    want = " ".join([benchmark] + [f"{k}: {r[k].decode()}" for k in keys])
    assert v.decode(e["inputs"][:-1].tolist()) == v.decode(v.encode(want))
    assert v.decode(e["targets"][:-1].tolist()) == tasks.GLUE_LABELS[benchmark][r["label"]]


def test_unknown_glue_benchmark_is_a_config_error():
  with pytest.raises(ConfigError, match="unknown GLUE benchmark 'sts'"):
    tasks.register_glue_task("sts")


def finetune_bindings(spm, model_dir, init, steps):
  return [f"MODEL_DIR = '{model_dir}'", f"INITIAL_CHECKPOINT_PATH = '{init}'", "MIXTURE_OR_TASK_NAME = 'glue_sst2_v2'",
          f"VOCABULARY_PATH = '{spm}'", "EXTRA_IDS = 100", f"TFDS_DATA_DIR = '{os.path.dirname(model_dir)}'",
          "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", f"TRAIN_STEPS = {steps}", "BATCH_SIZE = 8",
          "EVAL_PERIOD = 0", "LOG_PERIOD = 1", "LEARNING_RATE = 0.01", "DROPOUT_RATE = 0.0", "TOP_K = 16",
          "NUM_EMBEDDINGS = 256", "network.T5Config.emb_dim = 32", "network.T5Config.num_heads = 4",
          "network.T5Config.head_dim = 8", "network.T5Config.mlp_dim = 64",
          "seqio_input.SeqioDataset.shuffle_buffer_size = 16"]


STEPS = 12
GIN_FILES = ["t5/t5_1_1/tiny.gin", "t5/topk.gin", "t5/runs/finetune.gin"]


@pytest.mark.slow
def test_finetune_from_a_hugging_face_checkpoint_starts_from_it_and_learns(spm, tmp_path, save_tiny_hf_t5):
  save_tiny_hf_t5(tmp_path / "hf", feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  _, imported = convert.from_hf(str(tmp_path / "hf"))
  model_dir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    # Step 0: the run's params are the checkpoint's (Top-k on: topk.gin over a dense checkpoint).
    gin_utils.configure(GIN_FILES, finetune_bindings(spm, model_dir, tmp_path / "hf", 0))
    assert gin_utils.get_macro("MODEL").module.config.top_k == 16
    start = train.train_from_gin()
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(start.state.params), imported)
    # The same directory resumes from its own step 0 (not the initial checkpoint) and the loss falls.
    gin_utils.configure(GIN_FILES, finetune_bindings(spm, model_dir, tmp_path / "nowhere", STEPS))
    result = train.train_from_gin()
  losses = [m["loss"] for _, m in result.log]
  assert result.log[0][0] == 1 and len(losses) == STEPS
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses


def test_initial_checkpoint_of_another_architecture_names_the_field(spm, tmp_path, save_tiny_hf_t5):
  save_tiny_hf_t5(tmp_path / "hf", feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  relative_attention_max_distance=64)
  gin_utils.configure(GIN_FILES, finetune_bindings(spm, str(tmp_path / "run"), tmp_path / "hf", 1))
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ConfigError) as e:
      train.train_from_gin()
  assert "T5Config.relpos_max_distance=128" in errors.one_line(e.value) and "has relpos_max_distance=64" in str(e.value)
