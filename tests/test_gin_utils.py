"""gin_utils: the gin flags, where gin files are found, and the one-line errors for configuration mistakes."""

import os

import gin
import pytest

from topk_transformers import gin_utils, runs
from topk_transformers.commands import train as train_command


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def build(files, bindings=()):
  gin_utils.configure(list(files), list(bindings))
  return gin_utils.get_macro("MODEL")


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------


def test_parse_gin_flags():
  argv = ["--gin_file=a.gin,b.gin", "--gin_file", "c.gin", "--gin.MODEL_DIR='/tmp/x'",
          "--gin_bindings", "TOP_K = 3", "--gin_bindings=X = 1", "--json", "out.json", "pos"]
  files, bindings, rest = gin_utils.parse_gin_flags(argv)
  assert files == ["a.gin", "b.gin", "c.gin"]
  assert bindings == ["MODEL_DIR = '/tmp/x'", "TOP_K = 3", "X = 1"]
  assert rest == ["--json", "out.json", "pos"]


@pytest.mark.parametrize("argv, shown", [
    (["--gin.TOP_K"], "malformed gin flag '--gin.TOP_K'"),
    (["--gin.=3"], "malformed gin flag '--gin.=3'"),
    (["--gin_file"], "--gin_file needs a value"),
    (["--gin_bindings"], "--gin_bindings needs a value"),
])
def test_malformed_gin_flags_are_one_line_errors(argv, shown):
  with pytest.raises(gin_utils.ConfigError, match=shown):
    gin_utils.parse_gin_flags(argv)


def test_bindings_apply_after_the_files_in_order():
  cfg = build(["t5/t5_1_0/tiny.gin", "t5/topk.gin"], ["TOP_K = 3", "TOP_K = 5"]).module.config
  assert cfg.top_k == 5
  # Without t5/topk.gin the model file's MLPs are dense.
  assert build(["t5/t5_1_0/tiny.gin"]).module.config.top_k is None


# ---------------------------------------------------------------------------
# Search path
# ---------------------------------------------------------------------------


def test_search_paths_are_the_working_directory_then_the_variable_then_the_package(tmp_path, monkeypatch):
  mine, theirs = tmp_path / "mine", tmp_path / "theirs"
  mine.mkdir()
  theirs.mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv(gin_utils.ENV_SEARCH_PATHS, os.pathsep.join([str(mine), str(theirs), str(mine)]))
  assert gin_utils.search_paths() == [str(tmp_path), str(mine), str(theirs), gin_utils.config_root()]
  packaged = os.path.join(gin_utils.config_root(), "t5", "topk.gin")
  assert gin_utils.resolve_gin_file("t5/topk.gin") == packaged
  (theirs / "t5").mkdir()
  (theirs / "t5" / "topk.gin").write_text("TOP_K = 1\n")
  assert gin_utils.resolve_gin_file("t5/topk.gin") == str(theirs / "t5" / "topk.gin")
  (mine / "t5").mkdir()
  (mine / "t5" / "topk.gin").write_text("TOP_K = 2\n")
  assert gin_utils.resolve_gin_file("t5/topk.gin") == str(mine / "t5" / "topk.gin")
  (tmp_path / "t5").mkdir()
  (tmp_path / "t5" / "topk.gin").write_text("TOP_K = 3\n")
  assert gin_utils.resolve_gin_file("t5/topk.gin") == str(tmp_path / "t5" / "topk.gin")
  assert build(["t5/t5_1_0/tiny.gin", "t5/topk.gin"]).module.config.top_k == 3


def test_packaged_files_and_their_includes_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert build(["t5/t5_1_0/tiny.gin"]).module.config.emb_dim == 64
  assert gin_utils.get_macro("MODEL_DIR", default=None) is None
  own = tmp_path / "own.gin"
  own.write_text("include 't5/t5_1_0/tiny.gin'\ninclude 't5/topk.gin'\nTOP_K = 7\n")
  assert build([str(own)]).module.config.top_k == 7
  assert build(["own.gin"]).module.config.top_k == 7


def test_a_missing_file_is_one_line_error_naming_where_it_looked(tmp_path, monkeypatch, model_config_error):
  monkeypatch.chdir(tmp_path)
  msg = model_config_error(["t5/t5_1_0/nope.gin"], [], "gin file not found: 't5/t5_1_0/nope.gin'")
  assert str(tmp_path) in msg and gin_utils.config_root() in msg
  model_config_error([str(tmp_path / "nope.gin")], [], "gin file not found")


# ---------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------


