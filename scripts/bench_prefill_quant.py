"""Prefill of the quantized modes against bf16 on a GPU, interleaved in one process.

Usage: PYTHONPATH=src python3 scripts/bench_prefill_quant.py [--modes int8,fp8,int4]
                                                             [--length 1024] [--rounds 8]

One random bf16 model at the Llama-3.1-8B shape and a quantized copy per mode (all linears, the
head stays bf16, as `tachylm bench --quant MODE`). Each round times one eager prefill of every
model (prefill of a random prompt, the greedy token, the token on the host: time to first token as
`tachylm bench --prefill` takes it), in an order that rotates every round, so that a drift of the
machine's speed during the run falls on every mode alike. Prints the median per mode and its ratio
to bf16's. Each quantized model is checked first: its first layer's products on prefill-sized
input against float64 (`check_layer`).
"""
import argparse
import copy
import statistics
import time

import torch

from tachylm.bench import SHAPES
from tachylm.build import build_random_model
from tachylm.cache import KVCache
from tachylm.kernels import use_fast_linears
from tachylm.quant import quantize_model
from tachylm.quant.schemes import QuantizedLinear
from tachylm.steps import Steps

PREFILL_ROWS = 256  # rows of x in the check (> 16: the prefill kernels)
TOLERANCE = 1e-2  # relative error of one product against float64 (bf16 output: ~2e-3)


def check_layer(layer: torch.nn.Module) -> float:
    """The largest relative error of the layer's quantized linears on prefill-sized input (their
    prefill kernels) against float64 products with the dequantized weights. The same check at the
    model's output is no use: 32 layers of random weights amplify bf16 rounding to ~5% of the
    logits, whatever the kernels."""
    worst = 0.0
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name, module in layer.named_modules():
        if isinstance(module, QuantizedLinear):
            x = torch.randn(PREFILL_ROWS, module.in_features, device="cuda",
                            generator=gen).to(torch.bfloat16)
            got = module(x).double()
            want = x.double() @ module.dequantize().double().T
            err = ((got - want).norm() / want.norm()).item()
            assert err < TOLERANCE, f"{name}: relative error {err:.2e}"
            worst = max(worst, err)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="int8,fp8,int4")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill_quant.py needs a CUDA GPU")
    config = SHAPES[args.shape]
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {args.shape}, prompt "
          f"{args.length} tokens, {args.rounds} rounds", flush=True)
    base = build_random_model(config, device="cuda", dtype=torch.bfloat16,
                              max_seq_len=args.length)
    models = {"bf16": base}
    for mode in args.modes.split(","):
        models[mode] = copy.deepcopy(base)
        quantize_model(models[mode], mode)
    for model in models.values():
        use_fast_linears(model)
    prompt = torch.randint(0, config.vocab_size, (1, args.length), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(0))
    steps = {}
    for mode, model in models.items():
        cache = KVCache(config.n_layers, 1, args.length, config.n_kv_heads, config.head_dim,
                        device="cuda", dtype=torch.bfloat16)
        steps[mode] = Steps(model, cache, prefill_graphs=False)

    def once(mode: str) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        steps[mode].prefill(prompt, 0).argmax(-1).cpu()
        return 1000 * (time.perf_counter() - start)

    with torch.inference_mode():
        for mode, model in models.items():
            if mode != "bf16":
                print(f"{mode:>5}: prefill-sized products against float64, first layer: "
                      f"{check_layer(model.layers[0]):.1e}", flush=True)
            steps[mode].prefill(prompt, 0)  # the first call of each shape autotunes
            once(mode)  # warm-up
        times = {mode: [] for mode in models}
        order = list(models)
        for r in range(args.rounds):
            for mode in order[r % len(order):] + order[:r % len(order)]:
                times[mode].append(once(mode))
    ref = statistics.median(times["bf16"])
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"{mode:>5}: prefill {args.length} median {med:6.1f} ms (min {min(ts):6.1f}, max "
              f"{max(ts):6.1f})  x{med / ref:4.2f} bf16", flush=True)


if __name__ == "__main__":
    main()
