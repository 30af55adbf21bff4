"""FastLinear: `nn.Linear` whose forward takes the Triton GEMV kernels for decode-sized inputs.

Batch-1 decode reads every weight once per token, and cuBLAS's M = 1 GEMV reads bf16 weights
slower than `quant_matmul`'s GEMV kernels do (see `quant_matmul.dense_linear`). `FastLinear` is an
`nn.Linear` in every respect but its forward: same parameters, state-dict keys, `assign=True`
loading and weight tying; its forward is `dense_linear`, which is `F.linear` wherever the kernels
do not apply (CPU, prefill-sized inputs, float32 with several rows, autograd). Parameters of an
`nn.Linear` require grad, so the kernels run under `torch.inference_mode()` / `torch.no_grad()`
(as the engine's steps do) or after `model.requires_grad_(False)`.
"""

import torch
from torch import nn

from tachylm.kernels.quant_matmul import dense_linear


class FastLinear(nn.Linear):
    """`nn.Linear` with `dense_linear` as its forward (Triton GEMV on CUDA for few rows of x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features], as `nn.Linear`."""
        return dense_linear(x, self.weight, self.bias)


def use_fast_linears(model: nn.Module) -> int:
    """Turn every plain `nn.Linear` in `model` into a `FastLinear`, in place; return how many.

    Each module keeps its identity, parameters (the same Parameter objects: no copies, tied
    weights stay tied), buffers and hooks: only its class changes, which is all FastLinear adds.
    Subclasses of `nn.Linear` (quantized or otherwise specialised layers) are left alone, so run
    this after any transform that looks for `type(module) is nn.Linear` (quantization).
    Works on meta-device models too (before `load_state_dict(assign=True)`).
    """
    swapped = 0
    for module in model.modules():  # each module once, however often it is shared
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
            swapped += 1
    return swapped
