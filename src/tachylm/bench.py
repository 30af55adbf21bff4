"""Benchmarks: decode, prefill and long-context decode, measured as BENCHMARKING.md prescribes.

Owns the named model shapes, the timed runs over the product path (`Generation` over `Steps` for
one row, a batched loop over `Steps.decode` for several), the compiled-versus-eager check that runs
before any timing, the in-process peak bandwidth measurement, and the Hugging Face `generate`
baseline. It yields one result dict per run and reports progress through a callback; argv parsing,
printing, JSON and plots live in cli_bench.py.

Definitions used in every result:
    tokens_per_s: decode tokens per second over all rows, not counting the first token (which the
        prefill produces; see ttft_s). For prefill runs: prompt tokens per second.
    kv_bytes_per_token: KV-cache bytes one row reads per decode step: the filled positions for
        eager decode (it attends over [0, pos] only), the whole cache for compiled decode (static
        shapes read every slot).
    bytes_per_step: weight bytes (every weight except the embedding table, of which decode gathers
        one row; a tied table is counted because the head reads it) + batch * kv_bytes_per_token.
    achieved_gb_s: bytes_per_step * decode steps per second (weights are read once per step for
        all rows), in 1e9 bytes/s, compared with peak_gb_s: the best device-to-device copy rate
        measured in this process, counting bytes read plus written.
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch

from tachylm.build import build_model, build_random_model, canonical_tensors, parse_dtype
from tachylm.cache import KVCache
from tachylm.checkpoints.hf import canonical_name
from tachylm.checkpoints.resolve import resolve_model
from tachylm.config import ModelConfig, RopeScaling
from tachylm.engine import load_checkpoint, pick_device
from tachylm.generate import Generation
from tachylm.kernels.linear import use_fast_linears
from tachylm.kernels.quant_matmul import pdl_launch, use_pdl
from tachylm.model import Transformer
from tachylm.quant import apply_quant_option, folded_norms
from tachylm.sampling import (SamplingParams, SamplingPlan, SamplingTensors, plan_for, sample,
                              seed_draws, to_tensors)
from tachylm.steps import PREFILL_MULTIPLE, Steps

Progress = Callable[[str], None]

_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
SHAPES: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig("llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32,
                                n_kv_heads=8, head_dim=128, ffn_dim=14336, rope_theta=500000.0,
                                rope_scaling=_LLAMA31_ROPE, max_seq_len=131072),
    "llama-2-7b": ModelConfig("llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                              n_kv_heads=32, head_dim=128, ffn_dim=11008, max_seq_len=4096),
    "mistral-7b": ModelConfig("mistral", vocab_size=32768, dim=4096, n_layers=32, n_heads=32,
                              n_kv_heads=8, head_dim=128, ffn_dim=14336, rope_theta=1e6,
                              max_seq_len=32768),
    "qwen2.5-7b": ModelConfig("qwen2", vocab_size=152064, dim=3584, n_layers=28, n_heads=28,
                              n_kv_heads=4, head_dim=128, ffn_dim=18944, norm_eps=1e-6,
                              rope_theta=1e6, max_seq_len=32768, qkv_bias=True),
    "llama-3.1-70b": ModelConfig("llama", vocab_size=128256, dim=8192, n_layers=80, n_heads=64,
                                 n_kv_heads=8, head_dim=128, ffn_dim=28672, rope_theta=500000.0,
                                 rope_scaling=_LLAMA31_ROPE, max_seq_len=131072),
    "smollm2-135m": ModelConfig("llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, head_dim=64, ffn_dim=1536, rope_theta=100000.0,
                                max_seq_len=8192, tie_embeddings=True),
    "tiny": ModelConfig("llama", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, ffn_dim=128, max_seq_len=2048),
}
# Largest allowed max|compiled - eager| / max|eager| over the checked logits.
# bf16: on an H100, compiled and eager decode of random Llama-3.1-8B weights differ by 0.04-0.056
# of the largest logit (different kernels round differently through 32 layers) with identical
# greedy tokens; 0.08 keeps that passing while a real bug (wrong weights, masks, positions)
# moves logits by far more. The greedy-token comparison applies on top.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 8e-2, torch.float16: 2e-2}
# Every result carries these keys (None where a field does not apply).
RESULT_FIELDS = (
    "run", "name", "shape", "model", "device", "device_type", "torch", "date", "command", "compiled",
    "dtype", "batch", "prompt_len", "new_tokens", "context", "sampling", "repeats", "tokens_per_s",
    "tokens_per_s_per_row", "ttft_s", "prefill_tokens_per_s", "weight_bytes", "kv_bytes_per_token",
    "kv_positions_read", "bytes_per_step", "achieved_gb_s", "peak_gb_s", "peak_percent", "compile_s",
    "warmup_s", "peak_memory_bytes", "peak_memory_source", "checked", "check", "baseline")
HF_ARCHITECTURE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                   "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class BenchOptions:
    """What to measure (cli_bench.py maps each flag onto a field of the same name).

    Attributes:
        shape: a key of SHAPES (random weights), or None with `model`.
        model: a model reference (alias, path, hub id) to load real weights instead.
        compile: compile the decode step; None = on CUDA only.
        compile_prefill: also compile prefill (dynamic length) for the prefill runs.
        quant, group_size, quant_head, fold_norms: weight-only quantization applied after
            building (round-to-nearest; see tachylm.quant), or None for the checkpoint's dtype.
        fast_linear: on CUDA, route small-batch float Linears through tachylm's Triton GEMV
            (tachylm.kernels.linear.FastLinear) instead of cuBLAS.
        pdl: programmatic dependent launch of tachylm's Triton kernels where the GPU and Triton
            have it (`kernels.quant_matmul.pdl_launch`; on by default, about 1% faster decode
            for bf16 and int8 on an H100).
        compile_backend: torch.compile backend for Steps ("eager" makes CPU tests fast).
        compile_tuning: Inductor's coordinate-descent tuning (Steps' `tuning`), on CUDA.
        batches: one decode run (and one long-context run) per batch size.
        prefill: prompt lengths for batch-1 prefill runs (empty = none).
        context: if > 0, also time decode with the cache filled up to this position.
        check: compare compiled with eager before timing (False marks results unchecked).
        check_tolerance: override CHECK_TOLERANCE for the dtype.
        command: the command line, recorded in every result.
        peak_copy_bytes: size of the copy that measures peak bandwidth (default per device).
    """

    shape: str | None = None
    model: str | None = None
    model_cache_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None
    compile_prefill: bool = False
    quant: str | None = None
    group_size: int = 128
    quant_head: bool = False
    fold_norms: bool = True
    fast_linear: bool = True
    pdl: bool = True
    compile_backend: str = "inductor"
    compile_tuning: bool = False
    batches: tuple[int, ...] = (1,)
    prompt_len: int = 5
    new_tokens: int = 200
    prefill: tuple[int, ...] = ()
    context: int = 0
    repeats: int = 5
    temperature: float = 0.8
    top_k: int = 200
    baseline: str | None = None
    check: bool = True
    check_tolerance: float | None = None
    check_steps: int = 4
    seed: int = 0
    command: str = ""
    peak_copy_bytes: int | None = None


class Timing(NamedTuple):
    ttft_s: float    # start to the first token on the host
    decode_s: float  # first token to the last one on the host
    total_s: float


def validate(options: BenchOptions) -> None:
    """Reject bad options before anything is built (ValueError/RuntimeError says how to fix)."""
    if (options.shape is None) == (options.model is None):
        raise ValueError("give exactly one of --shape NAME (random weights) or --model REF (a checkpoint)")
    if options.shape is not None and options.shape not in SHAPES:
        raise ValueError(f"unknown shape {options.shape!r}; choose one of {', '.join(SHAPES)}")
    if not options.batches:
        raise ValueError("--batch needs at least one batch size, e.g. --batch 1,8")
    for flag, values, low in (("--batch", options.batches, 1), ("--prefill", options.prefill, 1),
                              ("--prompt-len", [options.prompt_len], 1),
                              ("--new-tokens", [options.new_tokens], 2), ("--repeats", [options.repeats], 1),
                              ("--context", [options.context], 0), ("--seed", [options.seed], 0)):
        bad = [v for v in values if not isinstance(v, int) or v < low]
        if bad:
            raise ValueError(f"{flag} must be an integer >= {low}, got {bad[0]!r}")
    if options.check_tolerance is not None and not options.check_tolerance > 0:
        raise ValueError(f"--check-tol must be > 0, got {options.check_tolerance}")
    options_sampling(options)  # validates temperature and top-k
    if options.dtype != "auto":
        parse_dtype(options.dtype)
    if options.baseline not in (None, "hf"):
        raise ValueError(f"unknown baseline {options.baseline!r}; the only one is 'hf'")
    if options.baseline == "hf" and importlib.util.find_spec("transformers") is None:
        raise RuntimeError("--baseline hf needs Hugging Face transformers: pip install transformers")
    if options.shape is not None:
        check_lengths(SHAPES[options.shape], options)


def check_lengths(config: ModelConfig, options: BenchOptions) -> None:
    """Every run must fit in the model's context (ValueError names the run)."""
    decode_end = options.context + options.prompt_len + options.new_tokens
    if decode_end > config.max_seq_len:
        raise ValueError(f"--context {options.context} + --prompt-len {options.prompt_len} + --new-tokens "
                         f"{options.new_tokens} = {decode_end} positions, past the model's "
                         f"{config.max_seq_len}; shorten one of them")
    too_long = [n for n in options.prefill if n > config.max_seq_len]
    if too_long:
        raise ValueError(f"--prefill {too_long[0]} is past the model's {config.max_seq_len} positions")


