"""Benchmark the decode linear kernels (quantized and dense) at Llama-3.1-8B shapes on a CUDA GPU.

    PYTHONPATH=src python3 scripts/bench_kernels.py [--shapes qkv,o] [--schemes dense,int8]
                                                    [--m 1,8] [--variants] [--group G]

For each matrix shape, decode row count M and scheme (dense bf16, int8, fp8, int4 with groups of
128, or --group) it checks the dispatcher (`tachylm.kernels.quant_matmul.*_linear`) against a
float64 reference, then times it and reports the weight bandwidth it reaches: bytes of weights +
scales (+ zero points) over the median time. Next to it: the bf16 `F.linear` (cuBLAS) at the same
shape, its bandwidth, the ratio of the two times, and the device-to-device copy bandwidth measured
in this process (bytes read + written), which is the practical speed limit. `dense` is
`dense_linear` on the same bf16 weights as `F.linear`: its ratio is the gain of the Triton GEMV over
cuBLAS. Prefill (M = 1024) compares the quantized dispatchers with bf16 `F.linear`: for fp8 the
fused GEMM and, next to it, the dequantize + cuBLAS path it replaced; for int8 and int4 their path,
dequantize + cuBLAS (dense prefill is `F.linear` itself, so it is not listed).

Timing: `triton.testing.do_bench_cudagraph` (median of graph replays, as decode runs under CUDA
graphs) of a function that calls the layer once per weight copy, with enough copies (>= 256 MB in
all) that every call reads its weights from DRAM, not from the 50 MB L2. (`do_bench` would empty
L2 by writing 256 MB, and the dirty lines it leaves are written back inside the timed kernel.)
The first call of each shape runs the kernels' autotuning (outside the timing).

Prints a table at the end and, if the OUT environment variable is set, writes $OUT/kernels.json.
"""

import argparse
import inspect
import json
import math
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from tachylm.kernels import quant_matmul as qm

SHAPES = {  # name: (N out features, K in features) of one Llama-3.1-8B layer, and the LM head
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "head": (128256, 4096),
}
SCHEMES = ("dense", "int8", "fp8", "int4")
GROUP = 128
N_LAYERS = 32  # Llama-3.1-8B, for the per-token projection
ROTATE_BYTES = 256 * 2**20  # weight copies per measurement: at least this many bytes in all
MAX_COPIES = 16
PREFILL_M = 1024
TOLERANCE = 1e-2
DEVICE = "cuda"


def weight_bytes(scheme: str, n: int, k: int) -> int:
    """Bytes a GEMV must read for the weights: codes plus scales (plus zero points)."""
    if scheme in ("bf16", "dense"):
        return 2 * n * k
    if scheme == "int4":  # bfloat16 scale and zero point per group
        return n * k // 2 + 2 * 2 * n * (k // GROUP)
    return n * k + 4 * n


