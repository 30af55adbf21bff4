"""scripts/bench_attention_chain.py refuses bad flags, and a machine without CUDA, clearly."""
import pytest
import torch

from script_run import run_script


def run(*args):
    return run_script("bench_attention_chain.py", *args)


@pytest.mark.parametrize("args, message", [
    (["--filled", "2x"], "--filled takes comma-separated integers, got '2x'"),
    (["--splits", "8,a"], "--splits takes comma-separated integers, got '8,a'"),
    (["--slots", "4096", "--filled", "200,5000"], "--filled lengths must lie in 1..--slots (4096)"),
    (["--filled", "0"], "--filled lengths must lie in 1..--slots"),
    (["--splits", "0"], "--splits counts must be at least 1"),
])
def test_bad_flags_are_refused_with_the_reason(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so():
    result = run("--filled", "200")
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr
