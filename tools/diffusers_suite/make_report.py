"""Compare the plain and wrapped runs written by run.sh and write report.md.

usage: python make_report.py <results dir> <report.md>

Per suite and module: counts per run. Then every test that passes plain and does not pass wrapped
(failed, error, crashed, skipped, or missing), with the first line of its error, the innermost
offload_tensor/compile_rules frame of its traceback, and a category:
  (a) a refusal the issue lists as deliberate: a dtype change after wrapping, another offloader
      (group offloading, layerwise casting, cpu offload, accelerate hooks), training (requires_grad)
      of the frozen offloaded weights;
  (b) a check of a weight's class (isinstance of a torchao/quanto tensor class);
  (c) anything else: a bug in offload_tensor by the issue's terms.
The category comes from notes.json when a note matches the test and the error still contains the
note's text, else from the heuristics below (marked "auto"). Then the unwrap failures and the
models that were not wrapped.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

MODES = ("plain", "sync", "disk")
HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.environ.get("DIFFUSERS_TESTS", "")  # the folder holding diffusers' tests/ (run.sh sets it)


# -- reading ------------------------------------------------------------------------------------


def nodeid_key(nodeid: str) -> str:
    parts = nodeid.split("::")
    mod = parts[0][:-3].replace("/", ".") if parts[0].endswith(".py") else parts[0]
    return ".".join([mod, *parts[1:-1]]) + "::" + parts[-1]


def key_nodeid(key: str, modules: list[str]) -> str:
    head, name = key.split("::", 1)
    for m in modules:
        dotted = m[:-3].replace("/", ".")
        if head == dotted or head.startswith(dotted + "."):
            rest = head[len(dotted) + 1 :]
            return "::".join([m, *([rest] if rest else []), name])
    return key


RANK = {"missing": 0, "skipped": 1, "passed": 2, "failed": 3, "error": 4, "crashed": 5}


def read_junit(path):
    """{key: {"outcome", "message", "text"}}; a test reported twice (a teardown error) keeps the worst."""
    out = {}
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    for tc in root.iter("testcase"):
        key = f"{tc.get('classname')}::{tc.get('name')}"
        outcome, message, text = "passed", "", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                message = child.get("message") or ""
                text = child.text or ""
                if "crashed" in message and "worker" in message:
                    outcome = "crashed"
                else:
                    outcome = "failed" if child.tag == "failure" else "error"
                break
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        prev = out.get(key)
        if prev is None or RANK[outcome] > RANK[prev["outcome"]]:
            out[key] = {"outcome": outcome, "message": message, "text": text, "time": float(tc.get("time") or 0)}
    return out


def read_events(folder):
    ev = []
    for f in sorted(glob.glob(os.path.join(folder, "events-*.jsonl"))):
        with open(f) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        ev.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return ev


def read_meta(folder):
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            return json.load(f)
    except OSError:
        return None


# -- classifying --------------------------------------------------------------------------------

FRAME = re.compile(r"((?:offload_tensor|compile_rules)/[\w/]+\.py):(\d+):? in (\w+)")


def first_line(r):
    for src in (r.get("message", ""), r.get("text", "")):
        for line in src.splitlines():
            line = line.strip()
            if line:
                return line[:300]
    return ""


def error_lines(text):
    return "\n".join(line[1:].strip() for line in text.splitlines() if line.startswith("E "))


def innermost_frame(text):
    frames = FRAME.findall(text or "")
    return f"{frames[-1][0]}:{frames[-1][1]} in {frames[-1][2]}" if frames else None


DELIBERATE = [
    (r"changing its dtype .* after wrapping is not supported", "dtype change after wrapping"),
    (
        r"parameter to .*, an offloaded .* would change its shape or dtype",
        "dtype change after wrapping (assigned parameter)",
    ),
    (r"cannot require grad: offloaded weights are frozen", "requires_grad on frozen weights (training)"),
    (r"already offloaded by offload_tensor.*combining two offloaders", "another offloader on a wrapped model"),
    (
        r"(enable_group_offload|enable_layerwise_casting|enable_model_cpu_offload|enable_sequential_cpu_offload)\(\) on",
        "another offloader on a wrapped model",
    ),
]
WEIGHT_CLASSES = r"(TorchAOBaseTensor|AffineQuantizedTensor|Int8Tensor|Int4\w*Tensor|Float8\w*Tensor|LinearActivationQuantizedTensor|QTensor|QBytesTensor|WeightQBytesTensor|MarlinF8QBytesTensor|\bQLinear\b)"


def classify(nodeid, res, notes):
    text = res.get("text", "") + "\n" + res.get("message", "")
    for note in notes:
        if re.search(note["test"], nodeid) and note.get("error_contains", "") in text:
            return note["category"], note.get("why", ""), "note"
    errs = error_lines(text) or text
    for pat, why in DELIBERATE:
        if re.search(pat, errs, re.S):
            return "a", why, "auto"
    if re.search(r"isinstance\(", text) and re.search(WEIGHT_CLASSES, errs + "\n" + text):
        return "b", "checks the class of a weight", "auto"
    return "c", "", "auto"


# -- writing ------------------------------------------------------------------------------------


def md_escape(s):
    return (s or "").replace("|", "\\|").replace("\n", " ")


def main(results, report_path):
    notes = []
    notes_path = os.path.join(HERE, "notes.json")
    if os.path.exists(notes_path):
        with open(notes_path) as f:
            notes = json.load(f)
    lines = ["# offload_tensor x diffusers' own model tests", ""]
    lines.append(
        f"Generated by `make_report.py` from `{results}`. Rerun everything: `tools/diffusers_suite/run.sh all`."
    )
    lines.append("")
    known = ["core", "accel-cpu"]
    found = [
        d
        for d in sorted(os.listdir(results))
        if os.path.isdir(os.path.join(results, d))
        and not d.startswith("src-")
        and d not in ("pylib", "hub-cache")  # run.sh's test-only packages and offline Hub, not suites
    ]
    suites = [s for s in known if s in found] + [s for s in found if s not in known]
    summary_c, summary_unwrap, incomplete = [], [], []
    for suite in suites:
        runs, metas, events = {}, {}, {}
        for mode in MODES:
            folder = os.path.join(results, suite, mode)
            runs[mode] = read_junit(os.path.join(folder, "junit.xml"))
            metas[mode] = read_meta(folder)
            events[mode] = read_events(folder)
        lines += [f"## Suite `{suite}`", ""]
        if suite == "core":
            lines += [
                "The four modules (SD3 transformer, AutoencoderKL, Flux transformer, torchao) as they are: on this CPU machine every test marked for an accelerator skips, and "
                "tests that need the Hub fail in every run (offline).",
                "",
            ]
        if suite == "accel-cpu":
            lines += [
                'Exactly the tests of the same modules that `core` skips for want of an accelerator ("test requires a '
                'hardware accelerator" / "accelerator+PyTorch"), run on the CPU with that skip lifted '
                '(`torch_device == "cpu"`; other skips stay: multi-GPU, CUDA-only kernels, bitsandbytes/GGUF/'
                "ModelOpt/SDNQ not installed). The tiny Hub repos the TorchAo/Quanto classes load "
                "(`hf-internal-testing/tiny-flux-pipe`, `tiny-flux-transformer`, `tiny-sd35-pipe`) are offline stand-ins "
                "built by `make_local_hub.py` (the test files' own tiny configs, seeded random weights). Many of these "
                "tests were written for a GPU and fail plain here (group offloading with streams, cpu offload); "
                "only tests passing plain count.",
                "",
            ]
        lines += [
            "| run | exit | wall time | offload_tensor | passed | failed | error | crashed | skipped |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode in MODES:
            m, r = metas[mode], runs[mode]
            if m is None or r is None:
                lines.append(f"| {mode} | not run | | | | | | | |")
                continue
            c = collections.Counter(v["outcome"] for v in r.values())
            src = f"{os.path.basename(m['ot_snapshot'])} (HEAD {m['ot_head']}, {m['ot_dirty_files']} files changed)"
            lines.append(
                f"| {mode} | {m['rc']} | {m['wall_s']:.0f} s | {src} | {c['passed']} | {c['failed']} | {c['error']} | {c['crashed']} | {c['skipped']} |"
            )
        lines.append("")
        snaps = {m["ot_snapshot"] for m in metas.values() if m}
        if len(snaps) > 1:
            lines += [
                "**Warning: these runs tested different offload_tensor snapshots; rerun them together (`run.sh all`).**",
                "",
            ]
        missing = [m for m in MODES if runs[m] is None]
        if missing:
            incomplete.append(f"{suite}: no {', '.join(missing)} run")
        if runs["plain"] is None:
            lines += ["(no plain run)", ""]
            continue
        # module names: junit classnames are module.Class; find the module part by the file names
        files = sorted(
            {
                os.path.relpath(p, TESTS)
                for p in glob.glob(os.path.join(TESTS, "tests", "**", "test_*.py"), recursive=True)
            }
        )
        used_files = [f for f in files if any(k.startswith(f[:-3].replace("/", ".") + ".") for k in runs["plain"])]

        def module_of(key):
            for f in used_files:
                if key.startswith(f[:-3].replace("/", ".") + "."):
                    return f
            return "?"

        lines += [
            "### Per module",
            "",
            "| module | run | passed | failed | error | crashed | skipped | passed plain, not wrapped |",
            "|---|---|---|---|---|---|---|---|",
        ]
        regressions = {}  # key -> {mode: result}
        for key, res in runs["plain"].items():
            if res["outcome"] != "passed":
                continue
            for mode in ("sync", "disk"):
                if runs[mode] is None:
                    continue
                w = runs[mode].get(key, {"outcome": "missing", "message": "not in this run's junit", "text": ""})
                if w["outcome"] != "passed":
                    regressions.setdefault(key, {})[mode] = w
        for f in used_files:
            for mode in MODES:
                if runs[mode] is None:
                    continue
                c = collections.Counter(v["outcome"] for k, v in runs[mode].items() if module_of(k) == f)
                reg = (
                    ""
                    if mode == "plain"
                    else str(sum(1 for k, v in regressions.items() if module_of(k) == f and mode in v))
                )
                lines.append(
                    f"| `{f}` | {mode} | {c['passed']} | {c['failed']} | {c['error']} | {c['crashed']} | {c['skipped']} | {reg} |"
                )
        lines.append("")

        lines += [
            "### Per test class (passed / failed+error+crashed / skipped)",
            "",
            "| class | plain | sync | disk | passed plain, not wrapped |",
            "|---|---|---|---|---|",
        ]
        classes = sorted({k.split("::")[0] for k in runs["plain"]})

        def pfs(mode, cls):
            if runs[mode] is None:
                return ""
            c = collections.Counter(v["outcome"] for k, v in runs[mode].items() if k.split("::")[0] == cls)
            return f"{c['passed']} / {c['failed'] + c['error'] + c['crashed']} / {c['skipped']}"

        for cls in classes:
            n = sum(1 for k in regressions if k.split("::")[0] == cls)
            lines.append(
                f"| `{cls.rsplit('.', 1)[-1]}` | {pfs('plain', cls)} | {pfs('sync', cls)} | {pfs('disk', cls)} | {n or ''} |"
            )
        lines.append("")

        # how many plain-passing tests actually ran with a wrapped model
        for mode in ("sync", "disk"):
            if runs[mode] is None:
                continue
            wrapped_tests = {e["nodeid"] for e in events[mode] if e["kind"] == "wrapped"}
            passing = [k for k, v in runs["plain"].items() if v["outcome"] == "passed"]
            with_model = [k for k in passing if key_nodeid(k, used_files) in wrapped_tests]
            both = [k for k in with_model if runs[mode].get(k, {}).get("outcome") == "passed"]
            lines.append(
                f"- `{mode}`: of {len(passing)} tests passing plain, {len(with_model)} built at least one model that was wrapped; "
                f"{len(both)} of those pass wrapped too."
            )
        lines.append("")

        lines += ["### Passed plain, not passed wrapped", ""]
        if not regressions:
            lines += ["None.", ""]
        else:
            lines += [
                "| test | sync | disk | first line of the error (sync, else disk) | innermost offload_tensor frame | category |",
                "|---|---|---|---|---|---|",
            ]
            for key in sorted(regressions):
                nodeid = key_nodeid(key, used_files)
                by_mode = regressions[key]
                show = by_mode.get("sync") or by_mode.get("disk")
                cat, why, src = classify(nodeid, show, notes)
                frame = innermost_frame(show.get("text", "")) or ""
                outcome = {m: (by_mode[m]["outcome"] if m in by_mode else "passed") for m in ("sync", "disk")}
                label = f"({cat}) {why}" + (" [auto]" if src == "auto" else "")
                lines.append(
                    f"| `{md_escape(nodeid)}` | {outcome['sync']} | {outcome['disk']} | {md_escape(first_line(show))[:220]} | "
                    f"{md_escape(frame)} | {md_escape(label)} |"
                )
                if cat == "c":
                    summary_c.append((suite, nodeid, outcome, first_line(show), frame, why))
                # the disk run failing differently from sync
                if (
                    "sync" in by_mode
                    and "disk" in by_mode
                    and first_line(by_mode["sync"]) != first_line(by_mode["disk"])
                ):
                    lines.append(
                        f"| ↳ disk: | | | {md_escape(first_line(by_mode['disk']))[:220]} | {md_escape(innermost_frame(by_mode['disk'].get('text', '')) or '')} | |"
                    )
            lines.append("")
            cats = collections.Counter(
                classify(key_nodeid(k, used_files), (v.get("sync") or v.get("disk")), notes)[0]
                for k, v in regressions.items()
            )
            lines += [f"Categories: (a) {cats['a']}, (b) {cats['b']}, (c) {cats['c']}.", ""]

        # the reverse: fails plain, passes wrapped (not a problem, but worth knowing)
        rev = []
        for key, res in runs["plain"].items():
            if res["outcome"] in ("failed", "error"):
                for mode in ("sync", "disk"):
                    if runs[mode] is not None and runs[mode].get(key, {}).get("outcome") == "passed":
                        rev.append((key_nodeid(key, used_files), mode))
        if rev:
            lines += ["Failing plain but passing wrapped: " + ", ".join(f"`{n}` ({m})" for n, m in rev), ""]

        lines += ["### Unwrap failures (after each test, `unwrap_model` on every model still wrapped)", ""]
        any_unwrap = False
        for mode in ("sync", "disk"):
            fails = [e for e in events[mode] if e["kind"] == "unwrap_failed"]
            unwrapped = sum(1 for e in events[mode] if e["kind"] == "unwrapped")
            lines.append(f"- `{mode}`: {unwrapped} models unwrapped after their test, {len(fails)} failures.")
            groups = collections.defaultdict(list)
            for e in fails:
                groups[(e.get("exc_type"), (e.get("exc_msg") or "")[:200], e.get("ot_frame"))].append(e)
            for (t, msg, frame), es in sorted(groups.items(), key=lambda kv: -len(kv[1])):
                any_unwrap = True
                tests = sorted({e["nodeid"] for e in es})
                lines.append(
                    f"  - {len(es)} x `{t}: {md_escape(msg)}` at `{frame}` ({es[0]['cls']}); tests: "
                    + ", ".join(f"`{x}`" for x in tests[:8])
                    + (" ..." if len(tests) > 8 else "")
                )
                summary_unwrap.append((suite, mode, t, msg, frame, tests))
        lines.append("")
        if not any_unwrap:
            lines += ["No unwrap failures.", ""]

        lines += ["### Models the plugin built and did not wrap", ""]
        for mode in ("sync", "disk"):
            ev = events[mode]
            wrapped = [e for e in ev if e["kind"] == "wrapped"]
            unfetched = sum(e.get("n_not_fetched", 0) for e in wrapped)
            leftplain = sum(e.get("n_left_plain", 0) for e in wrapped)
            lines.append(
                f"- `{mode}`: {len(wrapped)} models wrapped ({sum(e['n_params'] for e in wrapped)} weights; "
                f"{unfetched} weights not served by the fetch op, {leftplain} parameters left plain)."
            )
            skips = collections.Counter()
            examples = {}
            for e in ev:
                if e["kind"] in ("wrap_skipped", "wrap_refused"):
                    reason = e.get("reason") or f"{e.get('exc_type')}: {(e.get('exc_msg') or '')[:160]}"
                    k = (e["kind"], e["cls"], e["how"], reason)
                    skips[k] += 1
                    examples.setdefault(k, e["nodeid"])
            for (kind, cls, how, reason), n in skips.most_common():
                lines.append(
                    f"  - {n} x {kind} {cls} (built by {how}): {md_escape(reason)}; e.g. `{examples[(kind, cls, how, reason)]}`"
                )
        lines.append("")

    # -- summary at the top -----------------------------------------------------------------
    head = ["## Summary", ""]
    if incomplete:
        head += ["**Incomplete: " + "; ".join(incomplete) + ". The findings below cover only the runs present.**", ""]
    if summary_c:
        head.append(
            f"{len(summary_c)} tests pass plain and fail wrapped for a reason outside the issue's exceptions (category c):"
        )
        head.append("")
        by_frame = collections.defaultdict(list)
        for suite, nodeid, outcome, fl, frame, why in summary_c:
            by_frame[(frame or "(no offload_tensor frame)", why)].append((suite, nodeid, outcome, fl))
        for (frame, why), items in sorted(by_frame.items(), key=lambda kv: -len(kv[1])):
            head.append(f"- `{frame}`" + (f": {why}" if why else "") + f" ({len(items)} tests)")
            for suite, nodeid, outcome, fl in items:
                head.append(
                    f"  - [{suite}] `{nodeid}` (sync {outcome['sync']}, disk {outcome['disk']}): {md_escape(fl)[:200]}"
                )
    else:
        head.append("No test passes plain and fails wrapped outside categories (a) and (b).")
    head.append("")
    if summary_unwrap:
        head.append("Unwrap failures:")
        for suite, mode, t, msg, frame, tests in summary_unwrap:
            head.append(f"- [{suite}/{mode}] `{t}: {md_escape(msg)}` at `{frame}` in {len(tests)} tests")
    else:
        head.append("No model was left unable to unwrap.")
    head.append("")
    lines[4:4] = head
    with open(report_path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
