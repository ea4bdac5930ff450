#!/usr/bin/env bash
# Run diffusers' own model tests plain and with every model wrapped by offload_tensor, then write
# report.md. See README.md beside this script.
#
# usage: ./run.sh [plain|sync|disk|all] [core|accel-cpu|both]      (defaults: all both)
#
#   plain      no wrapping
#   sync       wrap_model_for_offload(model, device="cpu", engine=SynchronousEngine())
#   disk       wrap_model_for_offload(model, device="cpu", offload="disk", disk_path=<tmp>)
#   core       the four test modules as they are (GPU-only tests skip on the CPU; Hub tests fail)
#   accel-cpu  exactly the tests of the same modules that core skips for want of an accelerator
#              ("requires a hardware accelerator" / "accelerator+PyTorch"), run on the CPU with
#              that skip lifted (other skips stay), with offline stand-ins for the tiny Hub repos
#              the TorchAo/Quanto classes load (make_local_hub.py)
#
# environment (all optional):
#   DIFFUSERS_TESTS=...       (required) a folder holding diffusers' tests/ (see README.md)
#   OT_REPO=<this repo>       checkout whose offload_tensor/ and compile_rules/ are tested; they are
#                             copied to results/src-<hash>/ first, so edits made there while the
#                             runs go on do not mix into them
#   VENV=$OT_REPO/.venv       python environment (torch, diffusers, torchao, optimum-quanto, ...)
#   XDIST=2                   pytest-xdist workers (0: no xdist)
#   TEST_TIMEOUT=900          seconds one test may take before its process is ended (stack dumped)
#   RESULTS=/tmp/offload_tensor_diffusers_suite   where runs (and test-only packages) are written
#   REPORT=$RESULTS/report.md                     where the report is written
#   PYTEST_ARGS=...           extra pytest arguments (e.g. -k "TestFluxTransformer and not LoRA")
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODE=${1:-all}
SUITE=${2:-both}
OT_REPO=${OT_REPO:-$(cd "$HERE/../.." && pwd)}
VENV=${VENV:-$OT_REPO/.venv}
XDIST=${XDIST:-2}
TEST_TIMEOUT=${TEST_TIMEOUT:-900}
RESULTS=${RESULTS:-${TMPDIR:-/tmp}/offload_tensor_diffusers_suite}
PYTEST_ARGS=${PYTEST_ARGS:-}
REPORT=${REPORT:-$RESULTS/report.md}
TESTS=${DIFFUSERS_TESTS:-}
[ -d "$TESTS/tests" ] || { echo "set DIFFUSERS_TESTS to a folder holding diffusers' tests/ (see README.md)" >&2; exit 2; }
PYLIB=$RESULTS/pylib
HUB_CACHE=$RESULTS/hub-cache

case "$MODE" in plain|sync|disk) MODES=$MODE ;; all) MODES="plain sync disk" ;;
  *) echo "usage: $0 [plain|sync|disk|all] [core|accel-cpu|both]" >&2; exit 2 ;; esac
case "$SUITE" in core|accel-cpu) SUITES=$SUITE ;; both) SUITES="core accel-cpu" ;;
  *) echo "usage: $0 [plain|sync|disk|all] [core|accel-cpu|both]" >&2; exit 2 ;; esac

PY=$VENV/bin/python
[ -x "$PY" ] || { echo "no python at $PY (set VENV=)" >&2; exit 2; }
[ -d "$OT_REPO/offload_tensor" ] || { echo "no offload_tensor/ in $OT_REPO (set OT_REPO=)" >&2; exit 2; }
mkdir -p "$RESULTS"

# -- test-only dependency missing from the venv (parameterized), installed next to this script ----
if ! PYTHONPATH=$PYLIB "$PY" -c "import parameterized" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --target "$PYLIB" parameterized || exit 1
fi

# -- snapshot of the library under test -----------------------------------------------------------
HASH=$(cd "$OT_REPO" && find offload_tensor compile_rules -name '*.py' -type f | LC_ALL=C sort \
       | xargs sha256sum | sha256sum | cut -c1-12)
SRC=$RESULTS/src-$HASH
if [ ! -d "$SRC" ]; then
  mkdir -p "$SRC.tmp" && cp -r "$OT_REPO/offload_tensor" "$OT_REPO/compile_rules" "$SRC.tmp/" \
    && find "$SRC.tmp" -name __pycache__ -prune -exec rm -rf {} + && mv "$SRC.tmp" "$SRC"
