"""Where does an eager prefill spend its time? Host enqueue, wall and kernel time, kernels by name.

Usage: PYTHONPATH=src python3 scripts/profile_prefill.py [shape] [--length 1024] [--quant MODE]
    [--group-size G] [--rounds 5] [--top 25] [--device cuda|cpu]

Random weights at the shape (the head in 16 bits unless --quant-head), one prompt at position 0,
timed as `tachylm bench --prefill` times it (prefill, greedy token, token on the host). Per
round it also takes the host's enqueue time: how long `Steps.prefill` takes to return, before
anything waits for the device. Enqueue close to wall time means the host, not the GPU, sets
the pace. Then one profiled prefill: the device's kernel time in total and by kernel name.
On the CPU (for a smoke test) the profile lists CPU operators instead.
"""
import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tachylm.bench import SHAPES
from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.kernels import use_fast_linears
from tachylm.quant import apply_quant_option
from tachylm.steps import Steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="?", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--length", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--quant", help="int8, fp8 or int4 (round-to-nearest)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument("--quant-head", action="store_true", help="quantize the output head too")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=25, help="kernel names listed")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; pass --device cpu (with a small shape)")
    config = SHAPES[args.shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_random_model(config, device=device, dtype=dtype, max_seq_len=args.length)
    use_fast_linears(model)
    apply_quant_option(model, args.quant, args.group_size, args.quant_head)
    cache = KVCache(config.n_layers, 1, args.length, config.n_kv_heads, config.head_dim,
                    device=device, dtype=dtype)
    steps = Steps(model, cache, prefill_graphs=False)
    prompt = torch.randint(0, config.vocab_size, (1, args.length), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for _ in range(2):  # the first call tunes and compiles the kernels
            steps.prefill(prompt, 0).argmax(-1).cpu()
        enqueue, wall = [], []
        for _ in range(args.rounds):
            sync()
            start = time.perf_counter()
            logits = steps.prefill(prompt, 0)
            enqueue.append(time.perf_counter() - start)
            logits.argmax(-1).cpu()
            wall.append(time.perf_counter() - start)
        activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            steps.prefill(prompt, 0).argmax(-1).cpu()

    name = args.quant or str(dtype).replace("torch.", "")
    print(f"{args.shape} {name}, prefill {args.length} tokens on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}")
    print(f"wall ms    median {1000 * statistics.median(wall):8.2f}  (min {1000 * min(wall):.2f}, "
          f"max {1000 * max(wall):.2f})")
    print(f"enqueue ms median {1000 * statistics.median(enqueue):8.2f}  (min "
          f"{1000 * min(enqueue):.2f}, max {1000 * max(enqueue):.2f})")
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == (torch.autograd.DeviceType.CUDA if device.type == "cuda"
                                 else torch.autograd.DeviceType.CPU):
            us = event.device_time_total if device.type == "cuda" else event.self_cpu_time_total
            by_name[event.name][0] += us
            by_name[event.name][1] += 1
    total = sum(us for us, _ in by_name.values())
    launches = sum(n for _, n in by_name.values())
    kind, unit = (("kernel", "launches") if device.type == "cuda"
                  else ("operator (self CPU)", "calls"))
    print(f"{kind} ms total {total / 1000:8.2f}  ({launches} {unit})")
    for event_name, (us, n) in sorted(by_name.items(), key=lambda item: -item[1][0])[:args.top]:
        print(f"  {us / 1000:8.2f} ms  {n:5d} x  {event_name[:110]}")


if __name__ == "__main__":
    main()
