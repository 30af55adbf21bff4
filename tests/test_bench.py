"""bench / `tachylm bench`: every reported field present and sane, the compiled-vs-eager check,
the Hugging Face baseline on the same weights, and clear errors for bad input (tiny shape, CPU)."""

import json
import os
import sys

import pytest
import torch

from tachylm import bench, cli_bench
from tachylm.config import ModelConfig
from tachylm.steps import Steps

QUICK = ["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--prompt-len", "5",
         "--new-tokens", "4", "--repeats", "2"]


def _options(**changes) -> bench.BenchOptions:
    base = dict(shape="tiny", device="cpu", dtype="fp32", compile=False, batches=(1,), new_tokens=4,
                repeats=2)
    return bench.BenchOptions(**{**base, **changes})


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_sane(result: dict) -> None:
    missing = set(bench.RESULT_FIELDS) - set(result)
    assert not missing
    tps = result["tokens_per_s"]
    assert 0 < tps["min"] <= tps["median"] <= tps["max"]
    assert result["ttft_s"] > 0 and result["prefill_tokens_per_s"] > 0
    assert result["weight_bytes"] > 0 and result["kv_bytes_per_token"] > 0
    assert result["bytes_per_step"] == pytest.approx(
        result["weight_bytes"] + result["batch"] * result["kv_bytes_per_token"])
    assert result["peak_gb_s"] > 0 and 0 < result["peak_percent"] < 200
    assert result["peak_memory_bytes"] > 0
    assert result["device_type"] == "cpu" and result["torch"] == torch.__version__ and result["date"]
    assert result["dtype"] == "float32" and result["shape"] == "tiny"
    assert result["checked"] and result["check"]["passed"] and result["check"]["tokens_equal"]


def test_cli_eager_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    argv = ["bench", *QUICK, "--no-compile", "--batch", "1,2", "--prefill", "32", "--context", "40",
            "--json", str(out)]
    assert cli_bench.main(argv) == 0
    results = _lines(out)
    assert [r["name"] for r in results] == ["decode b1", "decode b2", "prefill 32", "decode b1 @40",
                                            "decode b2 @40"]
    for r in results:
        _assert_sane(r)
        assert r["compiled"] is False and r["compile_s"] is None and r["baseline"] is None
        assert r["command"] == "tachylm " + " ".join(argv)
    decode, _, prefill, long_ctx, _ = results
    assert decode["sampling"] == {"temperature": 0.8, "top_k": 200}
    # Eager decode reads the filled positions only; the long context reads more of them.
    assert long_ctx["kv_positions_read"] == 40 + 5 + 4 / 2
    assert long_ctx["kv_bytes_per_token"] > decode["kv_bytes_per_token"]
    assert prefill["prompt_len"] == 32 and prefill["tokens_per_s_per_row"] == prefill["prefill_tokens_per_s"]
    table = capsys.readouterr().out
    assert "peak copy bandwidth" in table and "decode b2 @40" in table
    # --json appends
    assert cli_bench.main(["bench", *QUICK, "--no-compile", "--json", str(out)]) == 0
    assert len(_lines(out)) == 6


def test_compiled_run_checks_and_reports_compile_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")  # restored after the test
    out = tmp_path / "bench.jsonl"
    cache = tmp_path / "inductor"
    argv = ["bench", *QUICK, "--compile", "--compile-backend", "eager", "--compile-cache", str(cache),
            "--prefill", "16", "--json", str(out)]
    assert cli_bench.main(argv) == 0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache) and cache.is_dir()
    for r in _lines(out):
        _assert_sane(r)
        assert r["compiled"] and r["compile_backend"] == "eager" and r["compile_cache"] == str(cache)
        assert r["compile_s"] >= 0 and r["warmup_s"] > 0
    decode = _lines(out)[0]
    # Compiled decode has static shapes: it reads the whole cache (5 + 4 positions, rounded to 16).
    assert decode["kv_positions_read"] == 16


def _perturb_compiled_decode(monkeypatch):
    original = Steps.decode

    def decode(self, *args, **kwargs):
        token, logits = original(self, *args, **kwargs)
        return token, logits + 1.0 if self.compile_decode and logits is not None else logits

    monkeypatch.setattr(Steps, "decode", decode)


