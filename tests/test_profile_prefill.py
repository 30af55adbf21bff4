"""scripts/profile_prefill.py runs end to end on the CPU (a tiny shape) and refuses a missing GPU
clearly."""
import re

import pytest
import torch

from script_run import run_script


def run(*args):
    return run_script("profile_prefill.py", *args)


def test_cpu_profile_of_a_tiny_prefill():
    result = run("tiny", "--device", "cpu", "--length", "48", "--rounds", "2", "--top", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "tiny float32, prefill 48 tokens on cpu" in out
    wall = float(re.search(r"wall ms\s+median\s+([\d.]+)", out).group(1))
    enqueue = float(re.search(r"enqueue ms median\s+([\d.]+)", out).group(1))
    assert 0 < enqueue <= wall
    total = float(re.search(r"operator \(self CPU\) ms total\s+([\d.]+)", out).group(1))
    assert total > 0
    listed = re.findall(r"^\s+[\d.]+ ms\s+\d+ x  aten::", out, flags=re.M)
    assert len(listed) == 3  # --top 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_is_refused_with_the_fix():
    result = run("tiny")
    assert result.returncode == 1
    assert "no CUDA GPU here; pass --device cpu" in result.stderr
