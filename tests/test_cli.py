"""The command-line front end on the default model, and its clear errors."""

import io

import pytest

from tachylm.cli import main

pytestmark = pytest.mark.slow


def test_generate_prints_text_and_speed(capsys):
    code = main(["generate", "Say hello.", "-n", "12", "--seed", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip()
    assert "tokens/s" in err and "time to first token" in err


def test_generate_raw_and_greedy(capsys):
    assert main(["generate", "The sky is", "--raw", "-n", "6", "-t", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_reads_turns_until_eof(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n/reset\nWhat is 2+2?\n"))
    assert main(["chat", "-n", "8", "-t", "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "conversation cleared" in err
    assert out.count("\n") >= 2


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--model", "./missing.gguf"], "no such file"),
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--top-p", "2"], "top_p"),
    (["generate", "x", "--dtype", "float8"], "unknown dtype"),
    (["generate", "x", "--max-seq-len", "1"], "max-seq-len"),
    (["generate", "x", "--model", "not a model"], "smollm2-135m-instruct"),
    (["generate", "x", "-n", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["chat", "--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, got -3"),
])
def test_bad_input_gives_one_clear_line(argv, message, capsys):
    assert main(argv + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["generate", "x"], ["chat"]])
def test_bad_length_refused_before_the_model_loads(command, monkeypatch, capsys):
    """A chat with -n 0 used to load the model, show its prompt and fail at the first turn."""
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("tachylm.cli.api.Engine.load", no_load)
    assert main(command + ["-n", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens must be at least 1" in err and "Chat with the model" not in err


def test_not_a_gguf_file(tmp_path, capsys):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not really a gguf file at all")
    assert main(["generate", "x", "--model", str(bogus), "--device", "cpu"]) == 2
    assert "model.gguf" in capsys.readouterr().err


def test_cuda_requested_without_gpu(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["generate", "x", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_models_and_pull(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["pull"]) == 0
    assert capsys.readouterr().out.strip().endswith(".gguf")
