"""Weight-only quantization as a model transform: swap Linear modules for quantized ones in place.

The transform finds the model's `nn.Linear` modules (`FusedLinear` included) by type and name
(every per-layer projection; the output head only when asked), replaces each with a
`QuantizedLinear` of the chosen scheme and drops the float weight as it goes, so memory peaks at
about one Linear over the quantized size. The model itself never learns what it holds: quantized
modules are ordinary submodules with a `forward`.

Modes (what `--quant` / `--mode` accept):
    int8       per-output-channel symmetric int8, round-to-nearest
    fp8        per-output-channel float8 e4m3, round-to-nearest (GPUs with compute capability >= 8.9)
    int4       groupwise asymmetric int4, round-to-nearest
    int4-gptq  the int4 format, weights chosen by GPTQ on calibration tokens (offline only)
    int8-gptq  the int8 format (round-to-nearest's scales), codes chosen by GPTQ (offline only)

Tied output head: with `include_head` the head becomes a quantized copy of the embedding table and
the embedding itself stays in floating point (a lookup reads one row per token, so quantizing it
saves no bandwidth and costs accuracy).

Folded norms: in the modes of `FOLD_NORM_MODES`, a Linear whose input is an RMSNorm's output (a
layer's qkv_proj and gate_up_proj, and the head) is quantized from W * g, its weight with the
norm's weight g multiplied into its columns, and the norm keeps no weight (an empty tensor;
see `fold_norm`). The function is the same, W (g * x_normed) = (W * g) x_normed, and the
decode kernels then read x alone, no norm weight beside it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tachylm.model import RMSNorm, Transformer
from tachylm.quant.schemes import (INT4_GROUP_SIZES, SCHEMES, Fp8Linear, Int4Linear, Int8Linear,
                                   QuantizedLinear, check_group_size)

__all__ = ["FOLD_NORM_MODES", "GPTQ_MODES", "HEAD", "INT4_GROUP_SIZES", "MODES", "SCHEMES",
           "Fp8Linear", "Int4Linear", "Int8Linear", "QuantizedLinear", "apply_quant_option",
           "fold_norm", "folded_norms", "link_inputs", "linear_names", "module_specs",
           "prepare_for_quantized_load", "quantize_model", "quantized_modules", "scheme_for_mode"]

Progress = Callable[[str], None]

MODES = ("int8", "fp8", "int4", "int4-gptq", "int8-gptq")
GPTQ_MODES = ("int4-gptq", "int8-gptq")
HEAD = "lm_head"
# Modes whose round-to-nearest quantization folds each input RMSNorm's weight into the Linear
# after it (module docstring). The kernel then reads no norm weight: int8 decode-8b with its head
# 327.7-327.8 -> 331.0-331.1 tokens/s on an H100 (BENCHMARKS.md); int8's perplexity change on
# SmolLM2 is in the quality table there. fp8 is not folded: on SmolLM2 folding took its change from
# +0.72% to +1.56% (+2.11% with the head), past its 1% line (BENCHMARKS.md).
FOLD_NORM_MODES = ("int8",)


def input_norms(model: nn.Module) -> dict[str, RMSNorm]:
    """Linear name -> the RMSNorm whose output is its whole input, in a Transformer: each layer's
    qkv_proj and gate_up_proj, and the head."""
    if not isinstance(model, Transformer):
        return {}
    norms = {HEAD: model.norm}
    for i, layer in enumerate(model.layers):
        norms[f"layers.{i}.attn.qkv_proj"] = layer.attn_norm
        norms[f"layers.{i}.mlp.gate_up_proj"] = layer.mlp_norm
    return norms


def fold_norm(norm: RMSNorm) -> None:
    """Leave `norm` without a weight (an empty tensor of its dtype and device), once its weight is
    in the next Linear's columns: it then normalises only (`kernels.rms_norm_ref`)."""
    norm.weight = nn.Parameter(norm.weight.detach().new_empty(0), requires_grad=False)


def folded_norms(model: nn.Module) -> list[str]:
    """Names of the RMSNorms left without a weight by folding, in model order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, RMSNorm) and module.weight.numel() == 0]


def scheme_for_mode(mode: str) -> str:
    """The storage scheme a mode produces ("int4-gptq" -> "int4"); ValueError lists the modes."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode.removesuffix("-gptq")


def scheme_options(mode: str, group_size: int) -> dict[str, Any]:
    """Keyword options of the mode's scheme (`from_float` / `empty`)."""
    return {"group_size": group_size} if scheme_for_mode(mode) == "int4" else {}


