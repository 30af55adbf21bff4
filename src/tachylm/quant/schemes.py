"""Weight-only quantized replacements for `nn.Linear`: one small interface, three schemes.

A scheme is data + `forward` + `shard`: the quantized tensors live in buffers under fixed names
(they become the state-dict names, e.g. `layers.0.attn.qkv_proj.qweight`), `forward` calls the
kernel dispatch in `tachylm.kernels.quant_matmul`, and `shard` splits the module for tensor
parallelism. Nothing outside this package needs to know which scheme a module uses.

Canonical (device-independent) layouts, for a Linear with weight [N, K] (N = out_features):

    int8  qweight int8 [N, K], scale float32 [N]        w = q * scale          (q in -127..127)
    fp8   qweight float8_e4m3fn [N, K], scale float32 [N] w = q * scale         (|q| <= 448)
    int4  qweight uint8 [N, K/2], scale bfloat16 [N, K/G], zero bfloat16 [N, K/G]
          w = (q - zero[g]) * scale[g], q in 0..15, two values per byte along K, the LOW nibble
          holding the even k.

fp8 picks each row's scale by a small search (`search_row_scale`): scale = absmax / t for the e4m3
values t = 448, 416, ..., 240, keeping the one whose round-to-nearest reconstruction of the row has
the smallest squared error. Every candidate maps the row's largest weight exactly onto the grid and
none clips anything, so round-to-nearest's error bound still holds; t = 448 (the plain abs-max
scale) is always a candidate, so no row ends up with a larger error than abs-max would give it.
int8 keeps the abs-max scale absmax / 127 (`Int8Linear` says why).

int4 keeps the zero point as an unrounded float: then the minimum and maximum of every group are
representable (q = 0 and q = 15) and the rounding error is about scale / 2 for every element, where
a zero point rounded to an integer can clip the group's extremes by up to scale / 2 more. Scale and
zero point are bfloat16 (`INT4_PARAM_DTYPE`): at group size 32, float32 would make them a third of
the bytes a decode step reads (4 bits of code against 2 x 32 bits per 32 weights). Rounding them
(relative error <= 2**-8) moves the grid by at most 2**-8 of |min| + (max - min), a small part of
the half step (max - min) / 30 that 4 bits cost anyway; the codes are chosen against the rounded
values. Format version 1 stored them as float32; such checkpoints still load (rounded to bfloat16
on the way in).

The bias (if any) stays in floating point, in the model's dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from tachylm.kernels import quant_matmul as kernels

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_PARAM_DTYPE = torch.bfloat16  # dtype of the int4 scales and zero points
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first NVIDIA GPUs with fp8 tensor cores


class QuantizedLinear(nn.Module):
    """Base of the weight-only quantized Linear modules.

    Subclasses register their quantized tensors as buffers and implement the classmethods
    `from_float` and `empty`, plus `forward`, `dequantize`, `shard` and `spec`. `forward(x,
    norm=..., swiglu=..., residual=...)` takes the fusions of `tachylm.kernels.FusedLinear`
    (the model calls every Linear that way) and passes them to the kernel dispatch.

    Attributes:
        in_features, out_features: the shape of the Linear it replaces (K and N).
        scheme: the scheme's name in `SCHEMES` ("int8", "fp8", "int4").
    """

    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias has shape {list(bias.shape)}, expected [{out_features}]")
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   **options: Any) -> "QuantizedLinear":
        """Quantize a float weight [out_features, in_features] by round-to-nearest."""
        raise NotImplementedError

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, device: torch.device | str = "meta",
              **options: Any) -> "QuantizedLinear":
        """A module with the right tensor shapes and dtypes but no values (for assign-loading)."""
        raise NotImplementedError

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """The weight the module computes with, [out_features, in_features], float32 (only the
        output rows `rows` where given)."""
        raise NotImplementedError

    def shard(self, dim: int, index: int, count: int) -> "QuantizedLinear":
        """Piece `index` of `count` for tensor parallelism.

        dim 0 splits the output rows (with their scales, and the bias); dim 1 splits the input
        columns, so the pieces' outputs sum to the whole output: the bias then stays on piece 0
        only. Returns a new module; this one is left as it is.
        """
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The scheme name and options, JSON-able: `SCHEMES[spec["scheme"]].empty(..., **options)`
        rebuilds the module for loading."""
        return {"scheme": self.scheme}

    def input_link(self) -> int:
        """An id under which the kernel that computes this module's input may also hand it over
        in the form this module's kernel reads (`kernels.InputLink`), or 0 where the scheme has
        no such form. A speed hint only: results do not change."""
        return 0

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)`, `.half()` and friends convert every floating-point tensor. The quantized
        # tensors and their scales are part of the format: they follow device moves but keep their
        # dtype (moved from the original, never converted and back). The bias follows `fn`.
        for name, tensor in self._buffers.items():
            if tensor is None:
                continue
            moved = fn(tensor)
            if name != "bias" and moved.dtype != tensor.dtype:
                moved = tensor.to(moved.device)
            self._buffers[name] = moved
        return self

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "scheme")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}" + (f", {options}" if options else ""))

    def _shard_bias(self, dim: int, index: int, count: int) -> torch.Tensor | None:
        if self.bias is None:
            return None
        if dim == 0:
            return _piece(self.bias, 0, index, count)
        return self.bias.clone() if index == 0 else None


def _check_shard(module: QuantizedLinear, dim: int, index: int, count: int) -> None:
    if dim not in (0, 1):
        raise ValueError(f"shard dim must be 0 (output rows) or 1 (input columns), got {dim}")
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    size = module.out_features if dim == 0 else module.in_features
    if size % count:
        what = "out_features" if dim == 0 else "in_features"
        raise ValueError(f"cannot split {what}={size} into {count} equal pieces")


def _piece(tensor: torch.Tensor, dim: int, index: int, count: int) -> torch.Tensor:
    # A copy, not a view: a view would keep the whole unsharded tensor alive.
    size = tensor.shape[dim] // count
    return tensor.narrow(dim, index * size, size).clone(memory_format=torch.contiguous_format)


def _per_row_scale(weight: torch.Tensor, qmax: float) -> torch.Tensor:
    """Symmetric per-output-channel scale absmax / qmax, float32 [N]; all-zero rows get 1."""
    absmax = weight.abs().amax(dim=1)
    return torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))


# Elements per block of rows in the scale search. On the CPU a block and its scratch buffers stay in
# cache while every candidate scale is tried on it (several times faster than whole-matrix passes);
# on a GPU, bigger blocks mean fewer kernel launches.
SEARCH_BLOCK_ELEMENTS_CPU = 1 << 20
SEARCH_BLOCK_ELEMENTS_GPU = 1 << 24


def search_row_scale(weight: torch.Tensor, scale: torch.Tensor, ratios: tuple[float, ...],
                     round_trip: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per row, the scale among `scale` and `scale * r` (r in `ratios`) with the smallest squared
    reconstruction error sum_k (round_trip(w / s) * s - w)^2.

    The starting `scale` only loses to a strictly smaller error, so the result is never worse than
    it, row by row. Vectorised over rows; the rows go through in blocks that stay in cache.

    Args:
        weight: float32 [N, K].
        scale: float32 [N], positive (the abs-max scale).
        ratios: the other candidates, as multiples of `scale`.
        round_trip: (scaled, scratch) -> scaled rounded onto the storage grid and back to float32,
            in place (scaled is a float32 block, scratch an int32 block of the same shape).
    Returns:
        float32 [N], a new tensor.
    Raises:
        ValueError: a weight that is not 2-D float32, a scale of the wrong shape, a ratio that is not
            positive and finite.
    """
    if weight.dim() != 2 or weight.dtype != torch.float32:
        raise ValueError(f"scale search needs a 2-D float32 weight, got {weight.dtype} "
                         f"{list(weight.shape)}")
    if tuple(scale.shape) != (weight.shape[0],):
        raise ValueError(f"scale has shape {list(scale.shape)}, expected [{weight.shape[0]}]")
    if not all(0 < r < float("inf") for r in ratios):
        raise ValueError(f"scale ratios must be positive and finite, got {ratios}")
    best = scale.clone()
    n_rows, n_cols = weight.shape
    if not ratios or n_rows == 0 or n_cols == 0:
        return best
    block = SEARCH_BLOCK_ELEMENTS_CPU if weight.device.type == "cpu" else SEARCH_BLOCK_ELEMENTS_GPU
    rows = max(1, min(n_rows, block // n_cols))
    # Scratch reused by every block and candidate: fresh multi-megabyte tensors each time would cost
    # page faults that take longer than the arithmetic.
    scaled = torch.empty(rows, n_cols, dtype=torch.float32, device=weight.device)
    scratch = torch.empty(rows, n_cols, dtype=torch.int32, device=weight.device)

    def error(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        y = torch.div(w, s[:, None], out=scaled[:w.shape[0]])  # the same w / s as the final rounding
        return round_trip(y, scratch[:w.shape[0]]).mul_(s[:, None]).sub_(w).pow_(2).sum(dim=1)

    for start in range(0, n_rows, rows):
        w, base, chosen = weight[start:start + rows], scale[start:start + rows], best[start:start + rows]
        best_error = error(w, base)
        for ratio in ratios:
            candidate = base * ratio
            e = error(w, candidate)
            better = e < best_error
            best_error = torch.where(better, e, best_error)
            chosen.copy_(torch.where(better, candidate, chosen))  # a view: writes into `best`
    return best


class _RowwiseLinear(QuantizedLinear):
    """Shared body of the per-output-channel schemes: `qweight` [N, K] stored as `storage_dtype`,
    one float32 `scale` [N] (w = qweight * scale), symmetric.

    Each row's scale is absmax / t for the t in (`qmax`,) + `absmax_targets` that gives the smallest
    squared reconstruction error (`search_row_scale`); the targets are grid points below `qmax`, so
    the row's largest weight is always stored exactly (up to the float32 rounding of the scale).
    Without targets the scale is plain absmax / `qmax`.
    """

    storage_dtype: torch.dtype
    qmax: float
    absmax_targets: tuple[float, ...] = ()

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        out_features, in_features = qweight.shape
        super().__init__(in_features, out_features, bias)
        assert qweight.dtype == self.storage_dtype and scale.shape == (out_features,)
        self.register_buffer("qweight", qweight)  # [N, K]
        self.register_buffer("scale", scale)  # [N] float32

    @staticmethod
    def _round(scaled: torch.Tensor) -> torch.Tensor:
        """float32 weights already divided by their row scale -> stored values."""
        raise NotImplementedError

    @staticmethod
    def _round_trip(scaled: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """`_round(scaled)` back as float32, computed in place in `scaled` (`scratch`: an int32
        buffer of the same shape it may use). The scale search calls it once per candidate."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, weight, bias=None):
        if weight.dim() != 2:
            raise ValueError(f"{cls.scheme} quantization needs a 2-D weight [out_features, in_features], "
                             f"got shape {list(weight.shape)}")
        w = weight.detach().float()
        ratios = tuple(cls.qmax / target for target in cls.absmax_targets)  # absmax / qmax * ratio
        scale = search_row_scale(w, _per_row_scale(w, cls.qmax), ratios, cls._round_trip)
        return cls(cls._round(w / scale[:, None]), scale, None if bias is None else bias.detach().clone())

    @classmethod
    def empty(cls, in_features, out_features, bias, device="meta"):
        return cls(torch.empty(out_features, in_features, dtype=cls.storage_dtype, device=device),
                   torch.empty(out_features, dtype=torch.float32, device=device),
                   torch.empty(out_features, device=device) if bias else None)

    def dequantize(self, rows=slice(None)):
        return self.qweight[rows].float() * self.scale[rows, None]

    def shard(self, dim, index, count):
        _check_shard(self, dim, index, count)
        # Rows carry their scales with them; a column split keeps every row's scale.
        scale = _piece(self.scale, 0, index, count) if dim == 0 else self.scale.clone()
        return type(self)(_piece(self.qweight, dim, index, count), scale,
                          self._shard_bias(dim, index, count))


class Int8Linear(_RowwiseLinear):
    """int8 weights, symmetric, one float32 scale per output channel (scale = absmax / 127)."""

    scheme = "int8"
    storage_dtype = torch.int8
    qmax = 127.0
    # No scale search for int8: it did not pay. Letting each row's largest weight be code 127 .. 117,
    # whichever gives the least squared error, cut that error on SmolLM2 by 4% (clipping, scales
    # down to 0.7 absmax / 127: under 3%) and the output's KL divergence by about 6%, but perplexity
    # went up, on data/eval.txt and data/calib.txt alike. At int8's resolution, which of many
    # near-equal roundings the rows get decides the perplexity change (scaling every abs-max scale
    # by 0.998 .. 1.002 moves it between +0.36% and +1.05%), not a few percent of total error.
    absmax_targets = ()

    @staticmethod
    def _round(scaled: torch.Tensor) -> torch.Tensor:
        return torch.round(scaled).clamp_(-127, 127).to(torch.int8)

    @staticmethod
    def _round_trip(scaled, scratch):
        return scaled.round_().clamp_(-127, 127)

    def forward(self, x: torch.Tensor, **fusion: Any) -> torch.Tensor:
        return kernels.int8_linear(x, self.qweight, self.scale, self.bias, **fusion)


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device `index` (cached)."""
    return torch.cuda.get_device_capability(index)


def check_fp8_device(device: torch.device) -> None:
    """Refuse fp8 weights on a CUDA GPU without fp8 support (compute capability < 8.9).

    CPUs compute fp8 layers with the dequantizing reference, so they pass.

    Raises:
        RuntimeError: with the fix (use int8) in the message.
    """
    if device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = cuda_capability(index)
    if capability < FP8_MIN_CAPABILITY:
        raise RuntimeError(
            f"fp8 weights need an NVIDIA GPU with compute capability >= 8.9 (Ada or Hopper); "
            f"cuda:{index} has {capability[0]}.{capability[1]}. Use --quant int8 (same memory, "
            "supported on every GPU) instead")


def round_to_e4m3_(scaled: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Round float32 `scaled` in place to the nearest float8 e4m3 value (ties to even), kept in
    float32: the same values as `scaled.clamp(-448, 448).to(torch.float8_e4m3fn).float()`, computed
    with float32 arithmetic because the cast to fp8 and back is several times slower on the CPU.

    The e4m3 step of x is 2^(e - 3) for 2^e <= |x| < 2^(e + 1), and 2^-9 below 2^-6 (subnormals).
    Adding and subtracting m = 1.5 * 2^(e + 20) rounds x to a multiple of exactly that step, because
    x + m lies in [2^(e + 20), 2^(e + 21)) where float32's own step is 2^(e - 3); float32 rounds to
    nearest even. 2^e comes from masking the exponent bits of x, and is clamped at 2^-6 for the
    subnormal range (and for zero).

    Args:
        scaled: float32.
        scratch: int32, same shape (overwritten).
    Returns:
        `scaled`.
    Raises:
        ValueError: other dtypes, or shapes that differ.
    """
    if scaled.dtype != torch.float32 or scratch.dtype != torch.int32 or scratch.shape != scaled.shape:
        raise ValueError(f"round_to_e4m3_ needs float32 values and an int32 scratch of the same "
                         f"shape, got {scaled.dtype} {list(scaled.shape)} and {scratch.dtype} "
                         f"{list(scratch.shape)}")
    scaled.clamp_(-FP8_MAX, FP8_MAX)
    magic = torch.bitwise_and(scaled.view(torch.int32), 0x7F800000, out=scratch).view(torch.float32)
    magic.clamp_(min=2.0 ** -6).mul_(1.5 * 2.0 ** 20)
    return scaled.add_(magic).sub_(magic)


class Fp8Linear(_RowwiseLinear):
    """float8 e4m3 weights with one float32 scale per output channel (absmax / 448 .. absmax / 240,
    searched per row)."""

    scheme = "fp8"
    storage_dtype = torch.float8_e4m3fn
    qmax = FP8_MAX
    # The row's largest weight may be any e4m3 value from 448 down to 240. e4m3 rounding is
    # relative, so a row's error depends on where its weights fall within their binades, and that
    # repeats every factor of 2: 448 and these seven (the next one, 224, is 448 / 2) are every exact
    # placement of the largest weight within one octave. Going below 224 would only push more of
    # the row's small weights into the subnormals. On SmolLM2 the best of the eight has about 12%
    # less squared error than absmax / 448; sixteen scales spread evenly over the octave (largest
    # weight not exact) gave 13% for twice the time, and the same output divergence (KL).
    absmax_targets = (416.0, 384.0, 352.0, 320.0, 288.0, 256.0, 240.0)

    @staticmethod
    def _round(scaled: torch.Tensor) -> torch.Tensor:
        return scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    @staticmethod
    def _round_trip(scaled, scratch):
        return round_to_e4m3_(scaled, scratch)

    @classmethod
    def from_float(cls, weight, bias=None):
        check_fp8_device(weight.device)
        return super().from_float(weight, bias)

    def _apply(self, fn, recurse=True):
        # Checked where the weights land (.to / .cuda), not in forward: the hot path stays free of
        # Python checks that would break torch.compile graphs.
        module = super()._apply(fn, recurse)
        check_fp8_device(self.qweight.device)
        return module

    def forward(self, x: torch.Tensor, **fusion: Any) -> torch.Tensor:
        return kernels.fp8_linear(x, self.qweight, self.scale, self.bias, **fusion)


def check_group_size(in_features: int, group_size: int, name: str | None = None) -> None:
    """ValueError unless `group_size` is supported and divides the layer width (`name`, if given,
    starts the message)."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                         f"got {group_size}")
    if in_features % group_size:
        fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        hint = (f"use --group-size {' or '.join(map(str, fits))}" if fits
                else "int4 cannot quantize this layer; use int8 or fp8")
        where = f"{name}: " if name else ""
        raise ValueError(f"{where}in_features {in_features} is not a multiple of the int4 group size "
                         f"{group_size}; {hint}")


def int4_group_params(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit grid of each row of `weight` [N, G] (one group per row).

    Returns:
        scale, zero: float32 [N] holding `INT4_PARAM_DTYPE` values (what the checkpoint stores, so
        the codes are chosen against exactly the values the kernels will use). scale = (max - min)
        / 15, zero = -min / scale (not rounded to an integer); constant groups get scale 1 (any
        positive scale represents them exactly).
    """
    weight = weight.float()
    low, high = weight.amin(dim=1), weight.amax(dim=1)
    scale = (high - low) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _round_param(scale)
    return scale, _round_param(-low / scale)


def _round_param(t: torch.Tensor) -> torch.Tensor:
    return t.to(INT4_PARAM_DTYPE).to(torch.float32)


def int4_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(w / scale + zero), 0, 15) with scale and zero broadcast against weight."""
    return torch.round(weight / scale + zero).clamp_(0, 15)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] integer codes 0..15 -> uint8 [N, K/2], low nibble = even k."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


unpack_int4 = kernels.unpack_int4  # uint8 [N, K/2] -> codes [N, K], the inverse of `pack_int4`


def _repack_scale_zero(module: "Int4Linear", incompatible_keys) -> None:
    """After a state dict is loaded (copied in or assigned): the packed pair from the new
    scale and zero point."""
    module.scale_zero = kernels.pack_scale_zero(module.scale, module.zero)


class Int4Linear(QuantizedLinear):
    """4-bit weights, asymmetric, one bfloat16 scale and zero point per group of `group_size`
    consecutive input columns of each output row (any float scale and zero given are stored as
    bfloat16)."""

    scheme = "int4"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None):
        out_features, half = qweight.shape
        super().__init__(2 * half, out_features, bias)
        self.group_size = group_size
        n_groups = self.in_features // group_size
        assert qweight.dtype == torch.uint8 and scale.shape == zero.shape == (out_features, n_groups)
        self.register_buffer("qweight", qweight)  # [N, K/2] uint8
        self.register_buffer("scale", scale.to(INT4_PARAM_DTYPE))  # [N, K/G]
        self.register_buffer("zero", zero.to(INT4_PARAM_DTYPE))  # [N, K/G]
        # Derived, not saved: scale and zero point packed for the one-row GEMV
        # (`kernels.pack_scale_zero`), rebuilt whenever a state dict is loaded.
        self.register_buffer("scale_zero", kernels.pack_scale_zero(self.scale, self.zero),
                             persistent=False)
        self.register_load_state_dict_post_hook(_repack_scale_zero)

    @classmethod
    def from_float(cls, weight, bias=None, group_size=128):
        out_features, in_features = weight.shape
        check_group_size(in_features, group_size)
        groups = weight.detach().float().reshape(-1, group_size)  # [N * K/G, G]
        scale, zero = int4_group_params(groups)
        codes = int4_codes(groups, scale[:, None], zero[:, None]).reshape(out_features, in_features)
        shape = (out_features, in_features // group_size)
        return cls(pack_int4(codes), scale.reshape(shape), zero.reshape(shape), group_size,
                   None if bias is None else bias.detach().clone())

    @classmethod
    def empty(cls, in_features, out_features, bias, device="meta", group_size=128):
        check_group_size(in_features, group_size)
        groups = in_features // group_size
        return cls(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
                   torch.empty(out_features, groups, dtype=INT4_PARAM_DTYPE, device=device),
                   torch.empty(out_features, groups, dtype=INT4_PARAM_DTYPE, device=device), group_size,
                   torch.empty(out_features, device=device) if bias else None)

    fed_by = 0  # the `kernels.link_int4` id of `input_link` (0: none)
    feeds = 0  # the link id of the int4 Linear that takes this one's output (0: none)

    def forward(self, x: torch.Tensor, **fusion: Any) -> torch.Tensor:
        return kernels.int4_linear(x, self.qweight, self.scale, self.zero, self.group_size, self.bias,
                                   scale_zero=self.scale_zero, fed=self.fed_by, feed=self.feeds,
                                   **fusion)

    def input_link(self):
        # One row of x prepared by its producer: the integer GEMV then launches no kernel to
        # prepare it.
        if not self.fed_by and self.group_size in kernels.DP4A_GROUPS:
            self.fed_by = kernels.link_int4(self.in_features, self.group_size)
        return self.fed_by

    def dequantize(self, rows=slice(None)):
        return kernels.dequantize_int4(self.qweight[rows], self.scale[rows], self.zero[rows],
                                       self.group_size)

    def shard(self, dim, index, count):
        _check_shard(self, dim, index, count)
        if dim == 1 and (self.in_features // count) % self.group_size:
            raise ValueError(f"cannot split in_features={self.in_features} into {count} pieces at int4 "
                             f"group boundaries (group size {self.group_size}); each piece needs a "
                             "multiple of the group size")
        return Int4Linear(_piece(self.qweight, dim, index, count), _piece(self.scale, dim, index, count),
                          _piece(self.zero, dim, index, count), self.group_size,
                          self._shard_bias(dim, index, count))

    def spec(self):
        return {"scheme": self.scheme, "group_size": self.group_size}


SCHEMES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "fp8": Fp8Linear, "int4": Int4Linear}
