"""`tachylm bench`: argv parsing, the human table, JSON lines and the bandwidth plot.

The measuring itself is tachylm.bench. This front end also owns the one environment concern:
`--compile-cache DIR` points Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR) and Triton's
(TRITON_CACHE_DIR, DIR/triton: kernel binaries and autotuning results) at DIR before anything
compiles, so two processes with the same DIR give the cold and the warm compile time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from tachylm import bench
from tachylm.cli_quant import add_fold_norms_arg

DEFAULT_SHAPE = "llama-3.1-8b"
MODEL_CACHE_ENV = "TACHYLM_CACHE"  # the same variable cli.py reads for downloads


def _int_list(text: str) -> tuple[int, ...]:
    """'1,8' -> (1, 8); '' or '0' -> () (argparse reports the error with the flag's name)."""
    try:
        values = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,8, got {text!r}") from None
    return () if values == (0,) else values


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` sub-command to an argparse sub-parser group."""
    p = subparsers.add_parser(
        "bench", help="measure decode/prefill speed, memory bandwidth and compile time",
        description="Benchmark tachylm at a named shape with random weights (or a real checkpoint). "
                    "Each run is checked against eager before it is timed. See BENCHMARKING.md.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--shape", default=None,
                       help=f"random weights at a named shape: {', '.join(bench.SHAPES)} "
                            f"(default {DEFAULT_SHAPE})")
    which.add_argument("--model", "-m", default=None, metavar="REF",
                       help="benchmark a real checkpoint instead (alias, path or hub repo id)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), "
                                                   "float32, bfloat16, float16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (default: on CUDA only)")
    p.add_argument("--quant", default=None, choices=["int8", "fp8", "int4"],
                   help="weight-only quantization (round-to-nearest) applied to the model")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--quant-head", action="store_true", help="quantize the output head too")
    add_fold_norms_arg(p)
    p.add_argument("--fast-linear", action=argparse.BooleanOptionalAction, default=True,
                   help="Triton GEMV for small-batch float Linears on CUDA (default on)")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                   help="programmatic dependent launch of tachylm's kernels on Hopper and newer "
                        "GPUs (default on; --no-pdl for plain launches)")
    p.add_argument("--compile-tuning", action=argparse.BooleanOptionalAction, default=False,
                   help="Inductor coordinate-descent tuning of the compiled step (default off: "
                        "it helps only with --no-fast-linear and costs compile time)")
    p.add_argument("--compile-prefill", action="store_true",
                   help="also compile prefill (dynamic length) in the prefill runs")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; eager/aot_eager only to test the bench)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="Inductor cache folder; run twice in two processes for cold and warm compile_s")
    p.add_argument("--batch", type=_int_list, default=(1,), help="batch sizes, e.g. 1,8 (default 1)")
    p.add_argument("--prompt-len", type=int, default=5, help="random prompt ids per row (default 5)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens generated per row (default 200)")
    p.add_argument("--prefill", type=_int_list, default=(), metavar="LENGTHS",
                   help="prompt lengths for batch-1 prefill runs, e.g. 1024,4096 (default: none)")
    p.add_argument("--context", type=int, default=0, metavar="N",
                   help="also time decode with the KV cache filled to position N (0 = skip)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up (default 5)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="0 = off (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and sampling")
    p.add_argument("--baseline", choices=["hf"], default=None,
                   help="also time Hugging Face transformers generate on the same weights")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the compiled-vs-eager check (results are marked unchecked)")
    p.add_argument("--check-tol", type=float, default=None, metavar="REL",
                   help="largest relative logit difference the check accepts "
                        "(default 1e-4 float32, 8e-2 bfloat16, 2e-2 float16)")
    p.add_argument("--json", default=None, metavar="FILE", help="append one JSON object per run")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="bar chart of achieved bandwidth against the measured peak (needs matplotlib)")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    """Run the benchmark described by parsed `args`; print a table, write --json and --plot."""
    if args.plot is not None:
        _import_pyplot_figure()  # fail before a long run, not after it
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        _check_output_folder(flag, path)
    if args.compile_cache is not None:
        os.makedirs(args.compile_cache, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(args.compile_cache)
        # Triton's own cache: the GEMV kernels' binaries and their autotuning results.
        os.environ["TRITON_CACHE_DIR"] = os.path.join(os.path.abspath(args.compile_cache), "triton")
    command = getattr(args, "command_line", None) or shlex.join(["tachylm", *sys.argv[1:]])
    options = bench.BenchOptions(
        shape=args.shape if args.shape or args.model else DEFAULT_SHAPE, model=args.model,
        model_cache_dir=os.environ.get(MODEL_CACHE_ENV), device=args.device, dtype=args.dtype,
        compile=args.compile, compile_prefill=args.compile_prefill, quant=args.quant,
        group_size=args.group_size, quant_head=args.quant_head, fold_norms=args.fold_norms,
        fast_linear=args.fast_linear,
        pdl=args.pdl,
        compile_tuning=args.compile_tuning,
        compile_backend=args.compile_backend, batches=args.batch,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, prefill=args.prefill, context=args.context,
        repeats=args.repeats, temperature=args.temperature, top_k=args.top_k, baseline=args.baseline,
        check=args.check, check_tolerance=args.check_tol, seed=args.seed, command=command)
    results = []
    for result in bench.iter_bench(options, progress=_progress):
        result["compile_cache"] = args.compile_cache
        if not results:
            print(_header(result))
            print(_row(None))
        print(_row(result), flush=True)
        results.append(result)
        if args.json is not None:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
    if args.plot is not None:
        plot_results(results, args.plot)
        _progress(f"wrote {args.plot}")
    return 0


def _progress(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def _header(r: dict) -> str:
    what = r["shape"] or r["model"]
    return (f"# {what} {r['dtype']} {'compiled' if r['compiled'] else 'eager'} on {r['device']}, "
            f"torch {r['torch']}, {r['date']}; peak copy bandwidth {r['peak_gb_s']:.1f} GB/s\n"
            f"# {r['command']}")


_COLUMNS = (("run", 16), ("tok/s med", 11), ("[min - max]", 21), ("ttft ms", 9), ("prefill t/s", 12),
            ("GB/s", 8), ("% peak", 7), ("compile s", 10), ("mem GiB", 8), ("check", 9), ("HF tok/s", 9),
            ("ours/HF", 8))


def _row(r: dict | None) -> str:
    """One table line for result `r` (the column titles when r is None)."""
    if r is None:
        cells = [title for title, _ in _COLUMNS]
    else:
        tps, base, check = r["tokens_per_s"], r["baseline"], r["check"]
        cells = [r["name"], f"{tps['median']:.1f}", f"[{tps['min']:.1f} - {tps['max']:.1f}]",
                 f"{r['ttft_s'] * 1e3:.1f}", f"{r['prefill_tokens_per_s']:.0f}", f"{r['achieved_gb_s']:.1f}",
                 f"{r['peak_percent']:.1f}", "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                 f"{r['peak_memory_bytes'] / 2**30:.2f}",
                 "unchecked" if check is None else f"ok {check['max_rel_diff']:.0e}",
                 "-" if base is None else f"{base['tokens_per_s']['median']:.1f}",
                 "-" if base is None else f"{base['ratio']:.2f}x"]
    return " ".join(cell.rjust(width) if i else cell.ljust(width)
                    for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS)))


def _check_output_folder(flag: str, path: str | None) -> None:
    """Refuse an output file whose folder does not exist before the runs, not after them."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist; create it or write "
                         "somewhere else")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name")


def _import_pyplot_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or tachylm[plot])") from e
    return Figure


def plot_results(results: list[dict], path: str) -> None:
    """Roofline-style bars: each decode run's achieved GB/s, a line at the measured peak, tokens/s on
    top. Prefill runs are left out (they are compute-bound; bandwidth says little about them)."""
    Figure = _import_pyplot_figure()
    runs = [r for r in results if r["run"] != "prefill"]
    if not runs:
        raise ValueError("--plot shows decode runs and there are none (only prefill runs were asked for)")
    peak = runs[0]["peak_gb_s"]
    fig = Figure(figsize=(max(6.0, 1.3 * len(runs) + 2), 4.5))
    ax = fig.subplots()
    bars = ax.bar([r["name"] for r in runs], [r["achieved_gb_s"] for r in runs], color="tab:blue",
                  label="achieved (weights + KV read per step)")
    ax.axhline(peak, color="tab:red", linestyle="--", label=f"measured copy peak {peak:.0f} GB/s")
    for bar, r in zip(bars, runs):
        ax.annotate(f"{r['tokens_per_s']['median']:.1f} tok/s\n{r['peak_percent']:.0f}%",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylim(0, 1.4 * max(peak, *(r["achieved_gb_s"] for r in runs)))
    ax.set_ylabel("memory bandwidth (GB/s)")
    first = runs[0]
    ax.set_title(f"{first['shape'] or first['model']} {first['dtype']} "
                 f"{'compiled' if first['compiled'] else 'eager'} on {first['device']}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)  # above the peak line, clear of the bars
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """`tachylm bench ...` on its own (tests; `python -m tachylm.cli_bench bench ...`). Errors
    propagate; cli.main turns them into one line and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="tachylm")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["tachylm", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
