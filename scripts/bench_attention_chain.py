"""What decode attention adds to a layer on the GPU: qkv GEMV -> attention -> o GEMV, chained.

Usage: PYTHONPATH=src python3 scripts/bench_attention_chain.py [--shape llama-3.1-8b]
    [--layers 32] [--slots 4096] [--filled 200,4000] [--splits 8,16,32]

A standalone timing of the attention kernel (scripts/bench_attention.py) counts its launch and
leaves out how it sits between the GEMVs under programmatic dependent launch. This script times
what the decode step runs: for every layer, the qkv GEMV (RMSNorm prologue), the attention
kernel as the model calls it (rotary tables, this step's key and value written into a cache of
--slots slots, filled up to each --filled length), and the o GEMV with the residual add, chained
over --layers layers with distinct weights and caches in one CUDA graph. Rows:

* none: qkv -> o with no attention (q handed to o as it is); the baseline.
* copy: a trivial PDL kernel in attention's place (it copies q): the floor of one more kernel.
* default: the kernel with the launcher's own choice of slices (`choose_splits`).
* splits N: the kernel with N slices a kv head.

Each row is the median over 7 rounds (the rows alternate within a round) of 20 graph replays;
"per layer" is its time over `none`, divided by the layers. Before anything is timed, each
attention row's output at the first layer is checked against `decode_attention_ref`
(float32, the same cache), and the step's final output against the default row's.
"""
import argparse
import statistics

import torch
import triton
import triton.language as tl

from tachylm.bench import SHAPES
from tachylm.kernels.attention import decode_attention_ref, decode_attention_triton
from tachylm.kernels.quant_matmul import dense_linear, pdl_launch, pdl_release, pdl_start


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pdl_release(PDL)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def copy_pdl(q: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(q)
    _copy_kernel[(triton.cdiv(q.numel(), 512),)](q, out, q.numel(), BLOCK=512, num_warps=4,
                                                 **pdl_launch(q.device))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--slots", type=int, default=4096, help="cache slots a layer")
    parser.add_argument("--filled", default="200", help="filled lengths, comma-separated")
    parser.add_argument("--splits", default="", help="explicit slice counts to time too")
    args = parser.parse_args()
    config = SHAPES[args.shape]

    def ints(text: str, flag: str) -> list:
        try:
            return [int(n) for n in text.split(",") if n.strip()]
        except ValueError:
            parser.error(f"{flag} takes comma-separated integers, got {text!r}")

    filled_list = ints(args.filled, "--filled")
    if any(not 1 <= f <= args.slots for f in filled_list):
        parser.error(f"--filled lengths must lie in 1..--slots ({args.slots})")
    splits_list = ints(args.splits, "--splits")
    if any(n < 1 for n in splits_list):
        parser.error("--splits counts must be at least 1")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it times Triton kernels in a CUDA graph)")
    heads, kv_heads, head_dim, dim = (config.n_heads, config.n_kv_heads, config.head_dim,
                                      config.dim)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    dev, bf = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=bf, generator=gen) * scale

    w_qkv = [randn(q_size + 2 * kv_size, dim, scale=dim ** -0.5) for _ in range(args.layers)]
    w_o = [randn(dim, q_size, scale=q_size ** -0.5) for _ in range(args.layers)]
    norm_w = torch.ones(dim, device=dev, dtype=bf)
    caches = [(randn(1, kv_heads, args.slots, head_dim), randn(1, kv_heads, args.slots, head_dim))
              for _ in range(args.layers)]
    angles = (torch.arange(args.slots, device=dev)[:, None]
              * torch.rand(head_dim // 2, device=dev, generator=gen)[None])
    cos_t, sin_t = angles.cos(), angles.sin()
    pos = torch.zeros(1, dtype=torch.int64, device=dev)
    x0 = randn(1, dim)

    def split_qkv(qkv):
        return (qkv[:, :q_size].view(1, heads, head_dim),
                qkv[:, q_size:q_size + kv_size].view(1, kv_heads, head_dim),
                qkv[:, q_size + kv_size:].view(1, kv_heads, head_dim))

    def step(variant):
        x = x0
        for layer in range(args.layers):
            q, new_k, new_v = split_qkv(dense_linear(x, w_qkv[layer], norm=(norm_w, 1e-5)))
            if variant == "none":
                out = q
            elif variant == "copy":
                out = copy_pdl(q)
            else:
                out = decode_attention_triton(q, *caches[layer], pos, cos_t, sin_t, new_k, new_v,
                                              rope_table=True, splits=variant)
            x = dense_linear(out.reshape(1, q_size), w_o[layer], residual=x)
        return x

    variants = {"none": "none", "copy": "copy", "default": None}
    variants.update({f"splits {n}": n for n in splits_list})
    print(f"# {args.shape}: {heads} heads, {kv_heads} kv heads, {args.layers} layers, "
          f"{args.slots} slots, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for filled in filled_list:
        pos.fill_(filled - 1)
        q, new_k, new_v = split_qkv(dense_linear(x0, w_qkv[0], norm=(norm_w, 1e-5)))
        k_ref, v_ref = (c.float() for c in caches[0])
        ref = decode_attention_ref(q.float(), k_ref, v_ref, pos, cos_t, sin_t, new_k.float(),
                                   new_v.float(), rope_table=True)
        for name, variant in variants.items():
            if name in ("none", "copy"):
                continue
            k_l, v_l = (c.clone() for c in caches[0])
            out = decode_attention_triton(q, k_l, v_l, pos, cos_t, sin_t, new_k, new_v,
                                          rope_table=True, splits=variant)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                raise SystemExit(f"{name} at {filled} filled slots: relative error {err:.1e}")
        final = step(None)
        graphs = {}
        for name, variant in variants.items():
            out = step(variant)  # warm-up: compiles and tunes
            if name not in ("none", "copy"):
                err = ((out.float() - final.float()).abs().max() / final.float().abs().max()).item()
                if err > 5e-2:
                    raise SystemExit(f"{name} at {filled} filled slots: the step's output is off "
                                     f"by {err:.1e}")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(variant)
            torch.cuda.current_stream().wait_stream(side)
            graphs[name] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[name]):
                step(variant)
        times = {name: [] for name in graphs}
        for _ in range(7):
            for name, graph in graphs.items():
                for _ in range(3):
                    graph.replay()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    graph.replay()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 20 * 1000)
        base = statistics.median(times["none"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"filled {filled:6d}  {name:10s} step {med:8.1f} us ({min(ts):.1f}-{max(ts):.1f})"
                  f"  per layer over none {(med - base) / args.layers:6.2f} us", flush=True)


if __name__ == "__main__":
    main()
