"""GPTQ (Frantar et al., 2022) for the int4 and int8 schemes: codes chosen to minimise each layer's
output error on calibration activations, stored in the same format as round-to-nearest's.

Per Linear with weight W [N, K] and calibration inputs X [n, K]:

1. H = 2 X^T X / n (float32), dead inputs (H_kk = 0) pinned, damped by `damp` x mean(diag H).
2. U = upper Cholesky factor of H^-1.
3. Columns are quantized left to right in blocks of 128; each column's rounding error, divided by
   U_kk, is spread over the not-yet-quantized columns (row k of U), within the block at once and
   onto the rest of the matrix after each block.
4. Groups are static (consecutive `group_size` columns, as in the RTN layout); a group's scale and
   zero are computed from the error-updated weights when its first column is reached. With
   `act_order` (the default) columns are visited by decreasing H_kk and the group grids are fixed
   up front from the original weights, so the stored layout stays the same. int8 has one scale
   per row, round-to-nearest's, fixed up front.
5. Each output row keeps whichever of its GPTQ and round-to-nearest quantizations has the smaller
   error e H e^T (e = the row's weight error, H undamped): the quantity GPTQ minimises, which is a
   sum over rows. GPTQ's column-by-column greed does not always beat RTN on it (on SmolLM2, shipped
   in 4 bits, RTN is the better one for most rows at group 32). `rtn_fallback=False` turns this off.

The model is processed one block at a time: the calibration hidden states [n_samples, seq, dim]
stay on `device`, each block visits `device`, its Linears are quantized in order (each from inputs
produced by the already-quantized ones before it), the hidden states are pushed through the
quantized block, and the block goes back to where it came from. Only one block's weights and the
hidden states are on the device at a time, so a model held in host memory can be quantized on a GPU
much smaller than the model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tachylm.kernels.quant_matmul import linear_input_ref, make_fusion
from tachylm.quant import HEAD, head_weight, set_module
from tachylm.quant.schemes import (Int4Linear, Int8Linear, check_group_size, int4_codes,
                                   int4_group_params, pack_int4)

Progress = Callable[[str], None]
QuantizeColumn = Callable[[torch.Tensor, int, int], torch.Tensor]


MAX_CALIBRATION_SAMPLES = 128


def calibration_windows(token_ids: list[int] | torch.Tensor, n_samples: int | None = None,
                        seq_len: int = 512) -> torch.Tensor:
    """Split calibration text tokens into `n_samples` non-overlapping windows of `seq_len`.

    Windows are spread evenly over the text (so a long text is sampled throughout). n_samples
    None: as many as the text holds, at most `MAX_CALIBRATION_SAMPLES`.

    Returns:
        int64 [n_samples, seq_len].
    Raises:
        ValueError: the text holds fewer than n_samples * seq_len tokens (or, with n_samples None,
            fewer than one window).
    """
    tokens = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if n_samples is None:
        n_samples = min(MAX_CALIBRATION_SAMPLES, tokens.numel() // max(seq_len, 1))
        if n_samples < 1:
            raise ValueError(f"the calibration text has {tokens.numel()} tokens, fewer than one "
                             f"window of {seq_len}; give a longer text or lower --calib-seq-len")
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"calibration needs n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    need = n_samples * seq_len
    if tokens.numel() < need:
        raise ValueError(f"the calibration text has {tokens.numel()} tokens but {n_samples} samples x "
                         f"{seq_len} tokens = {need} are needed; give a longer text or lower "
                         "--calib-samples / --calib-seq-len")
    spare = tokens.numel() - need
    starts = [i * seq_len + (spare * i) // max(n_samples - 1, 1) for i in range(n_samples)]
    return torch.stack([tokens[s:s + seq_len] for s in starts])


class _Captured(Exception):
    """Raised by the input hook to stop a forward once the wanted layer's input is seen."""