def test_config_mistakes_are_one_line_errors(tmp_path, model_config_error):
  model_config_error(["t5/t5_1_0/tiny.gin"], ["network.T5Confg.emb_dim = 3"], "network.T5Confg")
  model_config_error(["t5/t5_1_0/tiny.gin"], ["network.T5Config.emb_dimm = 3"], "emb_dimm")
  model_config_error(["t5/t5_1_0/tiny.gin"], ["TOP_K = = 3"], "bad gin binding 'TOP_K = = 3'")
  model_config_error(["t5/t5_1_0/tiny.gin"], ["TOP_K = %NOT_A_MACRO"], "NOT_A_MACRO")
  broken = tmp_path / "broken.gin"
  broken.write_text("include 't5/t5_1_0/tiny.gin'\nnetwork.T5Config.emb_dim = (\n")
  model_config_error([str(broken)], [], "broken.gin")
  unknown = tmp_path / "unknown.gin"
  unknown.write_text("include 't5/t5_1_0/tiny.gin'\nnetwork.NoSuchThing.x = 1\n")
  model_config_error([str(unknown)], [], "NoSuchThing")


def test_an_unset_macro_is_a_one_line_error_unless_a_default_is_given():
  gin_utils.configure(["t5/t5_1_0/tiny.gin"])
  with pytest.raises(gin_utils.ConfigError, match=r"^gin macro NOPE is not set \(.*--gin\.NOPE=\.\.\.\)$"):
    gin_utils.get_macro("NOPE")
  assert gin_utils.get_macro("NOPE", default=4) == 4


def test_a_macro_used_but_never_set_is_named(model_config_error):
  msg = model_config_error(["t5/t5_1_0/tiny.gin"], ["network.T5Config.emb_dim = %NEVER_SET"], "%NEVER_SET")
  assert msg == "building %MODEL: gin macro %NEVER_SET is used but never set"


@pytest.mark.parametrize("binding, shown", [
    ("TRAIN_STEP = 5", "unknown gin macro TRAIN_STEP in binding 'TRAIN_STEP = 5': no loaded gin file sets or uses it; "
                       "did you mean TRAIN_STEPS?"),
    ("TOPK = 3", "unknown gin macro TOPK in binding 'TOPK = 3': no loaded gin file sets or uses it; did you mean TOP_K?"),
    # FOO uses a known macro, but nothing uses FOO.
    ("FOO = %TOP_K", "unknown gin macro FOO in binding 'FOO = %TOP_K': no loaded gin file sets or uses it"),
])
def test_a_macro_that_no_loaded_file_sets_or_uses_is_an_error_naming_the_nearest(binding, shown):
  with pytest.raises(gin_utils.ConfigError) as info:
    gin_utils.configure(["t5/runs/cpu_smoke.gin"], [binding])
  assert str(info.value) == shown


def test_macros_that_a_file_sets_or_anything_uses_are_accepted():
  gin_utils.configure(["t5/runs/cpu_smoke.gin"], [
      "TRAIN_STEPS = 5",  # set by the file
      "MODEL_DIR = '/tmp/run'",  # used by the file (and read by the commands)
      "train.train.seed = %MY_SEED", "MY_SEED = 7",  # used by another binding
  ])
  assert gin_utils.get_macro("TRAIN_STEPS") == 5 and gin_utils.get_macro("MY_SEED") == 7
  # A file that only uses a macro (%MODEL_DIR, %TRAIN_STEPS) makes it known as well.
  gin_utils.configure(["t5/t5_1_0/tiny.gin"], ["BATCH_SIZE = 4"])  # read by the commands by name


@pytest.mark.parametrize("flag", ["--gin.TRAIN_STEP=5", "--gin_bindings=TRAIN_STEP = 5"])
def test_topk_train_with_a_misspelt_macro_exits_2_and_writes_nothing(tmp_path, capsys, flag):
  model_dir = tmp_path / "run"
  assert train_command.main(["--gin_file=t5/runs/cpu_smoke.gin", f"--gin.MODEL_DIR='{model_dir}'", flag]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: unknown gin macro TRAIN_STEP ") and \
      err.endswith("did you mean TRAIN_STEPS?"), err
  assert not model_dir.exists()


def test_topk_model_info_with_a_misspelt_macro_exits_2_with_one_line(capsys):
  from topk_transformers.commands import model_info as model_info_command

  assert model_info_command.main(["--gin_file=t5/t5_1_0/tiny.gin", "--gin_file=t5/topk.gin", "--gin.TOP_KK=8"]) == 2
  captured = capsys.readouterr()
  assert captured.err.strip() == ("error: unknown gin macro TOP_KK in binding 'TOP_KK = 8': no loaded gin file sets "
                                  "or uses it; did you mean TOP_K?")
  assert captured.out == ""


def test_get_macro_builds_references_also_inside_lists_unless_asked_not_to():
  # LIST is set only here and used by nothing but this test's get_macro: unchecked on purpose.
  gin_utils.configure(["t5/t5_1_0/tiny.gin"], ["LIST = [%MODEL, 3]"], check_macros=False)
  reference = gin_utils.get_macro("MODEL", evaluate=False)
  assert isinstance(reference, gin.config.ConfigurableReference)
  model, three = gin_utils.get_macro("LIST")
  assert model.module.config.emb_dim == 64 and three == 3


# ---------------------------------------------------------------------------
# %gin.REQUIRED: MODEL_DIR in the run files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("files", [
    ["t5/t5_1_0/tiny.gin", "t5/runs/pretrain_c4.gin"],
    ["t5/t5_1_0/tiny.gin", "t5/runs/finetune.gin"],
    ["vit/ti16.gin", "vit/runs/imagenet1k.gin"],
    ["vit/ti16.gin", "vit/runs/cifar10.gin"],
    ["vit/ti16.gin", "vit/runs/imagenet21k.gin"],
])
def test_a_run_file_requires_model_dir(files):
  gin_utils.configure(files)
  with pytest.raises(gin_utils.ConfigError) as info:
    gin_utils.get_macro("MODEL_DIR")
  assert str(info.value) == ("gin macro MODEL_DIR is required (%gin.REQUIRED) but not set: "
                             "add --gin.MODEL_DIR=VALUE (a string in both quotes: --gin.MODEL_DIR=\"'...'\")")
  gin_utils.configure(files, ["MODEL_DIR = '/tmp/run'"])
  assert gin_utils.get_macro("MODEL_DIR") == "/tmp/run"