fi
GIT_HEAD=$(git -C "$OT_REPO" rev-parse --short HEAD 2>/dev/null || echo "?")
GIT_DIRTY=$(git -C "$OT_REPO" status --porcelain -- offload_tensor compile_rules 2>/dev/null | wc -l)
echo "offload_tensor from $OT_REPO (HEAD $GIT_HEAD, $GIT_DIRTY changed files) snapshot $SRC"

# -- offline stand-ins for the tiny Hub repos (accel-cpu) -----------------------------------------
if [[ " $SUITES " == *" accel-cpu "* ]] && [ ! -f "$HUB_CACHE/.done" ]; then
  rm -rf "$HUB_CACHE"
  PYTHONPATH=$PYLIB "$PY" "$HERE/make_local_hub.py" "$HUB_CACHE" && touch "$HUB_CACHE/.done" || exit 1
fi

XDIST_ARGS=""
[ "$XDIST" != "0" ] && XDIST_ARGS="-n $XDIST"
eval "EXTRA=($PYTEST_ARGS)"   # shell words, so that -k "a and b" stays one argument

FILES="tests/models/transformers/test_models_transformer_sd3.py
       tests/models/autoencoders/test_models_autoencoder_kl.py
       tests/models/transformers/test_models_transformer_flux.py
       tests/quantization/torchao/test_torchao.py"

for suite in $SUITES; do
  if [ "$suite" = core ]; then
    UNSKIP=""                # nothing unskipped, no Hub stand-ins
    HUB=""
  else
    UNSKIP='.'               # accel-cpu: only the tests skipped for want of an accelerator, unskipped
    HUB=$HUB_CACHE
  fi
  for mode in $MODES; do
    OUT=$RESULTS/$suite/$mode
    rm -rf "$OUT"; mkdir -p "$OUT"
    echo "[$suite/$mode] running, log: $OUT/log.txt"
    START=$(date +%s.%N)
    (
      cd "$TESTS" || exit 1
      export PYTHONPATH=$SRC:$HERE:$PYLIB
      export DSUITE_MODE=$mode DSUITE_OUT=$OUT DSUITE_UNSKIP_ACCEL=$UNSKIP DSUITE_TEST_TIMEOUT=$TEST_TIMEOUT
      if [ -n "$UNSKIP" ]; then export DSUITE_ONLY_UNSKIPPED=1; else unset DSUITE_ONLY_UNSKIPPED; fi
      export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
      if [ -n "$HUB" ]; then export HF_HUB_CACHE=$HUB; else export HF_HUB_CACHE=$OUT/empty-hub-cache; fi
      # shellcheck disable=SC2086
      exec "$PY" -m pytest -q -p no:cacheprovider -p dsuite_plugin $XDIST_ARGS --tb=short -rfE \
        --junitxml="$OUT/junit.xml" -o junit_logging=no "${EXTRA[@]}" $FILES
    ) > "$OUT/log.txt" 2>&1
    RC=$?
    END=$(date +%s.%N)
    WALL=$("$PY" -c "print(round($END - $START, 1))")
    SUITE_NAME=$suite MODE_NAME=$mode RC=$RC WALL=$WALL START=$START OT_REPO=$OT_REPO GIT_HEAD=$GIT_HEAD \
    GIT_DIRTY=$GIT_DIRTY SRC=$SRC XDIST=$XDIST PYTEST_ARGS=$PYTEST_ARGS "$PY" - "$OUT/meta.json" <<'EOF'
import json, os, sys
e = os.environ
json.dump({"suite": e["SUITE_NAME"], "mode": e["MODE_NAME"], "rc": int(e["RC"]), "wall_s": float(e["WALL"]),
           "started": float(e["START"]), "ot_repo": e["OT_REPO"], "ot_head": e["GIT_HEAD"],
           "ot_dirty_files": int(e["GIT_DIRTY"]), "ot_snapshot": e["SRC"], "xdist": e["XDIST"],
           "pytest_args": e["PYTEST_ARGS"]}, open(sys.argv[1], "w"), indent=1)
EOF
    echo "[$suite/$mode] exit $RC, ${WALL}s: $(grep -E '^[0-9]+ (passed|failed|error|skipped|deselected).* in [0-9.]+s' "$OUT/log.txt" | tail -1)"
  done
done

PYTHONPATH=$HERE "$PY" "$HERE/make_report.py" "$RESULTS" "$REPORT" && echo "report: $REPORT"