def options_sampling(options: BenchOptions) -> SamplingParams:
    return SamplingParams(temperature=options.temperature, top_k=options.top_k, top_p=1.0,
                          seed=options.seed)


def iter_bench(options: BenchOptions, progress: Progress | None = None) -> Iterator[dict]:
    """Run every requested benchmark, yielding each result as soon as it is measured.

    Order: decode for each batch size, prefill for each length, long-context decode for each
    batch size. Raises RuntimeError if the compiled path disagrees with eager (unless
    options.check is False).
    """
    report = progress or (lambda line: None)
    validate(options)
    device = pick_device(options.device)
    dtype = parse_dtype(options.dtype, device)
    compiled = device.type == "cuda" if options.compile is None else options.compile
    use_pdl(options.pdl)
    report(f"measuring peak bandwidth on {device}")
    peak = measure_copy_bandwidth(device, options.peak_copy_bytes)
    model = _load_model(options, device, dtype, report)
    tolerance = options.check_tolerance or CHECK_TOLERANCE[dtype]
    params = options_sampling(options)
    common = {**environment(device), "shape": options.shape, "model": options.model,
              "command": options.command, "compiled": compiled,
              "compile_backend": options.compile_backend if compiled else None,
              "compile_tuning": options.compile_tuning if compiled else None,
              "dtype": str(dtype).removeprefix("torch."),
              "quant": options.quant, "group_size": options.group_size if options.quant == "int4" else None,
              "quant_head": options.quant_head if options.quant else None,
              "folded_norms": len(folded_norms(model)),
              "fast_linear": options.fast_linear and device.type == "cuda",
              "pdl": bool(pdl_launch(device)["PDL"]),
              "repeats": options.repeats, "peak_gb_s": peak, "weight_bytes": weight_bytes(model)}
    runs = [("decode", b, 0) for b in options.batches] + [("prefill", 1, n) for n in options.prefill]
    runs += [("long-context", b, options.context) for b in options.batches if options.context]
    for kind, batch, size in runs:
        if compiled:
            torch.compiler.reset()  # each run compiles its own shapes; no stale guards or graphs
        _release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if kind == "prefill":
            report(f"prefill {size} tokens")
            result = _prefill_run(model, size, compiled, tolerance, options)
        else:
            report(f"{kind} batch {batch}" + (f" at position {size}" if size else ""))
            result = _decode_run(model, batch, size, compiled, params, tolerance, options, report)
        result.update(common)
        result["peak_percent"] = 100 * result["achieved_gb_s"] / peak
        result["peak_memory_bytes"], result["peak_memory_source"] = peak_memory(device)
        result["baseline"] = None
        if options.baseline == "hf" and kind == "decode":
            report(f"Hugging Face generate baseline, batch {batch}")
            result["baseline"] = hf_baseline(model, result, params, options, tolerance)
        missing = set(RESULT_FIELDS) - set(result)
        assert not missing, missing
        yield result
    del model
    _release(device)


