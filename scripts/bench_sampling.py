"""Time top-k selection and sampling over the Llama-3 vocabulary on a CUDA GPU.

    PYTHONPATH=src python3 scripts/bench_sampling.py [BATCH ...]   (default: 1 8 16)

For V = 128256 and each batch size: torch.topk(200, sorted=False) over float32 and bfloat16
logits, and the whole `sample()` of the bench's setting (temperature 0.8, top_k 200, top_p 1) with
the candidates ranked pairwise (as before `SamplingPlan.rank`) and without (today's plan), given
float32 logits or bfloat16 ones (what decode hands it for a bfloat16 model; unranked, those go to
the top-k sampling kernels of `tachylm.kernels.topk`). Each is compiled with
torch.compile(mode="reduce-overhead") (CUDA graphs, as decode runs it) and checked before it is
timed. Timing: CUDA events around blocks of back-to-back calls queued behind a GPU sleep, so host
launch gaps are not counted; the median block's time per call, in microseconds.

An exact two-level top-k (chunk maxima, the k best chunks, one small topk over them) measured
slower than torch.topk here on an H100 (60.5 against 56.5 us at batch 1, chunks of 32;
BENCHMARKS.md); the histogram kernels replaced both.
"""

import dataclasses
import functools
import statistics
import sys

import torch

from tachylm.sampling import SamplingParams, plan_for, sample, to_tensors

VOCAB, K = 128256, 200
PARAMS = SamplingParams(temperature=0.8, top_k=K, top_p=1.0)
DEVICE = "cuda"


def microseconds(fn, *args, calls: int = 50, blocks: int = 30) -> float:
    """Median over `blocks` of the GPU time per call of `fn(*args)`, in microseconds."""
    times = []
    for _ in range(blocks):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(5_000_000)  # keep the GPU busy while the host queues the whole block
        start.record()
        for _ in range(calls):
            fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def compiled(fn):
    """`fn` compiled as decode compiles it; each call starts a new CUDA-graph step."""
    fn = torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args)
    return call


def main(batches: list[int]) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampling.py times CUDA graphs: run it on a machine with a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, V={VOCAB}, k={K}")
    for batch in batches:
        torch._dynamo.reset()  # each batch size compiles afresh, within the recompile limit
        gen = torch.Generator(device=DEVICE).manual_seed(batch)
        logits = torch.randn(batch, VOCAB, device=DEVICE, generator=gen) * 3
        settings = to_tensors([PARAMS] * batch, DEVICE)
        for t in (logits, *settings):
            torch._dynamo.mark_static_address(t)  # no input copies inside the timed graphs
        want = logits.topk(K, dim=-1)
        fn = compiled(lambda x: x.topk(K, dim=-1, sorted=False))
        for _ in range(3):  # warm-up, CUDA-graph recording, first replay
            values, indices = fn(logits)
        assert torch.equal(values.sort(dim=-1, descending=True).values, want.values)
        print(f"batch {batch:2d}  {'torch.topk':24s} {microseconds(fn, logits):8.1f} us")
        logits16 = logits.to(torch.bfloat16)  # what decode hands sample() for a bf16 model
        torch._dynamo.mark_static_address(logits16)
        for _ in range(3):
            values, indices = fn(logits16)
        assert torch.equal(values.sort(dim=-1, descending=True).values,
                           logits16.topk(K, dim=-1).values)
        print(f"batch {batch:2d}  {'torch.topk bfloat16':24s} {microseconds(fn, logits16):8.1f} us")
        plan = plan_for([PARAMS], VOCAB)
        for name, variant_plan in [("sample() ranked", dataclasses.replace(plan, rank=True)),
                                   ("sample() unranked", plan)]:
            fn = compiled(functools.partial(sample, plan=variant_plan))
            for x, dtype_name in ((logits, ""), (logits16, ", bfloat16 logits")):
                for _ in range(3):
                    tokens = fn(x, settings)
                # every logit >= the k-th largest is a candidate (the kernels' rule, see topk.py)
                kth = x.topk(K, dim=-1).values[:, -1]
                assert (x.gather(-1, tokens[:, None])[:, 0] >= kth).all(), name
                print(f"batch {batch:2d}  {name + dtype_name:24s} "
                      f"{microseconds(fn, x, settings):8.1f} us")


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [1, 8, 16])
