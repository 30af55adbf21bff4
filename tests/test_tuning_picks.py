"""scripts/tuning_picks.py: picks dumped, read back and pinned; timings kept per key; bad files
and flags refused. (Triton's own autotuning runs on the GPU only; here `Autotuner.run` is
replaced by one that does what it does to the tuner: a pick in `cache`, the candidates' times in
`configs_timings`.)"""
import importlib.util
import json
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.runtime.autotuner import Autotuner  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tuning_picks.py"
spec = importlib.util.spec_from_file_location("tuning_picks", SCRIPT)
tp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tp)

CONFIGS = [triton.Config({"BLOCK": 32}, num_warps=4, num_stages=2),
           triton.Config({"BLOCK": 64}, num_warps=8, num_stages=3)]
KEY = (4096, 1, "torch.bfloat16")


@triton.jit
def _kernel(x_ptr, N, BLOCK: triton.language.constexpr):
    pass


@pytest.fixture(autouse=True)
def _restore_autotuner(monkeypatch):
    """`Picks.install` patches the class; undo it after each test."""
    monkeypatch.setattr(Autotuner, "__init__", Autotuner.__init__)
    monkeypatch.setattr(Autotuner, "run", Autotuner.run)


def _tuner():
    return triton.autotune(configs=CONFIGS, key=["N"])(_kernel)


def _fake_run(times):
    """What Autotuner.run leaves after timing the candidates for KEY: the fastest in `cache`."""
    def run(tuner, *args, **kwargs):
        tuner.configs_timings = {c: [t] for c, t in zip(tuner.configs, times)}
        tuner.cache[KEY] = min(tuner.configs_timings, key=tuner.configs_timings.get)
    return run


def test_dump_records_each_pick_with_the_times_of_its_candidates(tmp_path, monkeypatch):
    monkeypatch.setattr(Autotuner, "run", _fake_run([0.012, 0.010]))
    picks = tp.Picks()
    picks.install()
    tuner = _tuner()
    tuner.run()
    path = tmp_path / "picks.json"
    tp.write_dump(str(path), picks, ["bench", "--shape", "tiny"])
    data = json.loads(path.read_text())
    assert data["format"] == tp.FORMAT and data["command"] == ["bench", "--shape", "tiny"]
    [record] = data["picks"]
    assert record["kernel"] == "_kernel" and record["key"] == list(KEY) and not record["pinned"]
    assert record["config"] == tp.config_dict(CONFIGS[1])
    assert record["config"]["kwargs"] == {"BLOCK": 64} and record["config"]["num_warps"] == 8
    # fastest first, each candidate with its time
    assert record["timings_ms"] == [[tp.config_dict(CONFIGS[1]), [0.010]],
                                    [tp.config_dict(CONFIGS[0]), [0.012]]]


def test_a_pin_replaces_the_timing_on_another_run(tmp_path, monkeypatch):
    monkeypatch.setattr(Autotuner, "run", _fake_run([0.012, 0.010]))
    picks = tp.Picks()
    picks.install()
    _tuner().run()
    path = tmp_path / "picks.json"
    tp.write_dump(str(path), picks, ["bench"])
    data = json.loads(path.read_text())
    data["picks"][0]["config"] = tp.config_dict(CONFIGS[0])  # pin the slower one
    path.write_text(json.dumps(data))

    pinned = tp.Picks(tp.read_pins(str(path)))
    pinned.install()
    tuner = _tuner()
    # before any run: Triton will time nothing for KEY
    assert [tp.config_dict(c) for c in tuner.cache.values()] == [tp.config_dict(CONFIGS[0])]
    assert pinned.unused_pins() == []
    [record] = pinned.records()[-1:]
    assert record["pinned"] and record["config"] == tp.config_dict(CONFIGS[0])


def test_a_pin_beyond_the_base_configs_is_taken_and_one_no_kernel_meets_is_reported(tmp_path):
    """The GEMVs' candidates are made at tuning time (SPLIT_K per shape), so a pin need not be
    one of the tuner's base configs; a pin for a kernel the command never makes is listed."""
    made = {"kwargs": {"BLOCK": 128, "SPLIT_K": 4}, "num_warps": 4, "num_stages": 2, "num_ctas": 1,
            "maxnreg": None}
    path = tmp_path / "picks.json"
    path.write_text(json.dumps({"format": tp.FORMAT, "picks": [
        {"kernel": "_kernel", "key": list(KEY), "config": made},
        {"kernel": "_other_kernel", "key": [1], "config": tp.config_dict(CONFIGS[0])}]}))
    picks = tp.Picks(tp.read_pins(str(path)))
    picks.install()
    tuner = _tuner()
    assert [tp.config_dict(c) for c in tuner.cache.values()] == [made]
    assert list(tuner.cache) == [KEY]
    assert picks.unused_pins() == [("_other_kernel", (1,))]


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read it"),
    (json.dumps({"format": 99, "picks": []}), "not a tuning_picks --dump file"),
    (json.dumps({"format": 1, "picks": [{"kernel": "k"}]}), "pick 0 lacks kernel, key or config"),
    (json.dumps({"format": 1, "picks": [{"kernel": "k", "key": [], "config": {"kwargs": {}}}]}),
     "pick 0: not a config .*num_warps"),
])
def test_bad_pin_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "picks.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        tp.read_pins(str(path))


def test_flags_without_a_command_or_a_file_are_refused(capsys):
    for argv in (["--dump", "x.json"], ["--", "bench"]):
        with pytest.raises(SystemExit) as exit_info:
            tp.main(argv)
        assert exit_info.value.code == 2
    assert "give --dump FILE and/or --pin FILE" in capsys.readouterr().err


def test_it_wraps_a_tachylm_command(tmp_path):
    """End to end on the CPU (no autotuned kernel runs there): the command runs, its exit code
    comes back and the dump is written; a failing command's code too."""
    from script_run import run_script

    dump = tmp_path / "picks.json"
    ok = run_script("tuning_picks.py", "--dump", str(dump), "--", "bench", "--shape", "tiny",
                    "--new-tokens", "4", "--repeats", "1", "--device", "cpu", timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "decode b1" in ok.stdout
    data = json.loads(dump.read_text())
    assert data["command"][:3] == ["bench", "--shape", "tiny"] and data["picks"] == []
    bad = run_script("tuning_picks.py", "--dump", str(dump), "--", "bench", "--shape", "nope",
                     timeout=600)
    assert bad.returncode != 0 and "unknown shape 'nope'" in bad.stderr