def linear_names(model: nn.Module, include_head: bool = False) -> list[str]:
    """Names of the float `nn.Linear` modules the transform would quantize, in model order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (include_head or name != HEAD)]


def link_inputs(model: nn.Module) -> int:
    """Let the kernels that compute the inputs of quantized Linears also hand them over in the
    form those Linears' kernels read (`QuantizedLinear.input_link`; int4 takes it): each layer's
    decode attention kernel for o_proj, and an int4 Linear's integer GEMV for the Linear its
    output goes to next (o_proj for gate_up_proj, gate_up_proj for down_proj, down_proj for the
    next layer's qkv_proj or, after the last layer, a quantized lm_head). The number of links
    made. A speed hint: results do not change. `quantize_model` and `prepare_for_quantized_load`
    call it."""
    if not isinstance(model, Transformer):
        return 0
    linked = 0
    chain = []  # the Linears in the order the residual stream passes them
    for layer in model.layers:
        attention, mlp = layer.attn, layer.mlp
        if isinstance(attention.o_proj, QuantizedLinear):
            attention.output_link = attention.o_proj.input_link()
            linked += bool(attention.output_link)
        chain += [attention.qkv_proj, None, attention.o_proj, mlp.gate_up_proj, mlp.down_proj]
    chain.append(model.lm_head)
    for producer, consumer in zip(chain, chain[1:]):  # None: attention, linked above
        if isinstance(producer, Int4Linear) and isinstance(consumer, QuantizedLinear):
            producer.feeds = consumer.input_link()
            linked += bool(producer.feeds)
    return linked


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Name -> module for every quantized Linear in `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def module_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Name -> `spec()` of every quantized Linear: what `prepare_for_quantized_load` needs."""
    return {name: module.spec() for name, module in quantized_modules(model).items()}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def head_weight(model: nn.Module) -> torch.Tensor:
    """The output head's float weight; for a tied head a copy, so the embedding stays untouched."""
    weight = model.get_submodule(HEAD).weight
    if weight is model.get_submodule("embed").weight:
        weight = weight.detach().clone()
    return weight


def quantize_linear(linear: nn.Linear, mode: str, group_size: int = 128, *, name: str = "layer",
                    weight: torch.Tensor | None = None, device: torch.device | str | None = None,
                    norm_weight: torch.Tensor | None = None) -> QuantizedLinear:
    """Round-to-nearest quantization of one Linear (`weight` overrides its weight).

    Args:
        device: where to compute and place the result (default: the weight's device).
        norm_weight: the weight [in_features] of the RMSNorm before the Linear, multiplied into
            its columns (in float32) before rounding (`fold_norm`).
    """
    check_quantizable_linear(linear, mode, group_size, name)
    weight = linear.weight if weight is None else weight
    bias = linear.bias
    if device is not None:
        weight = weight.to(device)
        bias = None if bias is None else bias.to(device)
    if norm_weight is not None:
        weight = weight.detach().to(torch.float32, copy=True)
        weight.mul_(norm_weight.detach().to(weight.device, torch.float32))
    return SCHEMES[scheme_for_mode(mode)].from_float(weight, bias, **scheme_options(mode, group_size))


def check_quantizable_linear(linear: nn.Module, mode: str, group_size: int, name: str) -> None:
    """ValueError naming the layer if `mode` cannot quantize it (int4: the group size must divide
    the layer's input width)."""
    if scheme_for_mode(mode) == "int4":
        check_group_size(linear.in_features, group_size, name)


def check_quantizable(model: nn.Module, mode: str, group_size: int, include_head: bool) -> list[str]:
    """Validate mode and shapes before touching anything; return the Linear names to quantize."""
    scheme_for_mode(mode)
    names = linear_names(model, include_head)
    if not names:
        raise ValueError("the model has no float Linear modules to quantize (already quantized?)")
    for name in names:
        check_quantizable_linear(model.get_submodule(name), mode, group_size, name)
    return names


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 128, include_head: bool = False,
                   calibration_tokens: torch.Tensor | None = None, progress: Progress | None = None, *,
                   device: torch.device | str | None = None, fold_norms: bool = True,
                   **gptq_options: Any) -> dict[str, dict]:
    """Quantize `model` in place (in `FOLD_NORM_MODES`, folding the input norms: module docstring).

    Args:
        model: a Transformer with float Linear modules (any device and dtype).
        mode: one of `MODES`.
        group_size: int4 group size (32, 64, 128 or 256); must divide every quantized layer's width.
        include_head: quantize the output head too (a copy of the embedding when tied).
        calibration_tokens: [n_samples, seq_len] token ids; required for the GPTQ modes.
        progress: called with one line per layer.
        device: where quantization runs and the quantized modules are placed; default each
            weight's own device. For GPTQ, the device the blocks visit one at a time.
        fold_norms: in `FOLD_NORM_MODES`, fold the input norms' weights into their Linears
            (module docstring); False keeps them (closer to the original, ~1% slower decode).
        gptq_options: passed to `gptq.gptq_quantize_model` (damp, act_order, batch_size).
    Returns:
        Name -> spec of every module quantized.
    Raises:
        ValueError: unknown mode, bad group size, a layer width the group size does not divide,
            missing calibration tokens.
    """
    names = check_quantizable(model, mode, group_size, include_head)
    if mode in GPTQ_MODES:
        if calibration_tokens is None:
            raise ValueError(f"{mode} needs calibration tokens (tachylm quantize --calib FILE)")
        from tachylm.quant.gptq import gptq_quantize_model

        gptq_quantize_model(model, calibration_tokens, group_size, scheme=scheme_for_mode(mode),
                            include_head=include_head, device=device, progress=progress,
                            **gptq_options)
        link_inputs(model)
        return module_specs(model)
    if calibration_tokens is not None or gptq_options:
        raise ValueError(f"calibration applies to {' and '.join(GPTQ_MODES)} only, not {mode}")
    norms = input_norms(model) if fold_norms and mode in FOLD_NORM_MODES else {}
    for i, name in enumerate(names):
        linear = model.get_submodule(name)
        weight = head_weight(model) if name == HEAD else None
        norm = norms.get(name)
        if norm is not None and not norm.weight.numel():
            norm = None  # already folded: nothing to fold
        set_module(model, name, quantize_linear(linear, mode, group_size, name=name, weight=weight,
                                                device=device,
                                                norm_weight=None if norm is None else norm.weight))
        if norm is not None:  # only once the Linear holds it, so a failure leaves both as they were
            fold_norm(norm)
        del linear, weight  # the float weight goes now, not at the end
        if progress is not None:
            progress(f"quantized {name} ({mode}) [{i + 1}/{len(names)}]")
    link_inputs(model)
    return module_specs(model)


