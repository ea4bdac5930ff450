"""The demo and the quickstart example run and say what they promise."""

import subprocess
import sys
from pathlib import Path


from offload_tensor.demo import run


def test_demo_reports_equal_outputs_and_no_breaks(capsys):
    results = run(device="cpu", steps=2)
    eager, compiled = results["rows"]
    assert eager["equal"]
    assert compiled["max_abs_diff"] <= 1e-5
    assert compiled["graph_breaks"] == 0 and compiled["graphs"] <= compiled["plain_graphs"]
    assert compiled["recompiles"] <= compiled["plain_recompiles"]
    printed = capsys.readouterr().out
    assert "graph breaks" in printed
    report = results["report"]  # real offloading on the CPU too: the disk tier
    assert report.offloaded_bytes > 0 and report.by_tier.get("disk") == report.offloaded_bytes


def test_quickstart_example_runs():
    script = Path(__file__).parents[1] / "examples" / "quickstart.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "graph breaks: 0" in done.stdout and "unwrapped: Parameter" in done.stdout
    snr = float(done.stdout.split("output SQNR ")[1].split(" dB")[0])
    assert snr > 20, done.stdout