def input_hessian(linear: nn.Module, run: Callable[[], None], in_features: int,
                  device: torch.device) -> torch.Tensor:
    """H = 2 X^T X / n over the inputs X that `linear` multiplies while `run()` executes.

    `run` is called once per batch by the caller's loop; the forward stops at `linear`.

    Returns:
        float32 [in_features, in_features] on `device`.
    """
    hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
    rows = 0

    def hook(module, args, kwargs):
        nonlocal rows
        # What the layer multiplies: its input after any fused prologue (the RMSNorm).
        x = linear_input_ref(args[0], make_fusion(kwargs.get("norm")))
        x = x.reshape(-1, in_features).to(device=device, dtype=torch.float32)
        hessian.addmm_(x.T, x)
        rows += x.shape[0]
        raise _Captured

    handle = linear.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    assert rows > 0, "the calibration forward never reached the layer"
    return hessian.mul_(2.0 / rows)


def _gptq_columns(weight: torch.Tensor, hessian: torch.Tensor, quantize: QuantizeColumn, *,
                  damp: float, act_order: bool, block_size: int, name: str) -> None:
    """The GPTQ column loop shared by the schemes (module docstring, steps 1-3).

    `quantize(w_block, i, column)` rounds column i of the error-updated block `w_block` (the
    weight's column `column`), stores its codes and returns it dequantized, [N] float32. With
    `act_order` the columns are visited by decreasing H_kk; `column` is always the weight's own.
    """
    n_in = weight.shape[1]
    w = weight.detach().to(torch.float32).clone()
    h = hessian.to(device=weight.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # inputs that are always zero: their weights never matter
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if order is not None:
        w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if info.item() != 0:
        raise RuntimeError(f"{name}: GPTQ's Hessian is not positive definite even after dampening; "
                           "calibrate on more tokens (--calib-samples) or raise the dampening")
    h_inv = factor  # upper Cholesky factor of H^-1
    columns = order.tolist() if order is not None else range(n_in)
    for start in range(0, n_in, block_size):
        end = min(start + block_size, n_in)
        w_block = w[:, start:end].clone()
        err_block = torch.empty_like(w_block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            err = (w_block[:, i] - quantize(w_block, i, columns[start + i])) / h_block[i, i]
            w_block[:, i:].addr_(err, h_block[i, i:], alpha=-1.0)
            err_block[:, i] = err
        w[:, end:].addmm_(err_block, h_inv[start:end, end:], alpha=-1.0)


@torch.no_grad()
def gptq_int4(weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor, group_size: int, *,
              damp: float = 0.01, act_order: bool = True, block_size: int = 128,
              rtn_fallback: bool = True, name: str = "layer") -> Int4Linear:
    """GPTQ-quantize one Linear to int4.

    Args:
        weight: [N, K] float, on the device to compute on.
        bias: [N] or None (kept as is).
        hessian: [K, K] float32, 2 X^T X / n of the layer's calibration inputs.
        group_size: int4 group size; must divide K.
        damp: diagonal dampening as a fraction of the mean diagonal.
        act_order: visit columns by decreasing H_kk (static groups keep the layout). On SmolLM2
            it gave +0.09% perplexity against +0.45% without for int8, -0.01% against +0.22%
            at int4 group 32 and +15.8% against +24.9% at group 64.
        block_size: columns per lazy-update block (rounded up to a multiple of group_size).
        rtn_fallback: keep, for each output row, round-to-nearest where its error under the
            Hessian is smaller (step 5 of the module docstring).
    Returns:
        An Int4Linear on weight's device.
    Raises:
        RuntimeError: the dampened Hessian is not positive definite.
    """
    n_out, n_in = weight.shape
    check_group_size(n_in, group_size, name)
    n_groups = n_in // group_size
    scales = torch.empty(n_out, n_groups, device=weight.device)
    zeros = torch.empty(n_out, n_groups, device=weight.device)
    if act_order:  # grids fixed up front from the original weights (dead inputs' as zero)
        w = weight.detach().float().clone()
        w[:, (torch.diagonal(hessian) == 0).to(w.device)] = 0.0
        scale, zero = int4_group_params(w.reshape(n_out * n_groups, group_size))
        scales.copy_(scale.reshape(n_out, n_groups))
        zeros.copy_(zero.reshape(n_out, n_groups))
    codes = torch.empty(n_out, n_in, device=weight.device)

    def quantize(w_block: torch.Tensor, i: int, column: int) -> torch.Tensor:
        group = column // group_size
        if not act_order and column % group_size == 0:
            # The whole group lies inside this block (block is a multiple of group_size), so its
            # grid sees the error feedback from every column quantized so far.
            scales[:, group], zeros[:, group] = int4_group_params(w_block[:, i:i + group_size])
        q = int4_codes(w_block[:, i], scales[:, group], zeros[:, group])
        codes[:, column] = q
        return (q - zeros[:, group]) * scales[:, group]

    block = -(-max(block_size, group_size) // group_size) * group_size
    _gptq_columns(weight, hessian, quantize, damp=damp, act_order=act_order, block_size=block,
                  name=name)
    module = Int4Linear(pack_int4(codes), scales, zeros, group_size,
                        None if bias is None else bias.detach().clone())
    if not rtn_fallback:
        return module
    return _keep_better_rows(module, weight, hessian,
                             Int4Linear.from_float(weight, group_size=group_size))


@torch.no_grad()
def gptq_int8(weight: torch.Tensor, bias: torch.Tensor | None, hessian: torch.Tensor, *,
              damp: float = 0.01, act_order: bool = True, block_size: int = 128,
              rtn_fallback: bool = True, name: str = "layer") -> Int8Linear:
    """GPTQ-quantize one Linear to int8 (arguments as `gptq_int4`, without groups): each row's
    scale is round-to-nearest's (absmax / 127 of the original row; weights the error feedback
    pushes past it are clamped), and GPTQ chooses the codes."""
    rtn = Int8Linear.from_float(weight)
    scale = rtn.scale
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)

    def quantize(w_block: torch.Tensor, i: int, column: int) -> torch.Tensor:
        codes[:, column] = Int8Linear._round(w_block[:, i] / scale)  # round-to-nearest's rounding
        return codes[:, column].float() * scale

    _gptq_columns(weight, hessian, quantize, damp=damp, act_order=act_order, block_size=block_size,
                  name=name)
    module = Int8Linear(codes, scale, None if bias is None else bias.detach().clone())
    return _keep_better_rows(module, weight, hessian, rtn) if rtn_fallback else module


def row_errors(module: Int4Linear | Int8Linear, weight: torch.Tensor, hessian: torch.Tensor,
               rows_per_step: int = 4096) -> torch.Tensor:
    """e H e^T for each row of e = weight - module's dequantized weight, float32 [N]: the row's
    share of the layer's output error on the calibration inputs (H = 2 X^T X / n). Computed
    `rows_per_step` rows at a time (a 128k-vocabulary head would otherwise need two more float32
    copies of itself)."""
    n_out = weight.shape[0]
    hessian = hessian.to(weight.device, torch.float32)
    out = torch.empty(n_out, dtype=torch.float32, device=weight.device)
    for start in range(0, n_out, rows_per_step):
        rows = slice(start, min(start + rows_per_step, n_out))
        error = weight[rows].to(torch.float32) - module.dequantize(rows)
        out[rows] = ((error @ hessian) * error).sum(dim=1)
    return out


def _keep_better_rows(module: Int4Linear | Int8Linear, weight: torch.Tensor, hessian: torch.Tensor,
                      rtn: Int4Linear | Int8Linear) -> Int4Linear | Int8Linear:
    """`module` with every row whose round-to-nearest error is smaller taken from `rtn` (the same
    scheme, made without a bias), in place: each of rtn's buffers (codes, scales, zero points;
    all indexed by output row first)."""
    keep = row_errors(rtn, weight, hessian) < row_errors(module, weight, hessian)
    for name, rows in rtn.named_buffers():
        mine = getattr(module, name)
        setattr(module, name, torch.where(keep.view(-1, *[1] * (mine.dim() - 1)), rows, mine))
    return module


def _block_linears(block: nn.Module) -> list[str]:
    return [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calibration_tokens: torch.Tensor, group_size: int = 128, *,
                        scheme: str = "int4", include_head: bool = False,
                        device: torch.device | str | None = None, damp: float = 0.01,
                        act_order: bool = True, batch_size: int = 8,
                        progress: Progress | None = None) -> None:
    """GPTQ every per-layer Linear (and the head with `include_head`) of a Transformer, in place.

    Args:
        model: the float model (wherever its weights live; blocks visit `device` one at a time).
        calibration_tokens: int64 [n_samples, seq_len] (see `calibration_windows`).
        group_size: int4 group size (unused for int8).
        scheme: "int4" or "int8", the format the codes are stored in.
        include_head: quantize the output head too, from the final normed hidden states.
        device: where the math runs (default: where the model is).
        damp, act_order: see `gptq_int4`.
        batch_size: calibration samples per forward.
        progress: called with one line per block.
    """
    if scheme not in ("int4", "int8"):
        raise ValueError(f"GPTQ stores int4 or int8 codes, not {scheme!r}")

    def solve(weight, bias, hessian, name):
        options = dict(damp=damp, act_order=act_order, name=name)
        if scheme == "int8":
            return gptq_int8(weight, bias, hessian, **options)
        return gptq_int4(weight, bias, hessian, group_size, **options)

    what = "int8" if scheme == "int8" else f"int4, group size {group_size}"
    home = model.embed.weight.device
    device = torch.device(device) if device is not None else home
    tokens = torch.as_tensor(calibration_tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"calibration tokens must be [n_samples, seq_len], got shape {list(tokens.shape)}")
    n_samples, seq_len = tokens.shape
    if seq_len > model.rope_cos.shape[0]:
        raise ValueError(f"calibration windows of {seq_len} tokens exceed the model's rotary tables "
                         f"({model.rope_cos.shape[0]} positions); lower --calib-seq-len")
    cos = model.rope_cos[:seq_len].to(device)[None, None]  # [1, 1, T, head_dim / 2]
    sin = model.rope_sin[:seq_len].to(device)[None, None]
    input_pos = torch.arange(seq_len, device=device)[None]
    batches = [slice(i, min(i + batch_size, n_samples)) for i in range(0, n_samples, batch_size)]
    # [n_samples, seq_len, dim]: the input of the current block, kept on the device throughout.
    hidden = torch.cat([model.embed(tokens[b].to(home)).to(device) for b in batches])
    n_layers = len(model.layers)
    for index, block in enumerate(model.layers):
        block.to(device)

        def run_block(target=block, layer=index):
            for b in batches:
                try:
                    target(hidden[b], cos, sin, None, layer, input_pos, None)
                except _Captured:
                    pass

        for name in _block_linears(block):
            linear = block.get_submodule(name)
            hessian = input_hessian(linear, run_block, linear.in_features, device)
            full_name = f"layers.{index}.{name}"
            set_module(block, name, solve(linear.weight, linear.bias, hessian, full_name))
            del linear, hessian
        for b in batches:  # the next block sees what the quantized block produces
            hidden[b] = block(hidden[b], cos, sin, None, index, input_pos, None)
        block.to(home)
        if progress is not None:
            progress(f"GPTQ block {index + 1}/{n_layers} ({what})")
    if include_head:
        norm = model.norm.to(device)
        normed = torch.cat([norm(hidden[b]) for b in batches]).reshape(-1, hidden.shape[-1])
        model.norm.to(home)
        x = normed.float()
        hessian = (x.T @ x).mul_(2.0 / x.shape[0])
        del normed, x, hidden
        weight = head_weight(model).to(device)
        bias = model.get_submodule(HEAD).bias
        bias = None if bias is None else bias.to(device)
        head = solve(weight, bias, hessian, HEAD)
        set_module(model, HEAD, head.to(home))
        if progress is not None:
            progress(f"GPTQ {HEAD} ({what})")