def test_reading_a_run_file_without_training_needs_no_model_dir():
  """topk-eval, topk-sparsity and topk-topk-sweep take a run file and a --checkpoint, never MODEL_DIR."""
  gin_utils.configure(["t5/t5_1_0/tiny.gin", "t5/topk.gin", "t5/runs/pretrain_c4.gin"])
  assert gin_utils.get_macro("MODEL").module.config.top_k is not None
  assert runs.build_from_gin("train.train.dataset").mixture_or_task_name == "c4_span_corruption"
  assert runs.build_from_gin("train.train.seed") == 0


@pytest.mark.parametrize("run, model_dir", [("t5/runs/cpu_smoke.gin", "/tmp/topk_t5_smoke"),
                                            ("vit/runs/cpu_smoke.gin", "/tmp/topk_vit_smoke")])
def test_the_embedded_defaults_need_no_model_dir(run, model_dir):
  gin_utils.configure([run])
  gin_utils.check_required_macros()  # what topk-train checks first
  assert gin_utils.get_macro("MODEL_DIR") == model_dir


@pytest.mark.parametrize("files", [["t5/t5_1_0/tiny.gin", "t5/topk.gin", "t5/runs/pretrain_c4.gin"],
                                   ["vit/ti16.gin", "vit/runs/imagenet1k.gin"]])
def test_topk_train_without_model_dir_exits_2_with_one_line(files, capsys):
  assert train_command.main([f"--gin_file={f}" for f in files]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0, err
  assert err.startswith("error: gin macro MODEL_DIR is required") and "--gin.MODEL_DIR=\"'...'\"" in err


def test_check_required_macros_names_every_unset_one_and_passes_once_they_are_set():
  files = ["t5/t5_1_0/tiny.gin", "t5/runs/finetune.gin"]
  gin_utils.configure(files)
  with pytest.raises(gin_utils.ConfigError) as info:
    gin_utils.check_required_macros()
  assert str(info.value) == (
      "gin macros INITIAL_CHECKPOINT_PATH, MIXTURE_OR_TASK_NAME, MODEL_DIR are required (%gin.REQUIRED) but not set: "
      "add --gin.NAME=VALUE for each (a string in both quotes, e.g. --gin.INITIAL_CHECKPOINT_PATH=\"'...'\")")
  gin_utils.configure(files, ["MODEL_DIR = '/tmp/run'", "INITIAL_CHECKPOINT_PATH = '/ckpt'"])
  with pytest.raises(gin_utils.ConfigError, match=r"^gin macro MIXTURE_OR_TASK_NAME is required"):
    gin_utils.check_required_macros()
  gin_utils.configure(files, ["MODEL_DIR = '/tmp/run'", "INITIAL_CHECKPOINT_PATH = '/ckpt'",
                              "MIXTURE_OR_TASK_NAME = 'glue_sst2_v2'"])
  gin_utils.check_required_macros()


def test_topk_train_names_the_unset_fine_tuning_macros_before_building_data(capsys):
  argv = ["--gin_file=t5/t5_1_0/tiny.gin", "--gin_file=t5/runs/finetune.gin", "--gin.MODEL_DIR='/nonexistent'",
          "--gin.MIXTURE_OR_TASK_NAME='glue_sst2_v2'"]
  assert train_command.main(argv) == 2
  assert capsys.readouterr().err.strip() == (
      "error: gin macro INITIAL_CHECKPOINT_PATH is required (%gin.REQUIRED) but not set: "
      "add --gin.INITIAL_CHECKPOINT_PATH=VALUE (a string in both quotes: --gin.INITIAL_CHECKPOINT_PATH=\"'...'\")")


def test_topk_train_without_a_gin_file_exits_2_with_one_line(capsys):
  assert train_command.main([]) == 2
  assert capsys.readouterr().err.strip() == "error: no --gin_file given (e.g. --gin_file=t5/runs/cpu_smoke.gin)"
