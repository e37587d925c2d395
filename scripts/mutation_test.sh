#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the modules whose silent bugs would corrupt every result.
#
#   pip install -e '.[mutation]'
#   nice -n 10 scripts/mutation_test.sh topk        # or: mlp, mlp_block, loss, decoding, all
#   scripts/mutation_test.sh topk results           # list the surviving mutants again
#   MUTMUT_FILTER='topk_transformers.topk.x_select*' scripts/mutation_test.sh topk   # some functions only
#   (cd .mutation/topk && mutmut show <mutant name>)
#
# Each target mutates one module (only the named functions count for "mlp_block" and "decoding")
# and runs a fast selection of tests against every mutant. The work happens in a copy of
# the sources under .mutation/<target>/ (git-ignored), so the working tree is never
# edited. Not part of CI: a full run takes from minutes (loss) to hours (topk) on 2 cores.
# Where the runs stand, and the kinds of survivor left, are in docs/design/testing.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${1:-topk}"
ACTION="${2:-run}"
CHILDREN="${MUTMUT_CHILDREN:-2}"
# mutmut and its workers run from the copy: put the interpreter that runs this script's tools on PATH
# (the project's .venv when there is one, as docs/design/testing.md installs it).
if [[ -x "$ROOT/.venv/bin/mutmut" ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install -e '.[mutation]'" >&2; exit 2; }

case "$TARGET" in
  topk)
    MODULE=topk_transformers/topk.py
    FILTER=""
    TESTS="tests/test_topk.py tests/test_claims.py::test_k_at_least_d_ff_returns_the_input_and_logs_one_line"
    TESTS="$TESTS -k 'not host_mesh and not pass_top_k_method_down and not sown_statistics and not (bf16 and (planted or bit_for_bit or select_and))'" ;;
  mlp)
    MODULE=topk_transformers/mlp_steps.py
    FILTER=""
    TESTS="tests/test_mlp_steps.py tests/test_mlp_oracle.py tests/test_sparse_decoding.py"
    TESTS="$TESTS tests/test_predicted_mlp_oracle.py" ;;
    # MUTMUT_TESTS=tests/test_predictors.py adds the T5-level tests of the predicted step.
  mlp_block)
    MODULE=topk_transformers/layers.py
    FILTER="topk_transformers.layers.x*MlpBlock* topk_transformers.layers.x*Weights*"
    TESTS="tests/test_mlp_oracle.py tests/test_sparse_decoding.py tests/test_predicted_mlp_oracle.py" ;;
  loss)
    MODULE=topk_transformers/t5/model.py
    FILTER=""
    TESTS="tests/test_loss.py tests/test_model_forward.py" ;;
  decoding)
    MODULE=topk_transformers/decoding.py
    FILTER="topk_transformers.decoding.x*filter_logits* topk_transformers.decoding.x*temperature_sample*
            topk_transformers.decoding.x*beam_search* topk_transformers.decoding.x*brevity_penalty*"
    TESTS="tests/test_sampling.py tests/test_decoding.py::test_beam_search_matches_brute_force"
    TESTS="$TESTS tests/test_decoding.py::test_beam_search_eos_padding_and_scores"
    TESTS="$TESTS tests/test_decoding.py::test_greedy_and_sampling_on_toy_model tests/test_decoding.py::test_filter_logits"
    TESTS="$TESTS tests/test_decoding.py::test_filter_logits_filters_each_row_of_a_batch_on_its_own"
    TESTS="$TESTS tests/test_decoding.py::test_beam_search_goes_on_while_the_length_penalty_can_lift_a_live_hypothesis"
    TESTS="$TESTS tests/test_decoding.py::test_beam_search_checks_its_arguments"
    TESTS="$TESTS tests/test_decoding.py::test_beam_search_defaults_are_t5s_length_penalty_and_eos"
    TESTS="$TESTS tests/test_decoding.py::test_beam_search_expands_the_2k_best_continuations_as_t5x_does"
    TESTS="$TESTS tests/test_decoding.py::test_beam_search_without_eos_keeps_the_best_full_length_sequences" ;;
  all)
    for t in topk mlp mlp_block loss decoding; do "$0" "$t" "$ACTION"; done
    exit 0 ;;
  *)
    echo "usage: $0 {topk|mlp|mlp_block|loss|decoding|all} [run|results]" >&2
    exit 2 ;;
esac

TESTS="$TESTS ${MUTMUT_TESTS:-}"  # e.g. MUTMUT_TESTS=tests/test_predictors.py
FILTER="${MUTMUT_FILTER:-$FILTER}"  # e.g. MUTMUT_FILTER='topk_transformers.topk.x_topk*' for one function
WORK="$ROOT/.mutation/$TARGET"
if [[ "$ACTION" == "results" ]]; then
  cd "$WORK" && exec mutmut results
fi

mkdir -p "$WORK"
# A fresh copy of the sources and tests (mutmut keeps its results in $WORK/mutants/ and
# re-tests only what changed).
rm -rf "$WORK/topk_transformers" "$WORK/tests" "$WORK/configs"
cp -r "$ROOT/topk_transformers" "$ROOT/tests" "$ROOT/configs" "$ROOT/pytest.ini" "$WORK/"
find "$WORK" -path "$WORK/mutants" -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
if [[ "$TARGET" == "mlp_block" ]]; then
  # mutmut's trampoline calls a copy of each mutated method as a class attribute, which Flax wraps as a module
  # method; for __post_init__ (which runs before the module has a scope) that fails every test. Leave it
  # unmutated in the copy: it only validates the Top-k settings (topk.validate_top_k, mutated in "topk").
  sed -i 's/^\(  def __post_init__(self):\)$/\1  # pragma: no mutate block/' "$WORK/topk_transformers/layers.py"
fi

# mutmut reads its settings from setup.cfg in the directory it runs in. Pytest arguments are
# one per line; the -k expression is split by the shell-like eval below.
{
  echo "[mutmut]"
  echo "source_paths = topk_transformers"
  echo "only_mutate = $MODULE"
  echo "also_copy ="
  echo "  configs"
  echo "  pytest.ini"
  echo "pytest_add_cli_args ="
  echo "  -p"
  echo "  no:cacheprovider"
  echo "  -m"
  echo "  not slow"
  echo "pytest_add_cli_args_test_selection ="
  eval "set -- $TESTS"
  for arg in "$@"; do echo "  $arg"; done
  # Workers fork from a server that has only imported these (JAX and TensorFlow are not
  # fork-safe once they have run anything: forked from mutmut's own process they hang).
  echo "process_isolation = forkserver"
  echo "forkserver_warmup = import"
  echo "preload_modules_file = preload_modules.txt"
  echo "timeout_multiplier = 4.0"
  echo "timeout_constant = 60.0"
} > "$WORK/setup.cfg"
printf '%s\n' numpy scipy.stats pytest jax jax.numpy flax.linen optax tensorflow seqio > "$WORK/preload_modules.txt"

cd "$WORK"
# Mutants that leave the compiled program unchanged reuse it from the persistent cache.
export JAX_PLATFORMS=cpu
export JAX_COMPILATION_CACHE_DIR="$WORK/jax_cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# shellcheck disable=SC2086  # FILTER is a list of globs over mutant names
mutmut run --max-children "$CHILDREN" $FILTER || true
mutmut results