def apply_quant_option(model: nn.Module, mode: str | None, group_size: int = 128, include_head: bool = False,
                       progress: Progress | None = None, device: torch.device | str | None = None,
                       fold_norms: bool = True) -> nn.Module:
    """On-the-fly quantization for `--quant MODE` (generate, chat, bench).

    Args:
        model: a freshly built float model. Build it on the CPU and pass `device` to keep the peak
            device memory near the quantized size; the quantized modules are created on `device`
            and the rest of the model (embedding, norms, rotary tables) is moved there.
        mode: None (no-op), or "int8" / "fp8" / "int4". GPTQ needs calibration and is offline only.
        fold_norms: as `quantize_model`.
    Returns:
        The model (modified in place).
    """
    if mode is None:
        return model
    if mode in GPTQ_MODES:
        raise ValueError(f"{mode} needs calibration data and runs offline: "
                         f"tachylm quantize MODEL --mode {mode} --calib FILE -o DIR, then load DIR")
    quantize_model(model, mode, group_size, include_head, progress=progress, device=device,
                   fold_norms=fold_norms)
    if device is not None:
        model.to(device)
    return model


def prepare_for_quantized_load(model: nn.Module, specs: dict[str, dict[str, Any]]) -> None:
    """Swap in shapeless (meta) quantized modules per `specs` so that
    `load_state_dict(..., assign=True)` can load a quantized checkpoint.

    Args:
        model: the model on the meta device, as `Transformer(config)` creates it.
        specs: module name -> `QuantizedLinear.spec()` (quantization.json's "modules").
    Raises:
        ValueError: a name that is not a Linear of this model, an unknown scheme or bad options.
    """
    for name, spec in specs.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantized module {name!r} is not a Linear layer of this model")
        options = dict(spec)
        scheme = options.pop("scheme", None)
        if scheme not in SCHEMES:
            raise ValueError(f"{name}: unknown quantization scheme {scheme!r}; "
                             f"known: {', '.join(SCHEMES)}")
        try:
            module = SCHEMES[scheme].empty(linear.in_features, linear.out_features, linear.bias is not None,
                                           device="meta", **options)
        except TypeError as e:
            raise ValueError(f"{name}: bad options {options} for scheme {scheme}: {e}") from e
        set_module(model, name, module)
    link_inputs(model)
