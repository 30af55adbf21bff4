"""Command-line front end for quantization: `tachylm quantize` and `tachylm eval perplexity`.

`add_quant_parsers(subparsers)` adds both commands to the main parser (cli.py). All argv parsing
and printing for them lives here; progress goes to standard error, results to standard output.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
from pathlib import Path

import torch

from tachylm.build import build_model, build_quantized_model, parse_dtype
from tachylm.checkpoints.resolve import resolve_model
from tachylm.engine import load_checkpoint, pick_device
from tachylm.evaluate import perplexity_change, token_nlls
from tachylm.model import Transformer
from tachylm.quant import (GPTQ_MODES, INT4_GROUP_SIZES, MODES, apply_quant_option, check_quantizable,
                           quantize_model)
from tachylm.quant.gptq import calibration_windows
from tachylm.quant.io import check_output_folder, is_quantized_folder, read_quantized_config, save_quantized
from tachylm.tokenizer import Tokenizer, load_tokenizer

CACHE_ENV = "TACHYLM_CACHE"
# The repository's evaluation text (absent from an installed wheel: pass --eval-text there).
DEFAULT_EVAL_TEXT = Path(__file__).resolve().parents[2] / "data" / "eval.txt"


def _progress(line: str) -> None:
    print(f"[tachylm] {line}", file=sys.stderr, flush=True)


def _device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = pick_device(args.device)
    return device, parse_dtype(args.dtype, device)


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise ValueError(f"{what} {path!r} does not exist") from e
    if not text.strip():
        raise ValueError(f"{what} {path!r} is empty")
    return text


def _eval_tokens(tokenizer: Tokenizer, path: str) -> list[int]:
    ids = tokenizer.encode(_read_text(path, "evaluation text"), add_special=True)
    if len(ids) < 2:
        raise ValueError(f"evaluation text {path!r} is too short to score")
    return ids


def _check_window(window: int, max_seq_len: int) -> None:
    if not 2 <= window <= max_seq_len:
        raise ValueError(f"--window must be in [2, {max_seq_len}] for this model, got {window}")


def _float_model(path: str, device: torch.device, dtype: torch.dtype, max_seq_len: int) -> Transformer:
    checkpoint = load_checkpoint(path, dtype=dtype)
    positions = min(max_seq_len, checkpoint.config.max_seq_len)
    return build_model(checkpoint, device=device, dtype=dtype, max_seq_len=positions)


def _token_nlls(model: Transformer, ids: list[int], args, label: str) -> torch.Tensor:
    nlls = token_nlls(model, ids, window=args.window, stride=args.stride, batch_size=args.batch_size,
                      progress=_progress)
    _progress(f"{label}: perplexity {math.exp(nlls.mean().item()):.4f}")
    return nlls


def cmd_quantize(args) -> int:
    gptq = args.mode in GPTQ_MODES
    if gptq and args.calib is None:
        raise ValueError(f"--mode {args.mode} needs --calib FILE: a text (different from the "
                         "evaluation text) to calibrate on; the repository ships data/calib.txt")
    if not gptq and args.calib is not None:
        raise ValueError(f"--calib applies to --mode {' or '.join(GPTQ_MODES)} only, not {args.mode}")
    check_output_folder(args.output)  # before the slow parts, not after them
    eval_text = None if args.no_eval else str(args.eval_text or DEFAULT_EVAL_TEXT)
    if eval_text is not None and not os.path.isfile(eval_text):
        raise ValueError(f"evaluation text {eval_text!r} not found; pass --eval-text FILE or --no-eval")
    # Read now, so an empty one fails before the model loads.
    eval_source = None if eval_text is None else _read_text(eval_text, "evaluation text")
    if eval_source is not None and args.calib is not None and (
            os.path.samefile(eval_text, args.calib)
            or eval_source == _read_text(args.calib, "calibration text")):
        raise ValueError("the calibration text and the evaluation text are the same; calibrating on the "
                         "text you measure on overstates the quality: pass a different --calib")
    device, dtype = _device_and_dtype(args)
    path = resolve_model(args.source, cache_dir=os.environ.get(CACHE_ENV), progress=_progress)
    if is_quantized_folder(path):
        raise ValueError(f"{path} is already quantized; quantize the original checkpoint")
    tokenizer = load_tokenizer(path)
    calibration = None
    if args.calib is not None:
        ids = tokenizer.encode(_read_text(args.calib, "calibration text"), add_special=True)
        calibration = calibration_windows(ids, args.calib_samples, args.calib_seq_len)
        _progress(f"calibration: {calibration.shape[0]} x {calibration.shape[1]} tokens from {args.calib}")
    positions = max(args.calib_seq_len, args.window)
    # With an evaluation the float model must run whole on the device anyway; without one it stays
    # in host memory and only the layer (RTN) or block (GPTQ) being quantized visits the device.
    home = device if eval_text is not None else torch.device("cpu")
    _progress(f"loading {path}")
    model = _float_model(path, home, dtype, positions)
    check_quantizable(model, args.mode, args.group_size, args.quant_head)  # fail before the slow parts
    reference = None
    if eval_text is not None:
        _check_window(args.window, model.config.max_seq_len)
        eval_ids = _eval_tokens(tokenizer, eval_text)
        reference = _token_nlls(model, eval_ids, args, "unquantized")
    quantize_model(model, args.mode, args.group_size, args.quant_head, calibration, _progress,
                   device=device, fold_norms=args.fold_norms,
                   **({"act_order": args.act_order, "damp": args.damp} if gptq else {}))
    extra = {"source": path}
    if calibration is not None:
        extra["calibration"] = {"file": os.path.basename(args.calib), "n_samples": calibration.shape[0],
                                "seq_len": args.calib_seq_len, "act_order": args.act_order, "damp": args.damp}
    save_quantized(model, args.output, mode=args.mode, tokenizer_source=path, dtype=dtype, extra=extra)
    _progress(f"saved {args.output}")
    print(args.output)
    if eval_text is None:
        return 0
    del model
    gc.collect()
    # Measure what was written, read back as a user will load it.
    quantized = build_quantized_model(args.output, device=device, dtype=dtype, max_seq_len=positions)
    change = perplexity_change(reference, _token_nlls(quantized, eval_ids, args, args.mode))
    print(f"perplexity on {os.path.basename(eval_text)} ({len(eval_ids)} tokens, window {args.window}, "
          f"stride {args.stride}): unquantized {change.reference:.4f}, {args.mode} {change.value:.4f} "
          f"({change.percent:+.2f}% ± {change.stderr_percent:.2f}%, the standard error over "
          f"{change.blocks} blocks of consecutive tokens)")
    return 0


def _eval_model(ref: str, quant: str | None, args, device: torch.device,
                dtype: torch.dtype) -> tuple[Transformer, str]:
    """The model to score (quantized on the fly with `quant`) and its resolved path."""
    path = resolve_model(ref, cache_dir=os.environ.get(CACHE_ENV), progress=_progress)
    _progress(f"loading {path}")
    if is_quantized_folder(path):
        if quant is not None:
            raise ValueError(f"{path} is already quantized; drop --quant")
        _check_window(args.window, read_quantized_config(path).max_seq_len)
        return build_quantized_model(path, device=device, dtype=dtype, max_seq_len=args.window), path
    # With --quant, build in host memory and let only the quantized layers land on the device.
    model = _float_model(path, torch.device("cpu") if quant else device, dtype, args.window)
    _check_window(args.window, model.config.max_seq_len)
    apply_quant_option(model, quant, args.group_size, args.quant_head, _progress,
                       device=device if quant else None, fold_norms=args.fold_norms)
    return model, path


def cmd_eval_perplexity(args) -> int:
    device, dtype = _device_and_dtype(args)
    _read_text(args.text, "evaluation text")  # a wrong path fails before a model is loaded
    model, path = _eval_model(args.model, args.quant, args, device, dtype)
    ids = _eval_tokens(load_tokenizer(path), args.text)
    nlls = _token_nlls(model, ids, args, args.quant or "model")
    print(f"perplexity {math.exp(nlls.mean().item()):.4f} ({len(ids)} tokens, window {args.window}, "
          f"stride {args.stride})")
    if args.compare is None:
        return 0
    del model
    gc.collect()
    other, other_path = _eval_model(args.compare, None, args, device, dtype)
    if _eval_tokens(load_tokenizer(other_path), args.text) != ids:
        raise ValueError(f"{args.compare} tokenizes the text differently from {args.model}; a paired "
                         "comparison needs the same tokens (compare models of one family)")
    change = perplexity_change(_token_nlls(other, ids, args, "compared model"), nlls)
    print(f"against {args.compare}: {change.reference:.4f}, change {change.percent:+.2f}% ± "
          f"{change.stderr_percent:.2f}% (the standard error over {change.blocks} blocks of "
          f"consecutive tokens)")
    return 0


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="floating-point dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, "
                        "bfloat16, float16")


def _add_window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=512, help="tokens per forward (default 512)")
    p.add_argument("--stride", type=int, default=256,
                   help="distance between window starts; each window scores only its new tokens (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1)")


def _add_group_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=int, default=128, choices=INT4_GROUP_SIZES,
                   help="int4 group size (default 128); must divide every layer's input width")
    p.add_argument("--quant-head", action="store_true",
                   help="quantize the output head too (a tied embedding stays in floating point)")
    add_fold_norms_arg(p)


def add_fold_norms_arg(p: argparse.ArgumentParser) -> None:
    """`--fold-norms / --no-fold-norms`, for every command that quantizes (`quantize_model`'s
    fold_norms)."""
    p.add_argument("--fold-norms", action=argparse.BooleanOptionalAction, default=True,
                   help="int8: fold each RMSNorm's weight into the Linear after it (default on: "
                        "~1%% faster decode; --no-fold-norms stays closer to the original model)")


def add_quant_parsers(subparsers) -> None:
    """Add `quantize` and `eval perplexity` to the main parser's subparsers."""
    p = subparsers.add_parser("quantize", help="quantize a model's weights and save it as a folder")
    p.add_argument("source", help="alias, .gguf file, Hugging Face folder or hub repo id")
    p.add_argument("--mode", required=True, choices=MODES, help="quantization scheme")
    _add_group_args(p)
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text for int4-gptq and int8-gptq (must differ from the "
                        "evaluation text)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration windows (default: as many as the text holds, at most 128)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize columns by decreasing activation (default on)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: Hessian dampening (default 0.01)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--eval-text", default=None, metavar="FILE",
                   help="text for the perplexity check (default: the repository's data/eval.txt)")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the perplexity check; the float model then stays in host memory and only "
                        "the layer or block being quantized visits the device")
    _add_window_args(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_quantize)

    p = subparsers.add_parser("eval", help="measure model quality")
    evals = p.add_subparsers(dest="eval_command", required=True)
    p = evals.add_parser("perplexity", help="sliding-window perplexity of a model on a text file")
    p.add_argument("model", help="alias, .gguf file, Hugging Face folder, hub repo id or quantized folder")
    p.add_argument("--text", required=True, metavar="FILE", help="the text to score")
    p.add_argument("--quant", default=None, choices=[m for m in MODES if m not in GPTQ_MODES],
                   help="quantize on the fly first (round-to-nearest)")
    p.add_argument("--compare", default=None, metavar="REF",
                   help="a second model (loaded as it is) scored on the same tokens: prints the "
                        "first one's perplexity change against it, with its standard error")
    _add_group_args(p)
    _add_window_args(p)
    _add_device_args(p)
    p.set_defaults(func=cmd_eval_perplexity)
