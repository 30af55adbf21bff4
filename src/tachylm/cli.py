"""Command-line front end: `tachylm generate | chat | pull | models`.

All argv parsing and printing lives here; everything else goes through `tachylm.engine`.
Errors a user can cause (bad paths, bad options, no network) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from tachylm import engine as api
from tachylm.cli_bench import add_bench_parser
from tachylm.cli_quant import add_fold_norms_arg, add_quant_parsers

CACHE_ENV = "TACHYLM_CACHE"


def _progress(line: str) -> None:
    print(f"[tachylm] {line}", file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=api.DEFAULT_MODEL,
                   help="alias, .gguf file, Hugging Face folder or hub repo id "
                        f"(default: {api.DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV-cache length in tokens (default: the model's, at most 4096 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="compile prefill and decode with torch.compile (CUDA graphs on a GPU); "
                        "pays off on a GPU, slow to start on a CPU")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja2 chat template to use instead of the checkpoint's own")
    p.add_argument("--quant", default=None, choices=["int8", "fp8", "int4"],
                   help="quantize weights on the fly (round-to-nearest); for GPTQ use `tachylm quantize`")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                   help="int4 group size (default 128)")
    p.add_argument("--quant-head", action="store_true", help="quantize the output head too")
    add_fold_norms_arg(p)


def _add_sampling_args(p: argparse.ArgumentParser, max_new_default: int) -> None:
    defaults = api.SamplingParams()
    p.add_argument("--max-new-tokens", "-n", type=int, default=max_new_default)
    p.add_argument("--temperature", "-t", type=float, default=defaults.temperature,
                   help=f"0 = greedy (default {defaults.temperature})")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="1 = off")
    p.add_argument("--min-p", type=float, default=defaults.min_p, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                   help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def _sampling(args) -> api.SamplingParams:
    """The sampling options and the --max-new-tokens budget, both checked before the model
    loads (`Generation` checks the budget again for callers of the API)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return api.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed)


def _load(args) -> api.Engine:
    return api.Engine.load(args.model, device=args.device, dtype=args.dtype,
                           max_seq_len=args.max_seq_len, compile=args.compile,
                           chat_template_file=args.chat_template, quant=args.quant,
                           group_size=args.group_size, quant_head=args.quant_head,
                           fold_norms=args.fold_norms, cache_dir=os.environ.get(CACHE_ENV),
                           progress=_progress)


def cmd_generate(args) -> int:
    params = _sampling(args)
    engine = _load(args)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    stream = engine.generate(prompt, max_new_tokens=args.max_new_tokens, params=params,
                             chat=not args.raw, system=args.system)
    for chunk in stream:
        print(chunk, end="", flush=True)
    print()
    stats = stream.stats
    note = " (context full)" if stats.stop_reason == "context_full" else ""
    print(f"[tachylm] {stats.summary()} on {engine.device.type}{note}", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    engine = _load(args)
    session = engine.chat(system=args.system)
    print("Chat with the model. /reset starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("[tachylm] conversation cleared", file=sys.stderr)
            continue
        try:
            stream = session.send(text, max_new_tokens=args.max_new_tokens, params=params)
            for chunk in stream:
                print(chunk, end="", flush=True)
        except api.ContextFullError as e:
            print(f"[tachylm] context full: {e}", file=sys.stderr)
            continue
        print()
        if stream.stats.stop_reason == "context_full":
            print(f"[tachylm] the reply stopped because the context ({engine.max_seq_len} tokens) is full;"
                  " type /reset to start over", file=sys.stderr)
        if args.verbose:
            print(f"[tachylm] {stream.stats.summary()}", file=sys.stderr)


def cmd_pull(args) -> int:
    path = api.pull(args.name, cache_dir=os.environ.get(CACHE_ENV), progress=_progress)
    print(path)
    return 0


def cmd_models(args) -> int:
    for name, description in api.list_aliases().items():
        print(f"{name:28s} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tachylm", description="Fast PyTorch-native LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate a reply to one prompt")
    p.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    _add_model_args(p)
    _add_sampling_args(p, max_new_default=256)
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt as plain text instead of through the chat template")
    p.add_argument("--system", default=None, help="system prompt (chat template only)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model_args(p)
    _add_sampling_args(p, max_new_default=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--verbose", "-v", action="store_true", help="print speed after each reply")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("pull", help="download a model into the cache and print its path")
    p.add_argument("name", nargs="?", default=api.DEFAULT_MODEL)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list model aliases")
    p.set_defaults(func=cmd_models)

    add_bench_parser(sub)
    add_quant_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["tachylm"] + list(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("TACHYLM_DEBUG"):
            raise
        print(f"tachylm: error: {e} (set TACHYLM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
