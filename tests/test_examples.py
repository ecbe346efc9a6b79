"""The examples run as shipped (against the loopback emulator and in-process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RUNPOD_ENDPOINT_ID"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("name", ["fan_out_runpod.py"])
def test_example_runs(name: str) -> None:
    assert "COMPLETED" in run_example(name)


def test_fan_out_prints_a_table_for_both_runners() -> None:
    out = run_example("fan_out_emulated.py")
    assert "RunPodServerless → emulated endpoint" in out
    assert "LocalRunner" in out
    assert out.count("18/20 completed") == 2
    assert "CUDA out of memory (simulated)" in out
    # Four workers start cold: the first jobs on them are flagged.
    emulated = out.split("LocalRunner")[0]
    assert emulated.count(" yes ") == 4


def test_the_demo_routes_a_burst_over_the_pod_and_serverless(tmp_path: Path) -> None:
    pytest.importorskip("diffusers", reason="needs the worker extra")
    out = run_example("demo.py", cwd=tmp_path)
    assert "6/6 completed" in out
    assert "primary: expected" in out  # the pod kept the jobs it could finish first
    assert "overflow: primary expected" in out  # and the rest of the burst overflowed
    served = [line.split()[1] for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(served) == 6
    assert {"pod", "serverless"} <= set(served)
    layers = sorted((tmp_path / "demo-output").glob("job-*-layer-*.png"))
    assert len(layers) == 12
    assert all(png.read_bytes().startswith(b"\x89PNG") for png in layers)