def make_weights(scheme: str, n: int, k: int, gen: torch.Generator) -> tuple:
    dev = DEVICE
    if scheme == "int8":
        q = torch.randint(-127, 128, (n, k), generator=gen, device=dev, dtype=torch.int8)
        return q, torch.rand(n, generator=gen, device=dev) * 0.01 + 1e-3
    if scheme == "fp8":
        w = torch.randn(n, k, generator=gen, device=dev) * 64
        scale = torch.rand(n, generator=gen, device=dev) * 1e-3
        return w.clamp_(-448, 448).to(torch.float8_e4m3fn), scale
    if scheme == "int4":
        q = torch.randint(0, 256, (n, k // 2), generator=gen, device=dev, dtype=torch.uint8)
        scale = torch.rand(n, k // GROUP, generator=gen, device=dev) * 0.02 + 1e-3
        zero = torch.rand(n, k // GROUP, generator=gen, device=dev) * 15
        scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)  # as `Int4Linear` holds
        return q, scale, zero, qm.pack_scale_zero(scale, zero)  # them, with the packed pair
    return (torch.randn(n, k, generator=gen, device=dev, dtype=torch.bfloat16) * 0.02,)


def layer(scheme: str):
    """x, weights -> y through the public dispatcher (bf16: F.linear)."""
    if scheme == "int8":
        return lambda x, w: qm.int8_linear(x, *w)
    if scheme == "fp8":
        return lambda x, w: qm.fp8_linear(x, *w)
    if scheme == "int4":
        return lambda x, w: qm.int4_linear(x, w[0], w[1], w[2], GROUP, scale_zero=w[3])
    if scheme == "dense":
        return lambda x, w: qm.dense_linear(x, w[0])
    return lambda x, w: F.linear(x, w[0])


def group_of(scheme: str) -> int:
    return GROUP if scheme == "int4" else 0


def dequant_layer(scheme: str):
    """The quantized prefill path before the fused GEMM: dequantize to bf16, then F.linear."""
    def call(x, w):
        scale, zero = w[1], (w[2] if scheme == "int4" else None)
        dq = qm.dequantize_triton(SCHEME_IDS[scheme], w[0], scale, zero, group_of(scheme), x.dtype)
        return F.linear(x, dq)
    return call


def reference(scheme: str, x: torch.Tensor, w: tuple) -> torch.Tensor:
    if scheme == "dense":
        dq = w[0]
    elif scheme == "int8":
        dq = qm.dequantize_int8(*w)
    elif scheme == "fp8":
        dq = qm.dequantize_fp8(*w)
    else:
        dq = qm.dequantize_int4(w[0], w[1], w[2], GROUP)
    return x.double() @ dq.double().T


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def time_rotating(call, x: torch.Tensor, copies: list) -> float:
    """Median microseconds of one call, rotating over the weight copies inside a CUDA graph."""
    def run_all():
        for w in copies:
            call(x, w)
    ms = triton.testing.do_bench_cudagraph(run_all, rep=20, return_mode="median")
    return 1000 * ms / len(copies)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / median time, in GB/s."""
    src = torch.randint(0, 2**15, (2**29,), dtype=torch.int16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench_cudagraph(lambda: dst.copy_(src), rep=50, return_mode="median")
    gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    return gbps


def n_copies(nbytes: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))


SCHEME_IDS = {"int8": qm.INT8, "fp8": qm.FP8, "int4": qm.INT4, "dense": qm.DENSE}


def chosen_config(scheme: str, m: int, kind: str = "") -> str:
    """The autotuner's pick for the last shape it ran (after a call of that shape)."""
    scheme_id = SCHEME_IDS[scheme]
    if not kind and not qm._gemv_applies(scheme_id, m, torch.bfloat16):
        return "cuBLAS" if scheme == "dense" else "dequantize+cuBLAS"
    if scheme == "int4" and m == 1 and not kind and hasattr(qm, "_tuned_dp4a"):
        config = qm._tuned_dp4a().best_config  # the integer GEMV (the packed scales are given)
        kw = config.kwargs
        return f"dp4a BN{kw['BLOCK_N']} W{kw['BLOCK_W']} w{config.num_warps} st{kw['STAGES']}"
    kind = kind or qm._kernel_kind(scheme_id, m)
    args = (scheme_id, kind, group_of(scheme), m == 1)
    if kind == "dot" and "prescale" in inspect.signature(qm._tuned_kernel.__wrapped__).parameters:
        # as `_gemv` passes it for this kernel (bfloat16 x: int4 may take the PRESCALE configs),
        # so the cached autotuner is the one that ran (absent from older trees)
        args += (scheme == "int4",)
    config = qm._tuned_kernel(*args).best_config
    kw = config.kwargs
    tile = f"BK{kw['BLOCK_K']}" if kind == "m1" else f"SUB{kw['SUB_K']}x{kw['K_SLICES']}"
    tile += " prescale" if kw.get("PRESCALE") else ""
    return f"{kind} BN{kw['BLOCK_N']} {tile} w{config.num_warps} st{kw['STAGES']} sk{kw['SPLIT_K']}"


def variant_layer(scheme: str):
    """int8/fp8/dense through the tensor-core kernel even for M == 1 (the dispatcher takes m1)."""
    return lambda x, w: qm._gemv(SCHEME_IDS[scheme], x, w[0], w[1] if len(w) > 1 else None, None,
                                 0, None, kind="dot")


def bench_shape(name: str, n: int, k: int, schemes: list, ms: list, copy_gbps: float,
                gen: torch.Generator, variants: bool) -> tuple:
    rows, prefill = [], []
    x_by_m = {m: torch.randn(m, k, generator=gen, device=DEVICE).to(torch.bfloat16)
              for m in (*ms, PREFILL_M)}
    bf16_us = {}
    w_bf16 = [make_weights("bf16", n, k, gen) for _ in range(n_copies(weight_bytes("bf16", n, k)))]
    for m in ms:
        bf16_us[m] = time_rotating(layer("bf16"), x_by_m[m], w_bf16)
    bf16_prefill_us = time_rotating(layer("bf16"), x_by_m[PREFILL_M], w_bf16[:1])
    del w_bf16
    for scheme in schemes:
        nbytes = weight_bytes(scheme, n, k)
        copies = [make_weights(scheme, n, k, gen) for _ in range(n_copies(nbytes))]
        runs = [(m, scheme, layer(scheme), "") for m in ms]
        if variants and scheme != "int4" and 1 in ms:
            runs.append((1, f"{scheme}/dot", variant_layer(scheme), "dot"))
        for m, label, call, kind in runs:
            row = {"shape": name, "N": n, "K": k, "M": m, "scheme": label, "bytes": nbytes,
                   "bf16_us": bf16_us[m], "limit_us": nbytes / (copy_gbps * 1e3),
                   "bf16_GBps": weight_bytes("bf16", n, k) / (bf16_us[m] * 1e3)}
            try:
                x = x_by_m[m]
                out = call(x, copies[0])  # first call of the shape: autotunes
                torch.cuda.synchronize()
                row["rel_err"] = rel_err(out, reference(scheme, x, copies[0]))
                row["config"] = chosen_config(scheme, m, kind)
                row["us"] = time_rotating(call, x, copies)
                row["GBps"] = nbytes / (row["us"] * 1e3)
                row["pct_of_copy"] = 100 * row["GBps"] / copy_gbps
                row["speedup_vs_bf16"] = bf16_us[m] / row["us"]
            except Exception as e:  # reported in the table, the other rows still run
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(format_row(row), flush=True)
        if scheme == "dense":  # prefill-sized x: dense_linear is F.linear itself
            del copies
            continue
        # The dispatcher takes the GEMM for fp8 only; int8 and int4 dispatch to dequantize + cuBLAS.
        paths = ((("gemm", layer(scheme)), ("dequant", dequant_layer(scheme))) if scheme == "fp8"
                 else (("dequant", layer(scheme)),))
        for path, call in paths:
            entry = {"shape": name, "N": n, "K": k, "M": PREFILL_M, "scheme": scheme,
                     "path": path, "bf16_us": bf16_prefill_us}
            try:
                out = call(x_by_m[PREFILL_M], copies[0])
                torch.cuda.synchronize()
                ref = reference(scheme, x_by_m[PREFILL_M][:64], copies[0])
                entry["rel_err"] = rel_err(out[:64], ref)
                del out
                entry["us"] = time_rotating(call, x_by_m[PREFILL_M], copies[:1])
                entry["vs_bf16"] = entry["us"] / bf16_prefill_us
                if path == "gemm":
                    best = qm._tuned_kernel(qm.FP8, "gemm", 0).best_config
                    entry["config"] = (" ".join(f"{key}{val}" for key, val in best.kwargs.items())
                                       + f" w{best.num_warps}")
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"
            prefill.append(entry)
            print(format_prefill(entry), flush=True)
        del copies
        torch.cuda.empty_cache()
    return rows, prefill


def format_row(r: dict) -> str:
    head = f"{r['shape']:>8} {r['N']:>6}x{r['K']:<6} M={r['M']:<3} {r['scheme']:<8}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    ok = "ok " if r["rel_err"] < TOLERANCE else "BAD"
    return (f"{head} {r['us']:8.1f} us {r['GBps']:5.0f} GB/s {r['pct_of_copy']:5.1f}% of copy "
            f"(limit {r['limit_us']:7.1f} us)  bf16 F.linear {r['bf16_us']:8.1f} us "
            f"{r['bf16_GBps']:5.0f} GB/s  x{r['speedup_vs_bf16']:4.2f}  err {r['rel_err']:.1e} "
            f"{ok} [{r['config']}]")


def format_prefill(r: dict) -> str:
    head = (f"{r['shape']:>8} {r['N']:>6}x{r['K']:<6} M={r['M']:<5} {r['scheme']:<5} "
            f"{r['path']:<7}")
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    return (f"{head} {r['us']:9.1f} us  bf16 {r['bf16_us']:9.1f} us  "
            f"time/bf16 {r['vs_bf16']:4.2f}  err {r['rel_err']:.1e} {r.get('config', '')}")


def main() -> None:
    global GROUP
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help=f"comma-separated subset of {','.join(SCHEMES)}")
    parser.add_argument("--m", default="1,8,16", help="decode row counts")
    parser.add_argument("--variants", action="store_true",
                        help="also time int8/fp8/dense at M = 1 through the tensor-core kernel")
    parser.add_argument("--group", type=int, default=GROUP, help="int4 group size")
    args = parser.parse_args()
    GROUP = args.group
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    schemes = args.schemes.split(",")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise SystemExit(f"unknown schemes {unknown}; choose from {list(SCHEMES)}")
    ms = [int(v) for v in args.m.split(",")]
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows, prefill = [], []
    for name in shapes:
        n, k = SHAPES[name]
        shape_rows, shape_prefill = bench_shape(name, n, k, schemes, ms, copy_gbps, gen,
                                                args.variants)
        rows += shape_rows
        prefill += shape_prefill
    elapsed = time.time() - t0

    print(f"\n=== decode GEMV (copy bandwidth {copy_gbps:.0f} GB/s; targets: int8 >= 82%, "
          f"int4 >= 67% of copy, dense ~3200 GB/s; x = F.linear time / this time) ===")
    for r in rows:
        print(format_row(r))
    print(f"\n=== prefill M={PREFILL_M}: the fp8 GEMM and dequantize + cuBLAS vs bf16 F.linear ===")
    for r in prefill:
        print(format_prefill(r))
    print("\n=== weighted by one 8B layer (qkv + o + gate_up + down), % of copy bandwidth; "
          f"per decode step (M tokens): {N_LAYERS} layers + head ===")
    for scheme in schemes:
        for m in ms:
            sel = {r["shape"]: r for r in rows
                   if r["scheme"] == scheme and r["M"] == m and "us" in r}
            layer_rows = [sel[s] for s in ("qkv", "o", "gate_up", "down") if s in sel]
            if len(layer_rows) < 4:
                continue
            total_bytes = sum(r["bytes"] for r in layer_rows)
            total_us = sum(r["us"] for r in layer_rows)
            gbps = total_bytes / (total_us * 1e3)
            bf16 = sum(r["bf16_us"] for r in layer_rows)
            bf16_gbps = sum(weight_bytes("bf16", r["N"], r["K"]) for r in layer_rows) / (bf16 * 1e3)
            line = (f"  {scheme:<5} M={m:<3} {total_us:8.1f} us/layer {gbps:5.0f} GB/s "
                    f"{100 * gbps / copy_gbps:5.1f}% of copy  x{bf16 / total_us:4.2f} vs bf16 "
                    f"F.linear ({bf16:7.1f} us, {bf16_gbps:5.0f} GB/s)")
            if "head" in sel:
                token_us = N_LAYERS * total_us + sel["head"]["us"]
                token_bf16 = N_LAYERS * bf16 + sel["head"]["bf16_us"]
                line += (f"; per step {token_us / 1e3:5.2f} ms of weight reads -> <= "
                         f"{1e6 / token_us:4.0f} steps/s (bf16 F.linear {token_bf16 / 1e3:5.2f} "
                         f"ms, {1e6 / token_bf16:4.0f})")
            print(line)
    print(f"\n(total {elapsed:.0f} s)")
    out_dir = os.environ.get("OUT")
    if out_dir:
        report = {"device": props.name, "sms": props.multi_processor_count,
                  "torch": torch.__version__, "triton": triton.__version__,
                  "copy_GBps": copy_gbps, "decode": rows, "prefill": prefill, "seconds": elapsed}
        with open(os.path.join(out_dir, "kernels.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
