"""The examples run as shipped (against the loopback emulator and in-process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RUNPOD_ENDPOINT_ID"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("name", ["fan_out_runpod.py"])
def test_example_runs(name: str) -> None:
    assert "COMPLETED" in run_example(name)


def test_demo_prints_a_table_for_both_runners() -> None:
    out = run_example("demo.py")
    assert "RunPodServerless → emulated endpoint" in out
    assert "LocalRunner" in out
    assert out.count("18/20 completed") == 2
    assert "CUDA out of memory (simulated)" in out
    # Four workers start cold: the first jobs on them are flagged.
    emulated = out.split("LocalRunner")[0]
    assert emulated.count(" yes ") == 4