def run_bench(options: BenchOptions, progress: Progress | None = None) -> list[dict]:
    """All results of `iter_bench` as a list."""
    return list(iter_bench(options, progress))


def _load_model(options: BenchOptions, device: torch.device, dtype: torch.dtype,
                report: Progress) -> Transformer:
    model = _load_float_model(options, device, dtype, report)
    if options.quant is not None:
        report(f"quantizing to {options.quant}")
        apply_quant_option(model, options.quant, options.group_size, options.quant_head,
                           device=device, fold_norms=options.fold_norms)
    if options.fast_linear and device.type == "cuda":
        use_fast_linears(model)
    return model


def _load_float_model(options: BenchOptions, device: torch.device, dtype: torch.dtype,
                      report: Progress) -> Transformer:
    if options.model is None:
        config = SHAPES[options.shape]
        report(f"building random {options.shape} weights ({config.n_params / 1e9:.2f}B parameters, {dtype})")
        return build_random_model(config, device=device, dtype=dtype, seed=options.seed,
                                  max_seq_len=_rope_length(config, options))
    path = resolve_model(options.model, cache_dir=options.model_cache_dir, progress=report)
    report(f"loading {path}")
    checkpoint = load_checkpoint(path, dtype=dtype)
    check_lengths(checkpoint.config, options)
    return build_model(checkpoint, device=device, dtype=dtype,
                       max_seq_len=_rope_length(checkpoint.config, options))


