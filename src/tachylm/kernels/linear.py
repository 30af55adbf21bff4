"""The model's Linear layers: `nn.Linear` with the decode-layer fusions, in PyTorch or Triton.

A transformer layer's decode step is a few matrix-vector products with small element-wise steps
between them (RMSNorm, SiLU(gate) * up, the residual adds). `FusedLinear` is an `nn.Linear` whose
forward takes them as keywords, `forward(x, norm=(weight, eps), swiglu=..., residual=...)`, and
computes `residual + epilogue(W @ prologue(x) + b)` in PyTorch ops
(`quant_matmul.dense_linear_ref`); the model builds every projection as one. `FastLinear` computes
the same with `dense_linear`: on CUDA for decode-sized inputs the Triton GEMV kernels do the fusion
while they read the weight, so each step costs no kernel of its own; elsewhere (CPU, prefill-sized
inputs, float32 with several rows, autograd) it is `F.linear` with the fusion around it (on CUDA
the RMSNorm and SwiGLU as one kernel each, `quant_matmul.fused_linear`). The
quantized Linears of `tachylm.quant` take the same keywords.

Both keep `nn.Linear`'s parameters, state-dict keys, `assign=True` loading and weight tying.
Parameters of an `nn.Linear` require grad, so the kernels run under `torch.inference_mode()` /
`torch.no_grad()` (as the engine's steps do) or after `model.requires_grad_(False)`.
"""

from typing import Optional

import torch
from torch import nn

from tachylm.kernels.quant_matmul import dense_linear, dense_linear_ref, dense_mlp


class FusedLinear(nn.Linear):
    """`nn.Linear` whose forward also takes the fusions (PyTorch ops; see the module docstring)."""

    def forward(self, x: torch.Tensor, *, norm: Optional[tuple] = None, swiglu: bool = False,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """residual + epilogue(prologue(x) @ weight.T + bias).

        Args:
            x: [..., in_features].
            norm: optional (weight [in_features], eps): RMSNorm x first.
            swiglu: the weight's rows are [gate; up] halves: return SiLU(gate) * up.
            residual: optional, of the result's shape, added to the result.
        Returns:
            [..., out_features] ([..., out_features / 2] with swiglu).
        """
        return dense_linear_ref(x, self.weight, self.bias, norm=norm, swiglu=swiglu,
                                residual=residual)


class FastLinear(FusedLinear):
    """`FusedLinear` computed by `dense_linear` (Triton GEMV with the fusion, on CUDA)."""

    def forward(self, x: torch.Tensor, *, norm: Optional[tuple] = None, swiglu: bool = False,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As `FusedLinear.forward`."""
        return dense_linear(x, self.weight, self.bias, norm=norm, swiglu=swiglu,
                            residual=residual)


def mlp(gate_up: nn.Module, down: nn.Module, x: torch.Tensor, norm: tuple) -> torch.Tensor:
    """A decoder layer's MLP: x + down(SiLU(gate) * up) of RMSNorm(x), where `gate_up` computes
    [gate; up] and both are Linears taking the fusions (`FusedLinear`, a quantized Linear).

    Two `FastLinear`s without bias take `dense_mlp`, one kernel for batch-1 decode on CUDA;
    any other pair is called as two Linears.

    Args:
        gate_up, down: the MLP's projections; x: [..., dim]; norm: (weight, eps) of its RMSNorm.
    Returns:
        [..., dim].
    """
    if (type(gate_up) is FastLinear and type(down) is FastLinear and gate_up.bias is None
            and down.bias is None):
        return dense_mlp(x, gate_up.weight, down.weight, norm=norm, residual=x)
    hidden = gate_up(x, norm=norm, swiglu=True)  # [..., ffn_dim]
    return down(hidden, residual=x)


def use_fast_linears(model: nn.Module) -> int:
    """Turn every plain `nn.Linear` or `FusedLinear` in `model` into a `FastLinear`, in place;
    return how many.

    Each module keeps its identity, parameters (the same Parameter objects: no copies, tied
    weights stay tied), buffers and hooks: only its class changes, which is all FastLinear adds.
    Other subclasses of `nn.Linear` are left alone; quantized Linears are not `nn.Linear`s.
    Works on meta-device models too (before `load_state_dict(assign=True)`).
    """
    swapped = 0
    for module in model.modules():  # each module once, however often it is shared
        if type(module) in (nn.Linear, FusedLinear):
            module.__class__ = FastLinear
            swapped += 1
    return swapped