def test_int8_run_reports_its_folded_norms_and_the_flag_keeps_them(capsys, tmp_path):
    """int8 folds the tiny shape's 2 x 2 layer norms and the final one (its head quantized);
    --no-fold-norms keeps them. The result says which it measured."""
    for flag, folded in (("--fold-norms", 5), ("--no-fold-norms", 0)):
        out = tmp_path / f"{flag}.jsonl"
        argv = ["bench", *QUICK, "--no-compile", "--quant", "int8", "--quant-head", flag,
                "--json", str(out)]
        assert cli_bench.main(argv) == 0
        (result,) = _lines(out)
        _assert_sane(result)
        assert result["quant"] == "int8" and result["folded_norms"] == folded


def test_check_fails_loudly_when_compiled_differs(monkeypatch):
    _perturb_compiled_decode(monkeypatch)
    options = _options(compile=True, compile_backend="eager")
    with pytest.raises(RuntimeError, match="differs from eager.*--no-check"):
        bench.run_bench(options)
    # --no-check times it anyway, marked unchecked
    [result] = bench.run_bench(_options(compile=True, compile_backend="eager", check=False))
    assert result["checked"] is False and result["check"] is None


def test_hf_baseline_on_same_weights():
    pytest.importorskip("transformers")
    [result] = bench.run_bench(_options(baseline="hf", batches=(2,)))
    base = result["baseline"]
    assert base["max_rel_diff"] < 1e-4 and base["matches"]  # the weights really are the same
    assert base["tokens_per_s"]["median"] > 0
    assert base["ratio"] == pytest.approx(result["end_to_end_tokens_per_s"] / base["tokens_per_s"]["median"])


@pytest.mark.parametrize("name", sorted(bench.SHAPES))
def test_hf_config_round_trips(name):
    config = bench.SHAPES[name]
    assert ModelConfig.from_hf(bench.hf_config_dict(config)) == config


def test_weight_bytes_count_a_tied_embedding_only():
    untied = bench.SHAPES["tiny"]
    for config in (untied, untied.replace(tie_embeddings=True)):
        model = bench.build_random_model(config, dtype=torch.float32, max_seq_len=16)
        embedding = 0 if config.tie_embeddings else config.vocab_size * config.dim
        assert bench.weight_bytes(model) == 4 * (config.n_params - embedding)


@pytest.mark.parametrize("changes, message", [
    (dict(shape="gpt-9"), "unknown shape 'gpt-9'; choose one of llama-3.1-8b"),
    (dict(model="x"), "exactly one of --shape"),
    (dict(shape=None), "exactly one of --shape"),
    (dict(batches=(1, 0)), "--batch must be an integer >= 1"),
    (dict(batches=()), "--batch needs at least one"),
    (dict(new_tokens=1), "--new-tokens must be an integer >= 2"),
    (dict(repeats=0), "--repeats must be"),
    (dict(prefill=(4096,)), "--prefill 4096 is past the model's 2048"),
    (dict(context=2040), "past the model's 2048"),
    (dict(temperature=-1.0), "temperature"),
    (dict(baseline="vllm"), "unknown baseline"),
    (dict(dtype="int3"), "unknown dtype"),
    (dict(check_tolerance=0.0), "--check-tol"),
])
def test_bad_options_are_rejected_clearly(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        bench.validate(_options(**changes))


def test_cli_rejects_bad_lists(capsys):
    with pytest.raises(SystemExit):
        cli_bench.main(["bench", "--batch", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_plot(tmp_path, monkeypatch):
    out = tmp_path / "bw.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="--plot needs matplotlib"):
            cli_bench.main(["bench", *QUICK, "--no-compile", "--plot", str(out)])
        return
    assert cli_bench.main(["bench", *QUICK, "--no-compile", "--batch", "1,2", "--plot", str(out)]) == 0
    assert out.stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(RuntimeError, match="--plot needs matplotlib"):
        cli_bench.main(["bench", *QUICK, "--no-compile", "--plot", str(out)])


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_output_paths_are_checked_before_the_runs(tmp_path, monkeypatch, flag):
    runs = []
    monkeypatch.setattr(cli_bench, "_import_pyplot_figure", lambda: None)
    monkeypatch.setattr(bench, "iter_bench", lambda *a, **kw: runs.append(a) or iter(()))
    with pytest.raises(ValueError, match="folder .* does not exist"):
        cli_bench.main(["bench", *QUICK, flag, str(tmp_path / "missing" / "out")])
    with pytest.raises(ValueError, match="is a folder"):
        cli_bench.main(["bench", *QUICK, flag, str(tmp_path)])
    assert runs == []


def test_copy_bandwidth_is_positive():
    assert bench.measure_copy_bandwidth(torch.device("cpu"), 1 << 20, repeats=2) > 0