def _cache_length(positions: int, config: ModelConfig) -> int:
    """Cache slots for `positions`, rounded up like prefill padding, within the model's context."""
    return min(-(-positions // PREFILL_MULTIPLE) * PREFILL_MULTIPLE, config.max_seq_len)


def _rope_length(config: ModelConfig, options: BenchOptions) -> int:
    longest = max([options.context + options.prompt_len + options.new_tokens, *options.prefill])
    return _cache_length(longest, config)


def environment(device: torch.device) -> dict:
    """Device name, torch version and the date (UTC), for every result."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"device": name, "device_type": device.type, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Peak memory bandwidth in GB/s (1e9 bytes/s): the best of `repeats` timings of a large
    device-to-device copy, counting the bytes read plus the bytes written."""
    on_gpu = device.type == "cuda"
    nbytes = nbytes or (1 << 30 if on_gpu else 64 << 20)
    inner = 10 if on_gpu else 1  # a 1 GiB GPU copy takes < 1 ms: amortise launch and sync
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            dst.copy_(src)
        _sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * nbytes / best / 1e9


def weight_bytes(model: Transformer) -> int:
    """Bytes of every stored weight decode reads per step (see the module docstring)."""
    seen, total = set(), 0
    for name, tensor in model.state_dict().items():
        if name == "embed.weight" and not model.config.tie_embeddings:
            continue
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, how measured): CUDA peak allocation since the run began, else the process max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    import resource  # POSIX only; imported here so the module still imports elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _random_ids(config: ModelConfig, batch: int, length: int, seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator).to(device)


def _reset_cache(cache: KVCache, context: int, seed: int) -> None:
    """Zero the cache and write seeded random keys/values into positions [0, context): the same
    state a real prefill of `context` tokens leaves, as far as speed is concerned."""
    cache.zero_()
    if context:
        generator = torch.Generator(device=cache.device).manual_seed(seed)
        for t in cache.k + cache.v:
            t[:, :, :context].normal_(generator=generator)


def _kv_bytes_per_position(cache: KVCache) -> int:
    return cache.nbytes // (cache.batch_size * cache.max_seq_len)


def _decode_run(model, batch, context, compiled, params, tolerance, options, report) -> dict:
    config = model.config
    prompt_len, new_tokens = options.prompt_len, options.new_tokens
    dtype = next(model.parameters()).dtype
    cache = KVCache(config.n_layers, batch, _cache_length(context + prompt_len + new_tokens, config),
                    config.n_kv_heads, config.head_dim, device=model.rope_cos.device, dtype=dtype)
    steps = Steps(model, cache, compile_decode=compiled,
                  backend=options.compile_backend, tuning=options.compile_tuning)
    prompts = _random_ids(config, batch, prompt_len, options.seed, cache.device)
    settings = to_tensors([params] * batch, cache.device)
    plan = plan_for([params], config.vocab_size)
    _reset_cache(cache, context, options.seed)
    report("warm-up" + (" (compiling)" if compiled else ""))
    warm = _generate(steps, prompts, context, new_tokens, params, settings, plan)
    check = None
    if options.check:
        check = _check(steps, prompts, context, min(options.check_steps, new_tokens - 1), settings, plan,
                       lambda: _reset_cache(cache, context, options.seed), tolerance)
    report(f"timing {options.repeats} runs")
    gc.collect()  # compiling leaves much garbage; collect it now rather than inside a timed run
    timings = [_generate(steps, prompts, context, new_tokens, params, settings, plan)
               for _ in range(options.repeats)]
    steps_per_s = [(new_tokens - 1) / t.decode_s for t in timings]
    # Eager decode attends over [0, pos] (mean over the run); compiled reads every cache slot.
    positions = cache.max_seq_len if compiled else context + prompt_len + new_tokens / 2
    kv_bytes = positions * _kv_bytes_per_position(cache)
    bytes_per_step = weight_bytes(model) + batch * kv_bytes
    ttft = statistics.median(t.ttft_s for t in timings)
    total = statistics.median(t.total_s for t in timings)
    name = f"decode b{batch}" + (f" @{context}" if context else "")
    return {
        "run": "decode" if not context else "long-context", "name": name, "batch": batch,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "context": context,
        "sampling": {"temperature": params.temperature, "top_k": params.top_k},
        "tokens_per_s": _stats([batch * s for s in steps_per_s]),
        "tokens_per_s_per_row": statistics.median(steps_per_s),
        "end_to_end_tokens_per_s": batch * new_tokens / total,
        "ttft_s": ttft, "prefill_tokens_per_s": batch * prompt_len / ttft,
        "kv_bytes_per_token": kv_bytes, "kv_positions_read": positions, "bytes_per_step": bytes_per_step,
        "achieved_gb_s": bytes_per_step * statistics.median(steps_per_s) / 1e9,
        "compile_s": max(0.0, warm.total_s - total) if compiled else None, "warmup_s": warm.total_s,
        "checked": check is not None, "check": check,
    }


def _prefill_run(model, length, compiled, tolerance, options) -> dict:
    config = model.config
    dtype = next(model.parameters()).dtype
    cache = KVCache(config.n_layers, 1, _cache_length(length, config), config.n_kv_heads, config.head_dim,
                    device=model.rope_cos.device, dtype=dtype)
    steps = Steps(model, cache, compile_prefill=compiled and options.compile_prefill,
                  backend=options.compile_backend)
    prompt = _random_ids(config, 1, length, options.seed, cache.device)

    def once() -> float:  # time to first token: prefill, greedy pick, token on the host
        _sync(cache.device)
        start = time.perf_counter()
        steps.prefill(prompt, 0).argmax(-1).cpu()
        return time.perf_counter() - start

    warm = once()
    check = None
    if options.check:
        greedy = SamplingParams.greedy_params()
        check = _check(steps, prompt, 0, 0, to_tensors([greedy], cache.device),
                       plan_for([greedy], config.vocab_size), lambda: _reset_cache(cache, 0, 0), tolerance)
    gc.collect()
    times = [once() for _ in range(options.repeats)]
    median = statistics.median(times)
    positions = cache.max_seq_len if compiled else length
    kv_bytes = positions * _kv_bytes_per_position(cache)
    bytes_per_step = weight_bytes(model) + kv_bytes
    return {
        "run": "prefill", "name": f"prefill {length}", "batch": 1, "prompt_len": length, "new_tokens": 1,
        "context": 0, "sampling": {"temperature": 0.0, "top_k": 0},
        "tokens_per_s": _stats([length / t for t in times]), "tokens_per_s_per_row": length / median,
        "ttft_s": median, "prefill_tokens_per_s": length / median,
        "kv_bytes_per_token": kv_bytes, "kv_positions_read": positions, "bytes_per_step": bytes_per_step,
        "achieved_gb_s": bytes_per_step / median / 1e9,
        "compile_s": max(0.0, warm - median) if compiled else None, "warmup_s": warm,
        "checked": check is not None, "check": check,
    }


def _generate(steps: Steps, prompts: torch.Tensor, start_pos: int, new_tokens: int,
              params: SamplingParams, settings: SamplingTensors, plan: SamplingPlan) -> Timing:
    """One generation of `new_tokens` per row: `Generation` for one row (the product path), else a
    batched loop over Steps.decode that reads tokens on the host only at the end."""
    device = steps.device
    batch, prompt_len = prompts.shape
    if batch == 1:
        generation = Generation(steps, prompts[0].tolist(), new_tokens, params, start_pos=start_pos)
        _sync(device)
        start = time.perf_counter()
        produced = sum(1 for _ in generation)
        total = time.perf_counter() - start
        assert produced == new_tokens, (produced, generation.stats.stop_reason)
        return Timing(generation.stats.prefill_s, generation.stats.decode_s, total)
    # Generation's loop for B rows, with one host read of the tokens at the end.
    seed_draws(device, params.seed)
    _sync(device)
    start = time.perf_counter()
    token = sample(steps.prefill(prompts, start_pos), settings, plan)  # [B]
    token.cpu()
    decode_start = time.perf_counter()
    out, pos = [token], start_pos + prompt_len
    for _ in range(new_tokens - 1):
        token, _ = steps.decode(token[:, None], pos, settings, plan, kv_limit=pos + 1,
                                return_logits=False)
        out.append(token)
        pos += 1
    torch.stack(out, dim=1).cpu()
    end = time.perf_counter()
    return Timing(decode_start - start, end - decode_start, end - start)


def _greedy_trace(steps: Steps, prompts, start_pos, decode_steps, settings, plan, feed=None):
    """Prefill then `decode_steps` steps, feeding `feed`'s tokens (teacher forcing) or, without it,
    each step's own argmax. Tokens are fed as contiguous [B, 1] tensors, as Generation feeds them,
    so compiled steps reuse their graphs instead of recompiling for the check.

    Returns:
        logits [B, decode_steps + 1, V] float32, and the argmax tokens: a list of [B] tensors.
    """
    batch, length = prompts.shape
    logits = [steps.prefill(prompts, start_pos)]
    tokens = [logits[0].argmax(-1)]
    pos = start_pos + length
    for i in range(decode_steps):
        token = (tokens[-1] if feed is None else feed[i])[:, None]
        input_pos = torch.full((batch, 1), pos, device=prompts.device)
        _, step_logits = steps.decode(token, input_pos, settings, plan, kv_limit=pos + 1)
        logits.append(step_logits)
        tokens.append(step_logits.argmax(-1))
        pos += 1
    return torch.stack(logits, dim=1).float(), tokens


def _check(steps: Steps, prompts, start_pos, decode_steps, settings, plan, reset: Callable[[], None],
           tolerance: float) -> dict:
    """Compare `steps` with eager steps over the same weights and cache buffers (reset before each
    pass). Both see the eager pass's greedy tokens, so one near-tie cannot derail the rest.

    Raises:
        RuntimeError: the logits differ by more than `tolerance` (relative to the largest eager
            logit), or a greedy token differs where the eager logits do not nearly tie.
    """
    reference = Steps(steps.model, steps.cache)
    reset()
    want_logits, want_tokens = _greedy_trace(reference, prompts, start_pos, decode_steps, settings, plan)
    reset()
    got_logits, got_tokens = _greedy_trace(steps, prompts, start_pos, decode_steps, settings, plan,
                                           feed=want_tokens)
    reset()
    want_tokens, got_tokens = torch.stack(want_tokens, dim=1), torch.stack(got_tokens, dim=1)
    scale = want_logits.abs().max().clamp_min(1e-30)
    max_rel_diff = float((got_logits - want_logits).abs().max() / scale)
    differ = got_tokens != want_tokens
    # A differing argmax is tolerable only where eager's two candidates are within the tolerance.
    margin = want_logits.max(-1).values - want_logits.gather(-1, got_tokens[..., None])[..., 0]
    real = differ & (margin > 2 * tolerance * scale)
    check = {"reference": "eager", "max_rel_diff": max_rel_diff, "tolerance": tolerance,
             "tokens_equal": not bool(differ.any()), "token_mismatches": int(differ.sum()),
             "positions": int(got_tokens.numel()),
             "passed": bool(max_rel_diff <= tolerance and not real.any())}
    if not check["passed"]:
        raise RuntimeError(
            f"the {'compiled' if steps.compile_decode or steps.compile_prefill else 'benchmarked'} path "
            f"differs from eager: max relative logit difference {max_rel_diff:.3g} (tolerance "
            f"{tolerance:g}), {check['token_mismatches']} of {check['positions']} greedy tokens differ. "
            "Refusing to report its speed; fix the step, raise --check-tol if the difference is "
            "expected, or pass --no-check to time it anyway (the result is then marked unchecked)")
    return check


def hf_config_dict(config: ModelConfig) -> dict:
    """A Hugging Face config.json dictionary describing `config` (inverse of ModelConfig.from_hf)."""
    hf = {"architectures": [HF_ARCHITECTURE[config.family]], "vocab_size": config.vocab_size,
          "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
          "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
          "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
          "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
          "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings}
    if config.family in ("llama", "qwen3"):
        hf["attention_bias"] = config.qkv_bias
    if config.family == "mistral":
        hf["sliding_window"] = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position_embeddings}
    return hf


def build_hf_model(model: Transformer):
    """A transformers model with the same weights as `model` (copied), on its device and dtype."""
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError("--baseline hf needs Hugging Face transformers: pip install transformers") from e
    fields = {k: v for k, v in hf_config_dict(model.config).items() if k != "architectures"}
    hf_config = transformers.AutoConfig.for_model(model.config.family, **fields)  # family == model_type
    weight = next(model.parameters())
    with torch.device(weight.device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=weight.dtype)
    ours = canonical_tensors(model)  # checkpoint names, fused q/k/v and gate/up split back
    state, used = {}, set()
    for hf_name in hf.state_dict():
        name = canonical_name(hf_name)
        if name == "lm_head.weight" and model.config.tie_embeddings:
            name = "embed.weight"
        if name not in ours:
            raise RuntimeError(f"Hugging Face tensor {hf_name!r} has no tachylm counterpart; "
                               "update checkpoints/hf.py's name map")
        state[hf_name] = ours[name]
        used.add(name)
    unused = sorted(set(ours) - used)
    if unused:
        raise RuntimeError(f"tachylm tensors {unused[:3]} have no Hugging Face counterpart")
    hf.load_state_dict(state, strict=True)
    return hf.eval().requires_grad_(False)


def hf_baseline(model: Transformer, result: dict, params: SamplingParams, options: BenchOptions,
                tolerance: float) -> dict:
    """Time transformers `generate` (static cache) on the same weights, prompts and token counts.

    Both sides are compared end to end (prefill included, as `generate` only times that way):
    ratio = our end-to-end tokens/s / Hugging Face's.
    """
    import transformers

    batch, new_tokens = result["batch"], result["new_tokens"]
    device = model.rope_cos.device
    prompts = _random_ids(model.config, batch, result["prompt_len"], options.seed, device)
    hf = build_hf_model(model)
    with torch.inference_mode():  # last-position logits only: [B, T, vocab] can be gigabytes
        ours = model(prompts, logit_index=torch.full((batch,), prompts.shape[1] - 1, device=device))[:, 0]
        theirs = hf(prompts, logits_to_keep=1).logits[:, -1].float()
    max_rel_diff = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, cache_implementation="static",
                  pad_token_id=0, do_sample=not params.greedy, attention_mask=torch.ones_like(prompts))
    if not params.greedy:
        kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=1.0)

    def once() -> float:
        _sync(device)
        start = time.perf_counter()
        out = hf.generate(prompts, **kwargs)
        _sync(device)
        elapsed = time.perf_counter() - start
        assert out.shape == (batch, prompts.shape[1] + new_tokens), out.shape
        return elapsed

    warm = once()
    times = [once() for _ in range(options.repeats)]
    del hf
    _release(device)
    rates = [batch * new_tokens / t for t in times]
    return {"name": "hf", "what": "transformers generate, cache_implementation=static",
            "transformers": transformers.__version__, "tokens_per_s": _stats(rates),
            "ours_tokens_per_s": result["end_to_end_tokens_per_s"],
            "ratio": result["end_to_end_tokens_per_s"] / statistics.median(rates),
            "warmup_s": warm, "max_rel_diff": max_rel_diff, "matches": max_rel_diff <= tolerance}
