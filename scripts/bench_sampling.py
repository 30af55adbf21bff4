"""Time top-k candidate selection and sampling over the Llama-3 vocabulary on a CUDA GPU.

    PYTHONPATH=src python3 scripts/bench_sampling.py

For V = 128256 and batch 1, 8, 16: torch.topk(200, sorted=False), tachylm's two-level top-k
(`sampling.top_candidates`) for chunk lengths 16, 32 and 64, and the whole `sample()` of the bench's
setting (temperature 0.8, top_k 200, top_p 1) as it was (plain topk, candidates ranked pairwise)
and as it is. Each is compiled with torch.compile(mode="reduce-overhead") (CUDA graphs, as decode
runs it) and checked against torch.topk before it is timed. Timing: CUDA events around blocks of
back-to-back calls queued behind a GPU sleep, so host launch gaps are not counted; the median
block's time per call, in microseconds.
"""

import dataclasses
import functools
import statistics

import torch

import tachylm.sampling as sampling
from tachylm.sampling import SamplingParams, plan_for, sample, to_tensors, top_candidates

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


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampling.py times CUDA graphs: run it on a machine with a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, V={VOCAB}, k={K}")
    for batch in (1, 8, 16):
        torch._dynamo.reset()  # each batch size compiles afresh, within the recompile limit
        gen = torch.Generator(device=DEVICE).manual_seed(batch)
        logits = torch.randn(batch, VOCAB, device=DEVICE, generator=gen) * 3
        settings = to_tensors([PARAMS] * batch, DEVICE)
        for t in (logits, *settings):
            torch._dynamo.mark_static_address(t)  # no input copies inside the timed graphs
        want = logits.topk(K, dim=-1)
        top_k = {"torch.topk": lambda x: x.topk(K, dim=-1, sorted=False)}
        for chunk in (16, 32, 64):
            top_k[f"two-level L={chunk}"] = functools.partial(top_candidates, k=K, chunk=chunk)
        for name, fn in top_k.items():
            fn = compiled(fn)
            for _ in range(3):  # warm-up, CUDA-graph recording, first replay
                values, indices = fn(logits)
            assert torch.equal(values.sort(dim=-1, descending=True).values, want.values), name
            assert torch.equal(logits.gather(1, indices), values), name
            print(f"batch {batch:2d}  {name:24s} {microseconds(fn, logits):8.1f} us")

        plan = plan_for([PARAMS], VOCAB)
        old_plan = dataclasses.replace(plan, rank=True)
        for name, variant_plan, ratio in [("sample() old", old_plan, float("inf")),
                                          ("sample() new", plan, sampling.TWO_LEVEL_MIN_RATIO)]:
            # The old sample() is today's with a plain topk (two-level never pays) and ranking.
            saved, sampling.TWO_LEVEL_MIN_RATIO = sampling.TWO_LEVEL_MIN_RATIO, ratio
            try:
                fn = compiled(functools.partial(sample, plan=variant_plan))
                for _ in range(3):
                    tokens = fn(logits, settings)
                assert (tokens[:, None] == want.indices).any(dim=-1).all(), name
                print(f"batch {batch:2d}  {name:24s} {microseconds(fn, logits, settings):8.1f} us")
            finally:
                sampling.TWO_LEVEL_MIN_RATIO = saved


if __name__ == "__main__":
    main()
