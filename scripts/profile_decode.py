"""Where does a compiled decode step spend its time? Kernel totals vs wall time (GPU only).

Usage: PYTHONPATH=src python3 scripts/profile_decode.py [shape] [--layers N] [--quant MODE]
    [--group-size G] [--quant-head] [--tuning]
    [--pdl] [--sequence]
With --layers N the shape keeps N layers (faster to compile; per-layer kernels are the same).
"""
import argparse
import dataclasses
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tachylm.bench import SHAPES
from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.generate import Generation
from tachylm.kernels import use_fast_linears
from tachylm.kernels.quant_matmul import use_pdl
from tachylm.quant import apply_quant_option
from tachylm.sampling import SamplingParams
from tachylm.steps import Steps

parser = argparse.ArgumentParser()
parser.add_argument("shape", nargs="?", default="llama-3.1-8b")
parser.add_argument("--layers", type=int)
parser.add_argument("--quant")
parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
parser.add_argument("--quant-head", action="store_true", help="quantize the output head too")
parser.add_argument("--top", type=int, default=40)
parser.add_argument("--tuning", action="store_true", help="coordinate-descent tuning on")
parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                    help="programmatic dependent launch (default on, as tachylm's default)")
parser.add_argument("--sequence", action="store_true",
                    help="also list the kernels of the last profiled token in launch order")
args = parser.parse_args()
use_pdl(args.pdl)
config = SHAPES[args.shape]
if args.layers:
    config = dataclasses.replace(config, n_layers=args.layers)
model = build_random_model(config, device="cuda", dtype=torch.bfloat16, max_seq_len=256)
if args.quant:
    apply_quant_option(model, args.quant, args.group_size, args.quant_head)
use_fast_linears(model)
cache = KVCache(config.n_layers, 1, 256, config.n_kv_heads, config.head_dim, device="cuda",
                dtype=torch.bfloat16)
steps = Steps(model, cache, compile_decode=True, tuning=args.tuning)
params = SamplingParams(temperature=0.8, top_k=200, top_p=1.0)  # the bench's setting
start = time.time()
list(Generation(steps, [1, 2, 3, 4, 5], 3, params))
print(f"compile {time.time() - start:.1f} s", flush=True)
print(torch._dynamo.utils.compile_times(), flush=True)
gen = Generation(steps, [1, 2, 3, 4, 5], 200, params)
list(gen)
print(f"decode {gen.stats.decode_tokens_per_s:.1f} tokens/s ({config.n_layers} layers)", flush=True)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    gen = Generation(steps, [1, 2, 3, 4, 5], 51, params)
    list(gen)
    torch.cuda.synchronize()
events = prof.key_averages()
total = sum(e.device_time_total for e in events)
launches = sum(e.count for e in events if e.device_time_total > 0)
print(f"kernel time per token {total / 50 / 1000:.3f} ms; wall per token "
      f"{1000 / gen.stats.decode_tokens_per_s:.3f} ms; ~{launches / 50:.0f} kernels per token")
for e in sorted(events, key=lambda e: -e.device_time_total)[:args.top]:
    print(f"{e.device_time_total / 50:9.1f} us/token  {e.count / 50:6.1f}x  {e.key[:120]}")
if args.sequence:
    # The GPU activity of the last token: kernels (and copies) in start order, each with its
    # duration and the idle time since the previous one ended.
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    per_token = round(len(kernels) / 50)
    print(f"last token: {per_token} kernels")
    previous_end = None
    for e in kernels[-per_token:]:
        gap = 0.0 if previous_end is None else e.time_range.start - previous_end
        previous_end = e.time_range.end
        print(f"{e.time_range.elapsed_us():8.1f} us  gap {gap:6.1f}  {e.name[:100]}")
