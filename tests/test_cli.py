"""The offload-tensor command, run as users run it (a subprocess): every command, and every bad
input ending with exit status 2 and one line, no traceback."""

import subprocess
import sys
import time
from pathlib import Path

import pytest


def cli(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "offload_tensor", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_and_version_are_fast_and_import_no_torch():
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from offload_tensor.cli import main; main(['--help'])"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0 and "plan" in done.stdout and "examples:" in done.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys\ntry:\n from offload_tensor.cli import main; main(['--version'])\n"
         "except SystemExit: pass\nprint('torch' in sys.modules)"], capture_output=True, text=True,
    )  # fmt: skip
    assert probe.stdout.strip().splitlines() == [probe.stdout.strip().splitlines()[0], "False"]
    assert probe.stdout.startswith("offload-tensor ")
    assert time.perf_counter() - start < 20
    # the installed entry point beside this interpreter (the venv need not be on PATH)
    script = Path(sys.executable).parent / "offload-tensor"
    entry = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert entry.returncode == 0 and entry.stdout.startswith("offload-tensor ")


def test_plan_of_a_known_model_and_of_a_config_file(tmp_path):
    done = cli("plan", "--model", "flux-dev", "--budget", "12GiB", "--ram", "32GiB", "--bandwidth", "25GB")
    assert done.returncode == 0, done.stderr
    for term in (
        "S_total",
        "S_block",
        "S_leaf",
        "resident",
        "streamed",
        "pinned host",
        "per step",
        "min budget",
        "25.0 GB/s",
    ):
        assert term in done.stdout, term
    import json

    from offload_tensor.catalog import WAN_2_1_14B

    (tmp_path / "config.json").write_text(json.dumps(WAN_2_1_14B))
    done = cli("plan", "--config", str(tmp_path / "config.json"), "--budget", "16GiB", "--fp8")
    assert done.returncode == 0 and "float8_e4m3fn" in done.stdout, done.stderr


def test_demo_and_bench_run():
    done = cli("demo", "--device", "cpu", "--steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "streamed from disk" in done.stdout and "equal" in done.stdout
    done = cli("bench", "--device", "cpu", "--steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrapped ms/step" in done.stdout and "bandwidth:" in done.stdout


BAD = {
    "no command": [],
    "unknown command": ["train"],
    "bad device": ["demo", "--device", "gpu"],
    "no steps": ["demo", "--steps", "0"],
    "steps not a number": ["bench", "--steps", "many"],
    "unknown model": ["plan", "--model", "flux-pro", "--budget", "1GiB"],
    "unparsable budget": ["plan", "--model", "flux-dev", "--budget", "12 gigs"],
    "budget below minimum": ["plan", "--model", "flux-dev", "--budget", "1MiB"],
    "ram too small": ["plan", "--model", "flux-dev", "--ram", "1GiB"],
    "missing config": ["plan", "--config", "/nonexistent/config.json"],
    "bad dtype": ["plan", "--model", "flux-tiny", "--dtype", "float13"],
}
if not __import__("torch").cuda.is_available():
    BAD["cuda without cuda"] = ["demo", "--device", "cuda"]


@pytest.mark.parametrize("args", list(BAD.values()), ids=list(BAD))
def test_bad_input_exits_2_with_one_line(args):
    done = cli(*args, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "error" in lines[0]


def test_plan_for_the_disk_tier_needs_no_folder():
    done = cli("plan", "--model", "flux-dev", "--offload", "disk", "--budget", "12GiB", "--bandwidth", "2GB")
    assert done.returncode == 0, done.stderr
    assert "weights live on disk" in done.stdout and "from disk" in done.stdout


def test_plan_of_a_pipeline_index_says_to_pass_a_components_config(tmp_path):
    """model_index.json sits at the top of a pipeline's folder: a natural thing to pass, and a clear error."""
    import json

    from test_catalog import FLUX_INDEX

    (tmp_path / "model_index.json").write_text(json.dumps(FLUX_INDEX))
    done = cli("plan", "--config", str(tmp_path / "model_index.json"), timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "model_index.json of a pipeline (FluxPipeline)" in done.stderr
    assert f"pass one component's config.json, e.g. {tmp_path / 'transformer' / 'config.json'}" in done.stderr


SETTINGS = {  # the same message however a negative size is written
    "--budget -5GiB": (["--budget", "-5GiB"], "--budget='-5GiB' is negative"),
    "--budget=-5GiB": (["--budget=-5GiB"], "--budget='-5GiB' is negative"),
    "--ram -1GB": (["--ram", "-1GB"], "--ram='-1GB' is negative"),
    "--bandwidth -3GB": (["--bandwidth", "-3GB"], "--bandwidth='-3GB' is negative; use bytes per second > 0"),
    "--bandwidth -.5": (["--bandwidth", "-.5"], "--bandwidth='-.5' is negative"),
    "--budget -x": (["--budget", "-x"], "--budget='-x' is not a size"),
    "--bandwidth 0": (["--bandwidth", "0"], "--bandwidth='0' is not a rate; use bytes per second > 0"),
    "--prefetch 1000000": (["--prefetch", "1000000"], "prefetch=1000000 is more than FluxTransformer2DModel's 67"),
    "--prefetch -1": (["--prefetch", "-1"], "prefetch=-1 must be an int >= 0"),
}


@pytest.mark.parametrize("args, message", list(SETTINGS.values()), ids=list(SETTINGS))
def test_plan_settings_out_of_range_say_what_is_wrong(args, message, capsys, monkeypatch):
    """In this process (each error comes before a model is built, or from its plan): exit status
    2 and the message plan() gives."""
    from offload_tensor import cli as command

    monkeypatch.setattr(command, "_quiet", lambda: None)  # it sets this process's warning filters and loggers
    with pytest.raises(SystemExit) as exit:
        command.main(["plan", "--model", "flux-dev", *args])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
