#!/usr/bin/env bash
# Checks dsuite_plugin itself on a tiny Flux model: where it wraps, and that unwrap problems are logged.
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OT_REPO=${OT_REPO:-$(cd "$HERE/../.." && pwd)}
VENV=${VENV:-$OT_REPO/.venv}
rc=0
for mode in sync disk; do
  OUT=$(mktemp -d)
  (cd "$HERE/selftest" && PYTHONPATH=$OT_REPO:$HERE:${TMPDIR:-/tmp}/offload_tensor_diffusers_suite/pylib DSUITE_MODE=$mode DSUITE_OUT=$OUT HF_HUB_OFFLINE=1 \
     "$VENV/bin/python" -m pytest -q -p no:cacheprovider -p dsuite_plugin test_plugin_selftest.py 2>&1 | tail -1) || rc=1
  "$VENV/bin/python" - "$OUT" "$mode" <<'PY' || rc=1
import glob, json, sys
ev = [json.loads(l) for f in glob.glob(sys.argv[1] + "/events-*.jsonl") for l in open(f)]
fails = [e for e in ev if e["kind"] == "unwrap_failed"]
skipped = [e for e in ev if e["kind"] == "wrap_skipped"]
copy_unwrapped = any(e["kind"] == "unwrapped" and "deepcopy" in e["nodeid"] for e in ev)
ok = (len(fails) == 1 and "broken_state" in fails[0]["nodeid"] and fails[0]["exc_type"] == "NotWrappedButOffloaded"
      and any(e.get("reason") == "meta weights" for e in skipped) and (copy_unwrapped or sys.argv[2] == "disk"))
print(sys.argv[2], "events:", "ok" if ok else "NOT ok", {"unwrap_failed": len(fails), "wrap_skipped": len(skipped), "deepcopy unwrapped": copy_unwrapped})
sys.exit(0 if ok else 1)
PY
  rm -rf "$OUT"
done
exit $rc
