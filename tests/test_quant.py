"""Weight-only quantization: schemes, GPTQ, the model transform, quantized checkpoints, perplexity."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gguf_fixtures import tiny_config


def _install_reference_kernels() -> None:
    """Stand-in for tachylm.kernels.quant_matmul (written separately) while it does not exist yet:
    the canonical-layout reference math, nothing more."""

    def int8_linear(x, qweight, scale, bias=None):
        return F.linear(x, (qweight.float() * scale[:, None]).to(x.dtype), bias)

    def int4_linear(x, qweight, scale, zero, group_size, bias=None):
        codes = torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1, group_size)
        weight = ((codes.float() - zero[..., None]) * scale[..., None]).reshape(qweight.shape[0], -1)
        return F.linear(x, weight.to(x.dtype), bias)

    package = types.ModuleType("tachylm.kernels")
    package.__path__ = []
    module = types.ModuleType("tachylm.kernels.quant_matmul")
    module.int8_linear = module.int8_linear_ref = int8_linear
    module.fp8_linear = module.fp8_linear_ref = int8_linear  # same math with an fp8 qweight
    module.int4_linear = module.int4_linear_ref = int4_linear
    package.quant_matmul = module
    sys.modules.update({"tachylm.kernels": package, "tachylm.kernels.quant_matmul": module})


if importlib.util.find_spec("tachylm.kernels") is None or (
        importlib.util.find_spec("tachylm.kernels.quant_matmul") is None):
    _install_reference_kernels()

from tachylm.build import build_random_model  # noqa: E402
from tachylm.checkpoints import CheckpointError  # noqa: E402
from tachylm.evaluate import perplexity, perplexity_change, sliding_windows, token_nlls  # noqa: E402
from tachylm.model import RMSNorm, Transformer  # noqa: E402
from tachylm.kernels.linear import FusedLinear  # noqa: E402
from tachylm.quant import (SCHEMES, Fp8Linear, Int4Linear, Int8Linear, QuantizedLinear,  # noqa: E402
                           apply_quant_option, folded_norms, linear_names,
                           prepare_for_quantized_load, quantize_model, quantized_modules)
from tachylm.quant import schemes  # noqa: E402
from tachylm.quant import gptq  # noqa: E402
from tachylm.quant.gptq import calibration_windows, gptq_int4, gptq_int8, row_errors  # noqa: E402
from tachylm.build import build_quantized_model  # noqa: E402
from tachylm.quant.io import is_quantized_folder, save_quantized  # noqa: E402

EVAL_TEXT = os.path.join(os.path.dirname(__file__), "..", "data", "eval.txt")
CALIB_TEXT = os.path.join(os.path.dirname(__file__), "..", "data", "calib.txt")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _weight(n_out=48, n_in=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier stretches one row's (and one group's) scale
    w[5] = 0.0  # an all-zero row / groups
    return w


def _tiny_model(tie=True, family="llama", seed=0):
    config = tiny_config(family, tie_embeddings=tie)
    return build_random_model(config, dtype=torch.float32, seed=seed, std=0.1)


# -- schemes ------------------------------------------------------------------------------------


def test_int8_round_trip_within_half_a_step():
    w = _weight()
    module = Int8Linear.from_float(w)
    assert module.qweight.dtype == torch.int8 and module.scale.dtype == torch.float32
    assert torch.allclose(module.scale[3], torch.tensor(0.9 / 127))
    error = (module.dequantize() - w).abs()
    assert (error <= module.scale[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(module.dequantize()[5], torch.zeros(128))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_a_step_per_group(group_size):
    w = _weight()
    module = Int4Linear.from_float(w, group_size=group_size)
    assert module.qweight.shape == (48, 64) and module.qweight.dtype == torch.uint8
    assert module.scale.shape == module.zero.shape == (48, 128 // group_size)
    assert module.scale.dtype == module.zero.dtype == torch.bfloat16
    groups = w.reshape(48, -1, group_size)
    # Rounding scale and zero point to bfloat16 (relative error <= 2**-8) moves the grid's ends by
    # at most 2**-8 of |min| + (max - min), so 3 * 2**-8 of the group's largest magnitude.
    slack = 3 * 2.0**-8 * groups.abs().amax(-1) + 1e-7
    error = (module.dequantize() - w).abs().reshape(48, -1, group_size)
    assert (error <= module.scale.float()[..., None] / 2 + slack[..., None]).all()
    # Each group's extremes sit on the grid (zero point not rounded to an integer), up to that slack.
    deq = module.dequantize().reshape(48, -1, group_size)
    assert ((deq.amax(-1) - groups.amax(-1)).abs() <= slack).all()
    assert ((deq.amin(-1) - groups.amin(-1)).abs() <= slack).all()
    # The slack is needed and small: no weight of this layer moved by more than half a step plus
    # a quarter of one, where an integer zero point would move extremes by up to a whole half step.
    assert (error <= module.scale.float()[..., None] * 0.75).all()


def test_int4_packing_low_nibble_is_even_column():
    codes = torch.tensor([[1, 2, 15, 0]])
    packed = schemes.pack_int4(codes)
    assert packed.tolist() == [[1 | 2 << 4, 15]]
    assert torch.equal(schemes.unpack_int4(packed), codes.to(torch.uint8))


def test_fp8_round_trip_within_e4m3_precision():
    w = _weight()
    module = Fp8Linear.from_float(w)
    assert module.qweight.dtype == torch.float8_e4m3fn
    error = (module.dequantize() - w).abs()
    # 3 mantissa bits: half a unit in the last place is 2^-4 relative; below the smallest normal
    # (2^-6 in scaled units) the spacing is 2^-9, so absolute 2^-10 * scale.
    bound = w.abs() * 2.0 ** -4 + module.scale[:, None] * 2.0 ** -10
    assert (error <= bound * (1 + 1e-5)).all()
    assert torch.allclose(module.dequantize()[3, 7], torch.tensor(0.9))  # absmax is exact


def _blockwise_4bit_weight(n_out=64, n_in=256, seed=0):
    """Weights that are themselves 4-bit, like a Q4_1 GGUF: blocks of 32 with their own step and
    offset, w = offset + q * step, q in 0..15. Abs-max rounding fits such rows worst."""
    g = torch.Generator().manual_seed(seed)
    blocks = n_out * n_in // 32
    step = torch.rand(blocks, 1, generator=g) * 0.008 + 0.002
    offset = -7.5 * step + (torch.rand(blocks, 1, generator=g) - 0.5) * 0.01
    codes = torch.randint(0, 16, (blocks, 32), generator=g).float()
    return (offset + codes * step).reshape(n_out, n_in)


def _row_errors(dequantized, w):
    return (dequantized - w).pow(2).sum(dim=1)


def test_fp8_searched_scale_never_worse_than_absmax():
    w = torch.cat([_blockwise_4bit_weight(), _weight(n_out=48, n_in=256, seed=1)])
    absmax_scale = schemes._per_row_scale(w, Fp8Linear.qmax)
    plain = _row_errors(Fp8Linear._round(w / absmax_scale[:, None]).float() * absmax_scale[:, None], w)
    module = Fp8Linear.from_float(w)
    searched = _row_errors(module.dequantize(), w)
    assert (searched <= plain * (1 + 1e-6)).all(), (searched - plain).max()
    # ... and the search does pick other scales where they are better: on 4-bit weights the total
    # error falls by about a fifth.
    ratio = (searched.sum() / plain.sum()).item()
    assert ratio < 0.9, ratio
    assert (module.scale != absmax_scale).any()
    # Every candidate puts the row's largest weight exactly on the grid, clipping nothing.
    absmax = w.abs().amax(dim=1)
    torch.testing.assert_close(module.dequantize().abs().amax(dim=1), absmax, rtol=1e-6, atol=0)
    assert (module.scale >= absmax_scale * (1 - 1e-6)).all()
    assert (module.scale <= absmax / min(Fp8Linear.absmax_targets) * (1 + 1e-6) + (absmax == 0)).all()
    assert torch.equal(module.dequantize()[64 + 5], torch.zeros(256))  # _weight's all-zero row


def test_int8_keeps_the_absmax_scale():
    w = _blockwise_4bit_weight()
    assert torch.equal(Int8Linear.from_float(w).scale, schemes._per_row_scale(w, 127.0))


def test_search_row_scale_never_worse_and_improves():
    # The search on its own, with int8 rounding and candidates absmax / 126 .. absmax / 117.
    w = torch.cat([_blockwise_4bit_weight(), _weight(n_out=48, n_in=256, seed=1)])
    base = schemes._per_row_scale(w, 127.0)
    ratios = tuple(127.0 / n for n in range(126, 116, -1))
    scale = schemes.search_row_scale(w, base, ratios, Int8Linear._round_trip)
    assert scale.shape == base.shape and scale is not base

    def errors(s):
        return _row_errors(Int8Linear._round(w / s[:, None]).float() * s[:, None], w)

    plain, searched = errors(base), errors(scale)
    assert (searched <= plain * (1 + 1e-6)).all(), (searched - plain).max()
    ratio = (searched.sum() / plain.sum()).item()
    assert ratio < 0.98, ratio
    # Each row's choice is the best of the candidates, not merely no worse than the first.
    candidates = torch.stack([errors(base * r) for r in (1.0,) + ratios])
    torch.testing.assert_close(searched, candidates.amin(dim=0), rtol=1e-6, atol=0)
    assert torch.equal(schemes.search_row_scale(w, base, (), Int8Linear._round_trip), base)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_scale_search_finds_the_grid_a_row_lies_on(scheme):
    # Rows whose values are exact multiples of absmax / t for one of the targets t: that scale
    # reconstructs them with zero error, so the search must land on it.
    g = torch.Generator().manual_seed(0)
    cls = Int8Linear if scheme == "int8" else Fp8Linear
    targets = (127.0,) + tuple(float(n) for n in range(126, 116, -1)) if scheme == "int8" else (
        (448.0,) + Fp8Linear.absmax_targets)
    bound = torch.tensor(targets)[:, None]
    if scheme == "int8":
        codes = torch.randint(-126, 127, (len(targets), 96), generator=g).float()
    else:
        codes = torch.randn(len(targets), 96, generator=g).mul(40).to(torch.float8_e4m3fn).float()
    codes = torch.minimum(codes.clamp(min=-bound), bound)
    codes[:, 0] = torch.tensor(targets)  # the largest weight of row i sits on target i
    w = codes * (torch.rand(len(targets), generator=g) * 0.01 + 0.001)[:, None]
    base = schemes._per_row_scale(w, cls.qmax)
    scale = schemes.search_row_scale(w, base, tuple(cls.qmax / t for t in targets[1:]), cls._round_trip)
    expected = w.abs().amax(dim=1) / torch.tensor(targets)
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=0)
    if scheme == "fp8":  # the module gets the same scales
        torch.testing.assert_close(Fp8Linear.from_float(w).scale, expected, rtol=1e-6, atol=0)
    dequantized = cls._round(w / scale[:, None]).float() * scale[:, None]
    assert _row_errors(dequantized, w).max() <= 1e-12


def test_round_to_e4m3_matches_the_fp8_cast():
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.randint(-14, 10, (200_000,), generator=g).float())
    values = torch.cat([
        torch.randn(200_000, generator=g) * magnitudes,
        torch.linspace(-470, 470, 20_001),  # beyond +-448 saturates
        torch.linspace(-2.0 ** -5, 2.0 ** -5, 20_001),  # subnormals and the smallest normals
        torch.tensor([0.0, -0.0, 448.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -6 - 2.0 ** -10,
                      1.0625, 1.1875, 17.0, 18.0, 232.0, 248.0, 1e-30])])  # ties go to even
    expected = values.clamp(-schemes.FP8_MAX, schemes.FP8_MAX).to(torch.float8_e4m3fn).float()
    got = schemes.round_to_e4m3_(values.clone(), torch.empty(values.shape, dtype=torch.int32))
    assert torch.equal(got, expected), (got != expected).sum()
    with pytest.raises(ValueError, match="int32 scratch"):
        schemes.round_to_e4m3_(values.double(), torch.empty(values.shape, dtype=torch.int32))


def test_scale_search_rejects_bad_input():
    with pytest.raises(ValueError, match=r"int8 quantization needs a 2-D weight .* \[4\]"):
        Int8Linear.from_float(torch.randn(4))
    w = torch.randn(4, 8)
    round_trip = Int8Linear._round_trip
    with pytest.raises(ValueError, match="positive and finite"):
        schemes.search_row_scale(w, torch.ones(4), (1.1, 0.0), round_trip)
    with pytest.raises(ValueError, match=r"scale has shape \[3\], expected \[4\]"):
        schemes.search_row_scale(w, torch.ones(3), (1.1,), round_trip)
    with pytest.raises(ValueError, match="2-D float32"):
        schemes.search_row_scale(w.half(), torch.ones(4), (1.1,), round_trip)


@pytest.mark.parametrize("scheme, options", [("int8", {}), ("fp8", {}), ("int4", {"group_size": 32})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_dequantized_linear(scheme, options, dtype):
    w, bias = _weight(), torch.randn(48) * 0.1
    module = SCHEMES[scheme].from_float(w, bias.to(dtype), **options)
    x = torch.randn(2, 3, 128).to(dtype)
    expected = F.linear(x.float(), module.dequantize(), bias.to(dtype).float())
    out = module(x)
    assert out.shape == (2, 3, 48) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_int4_width_not_divisible_by_group_is_a_clear_error():
    with pytest.raises(ValueError, match=r"in_features 96 is not a multiple of the int4 group size 64.*32"):
        Int4Linear.from_float(torch.randn(8, 96), group_size=64)
    with pytest.raises(ValueError, match="group size must be one of"):
        Int4Linear.from_float(torch.randn(8, 96), group_size=48)
    model = _tiny_model()  # dim 64
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.qkv_proj: in_features 64 .* group size 128"):
        quantize_model(model, "int4", group_size=128)
    assert not quantized_modules(model)  # checked before anything was swapped


@pytest.mark.parametrize("scheme, options", [("int8", {}), ("fp8", {}), ("int4", {"group_size": 32})])
def test_shard_rows_and_columns(scheme, options):
    w, bias = _weight(n_out=48, n_in=128), torch.randn(48)
    module = SCHEMES[scheme].from_float(w, bias, **options)
    x = torch.randn(5, 128)
    full = module(x)
    rows = [module.shard(0, i, 4) for i in range(4)]
    assert all(r.out_features == 12 and r.in_features == 128 for r in rows)
    torch.testing.assert_close(torch.cat([r(x) for r in rows], dim=-1), full)
    columns = [module.shard(1, i, 2) for i in range(2)]
    assert columns[0].bias is not None and columns[1].bias is None  # added once, by piece 0
    pieces = x.split(64, dim=-1)
    torch.testing.assert_close(sum(c(p) for c, p in zip(columns, pieces)), full, atol=1e-5, rtol=1e-5)
    assert columns[0].qweight.is_contiguous()
    with pytest.raises(ValueError, match="equal pieces"):
        module.shard(0, 0, 5)


def test_int4_column_shard_only_at_group_boundaries():
    module = Int4Linear.from_float(_weight(n_in=128), group_size=64)
    assert module.shard(1, 1, 2).scale.shape == (48, 1)
    with pytest.raises(ValueError, match="group boundaries"):
        module.shard(1, 0, 4)  # 32 columns per piece, groups of 64


def test_shard_works_on_meta_modules():
    module = Int4Linear.empty(128, 48, bias=True, group_size=32)
    piece = module.shard(0, 1, 2)
    assert piece.qweight.is_meta and piece.qweight.shape == (24, 64) and piece.bias.shape == (24,)


def test_dtype_casts_leave_quantized_tensors_alone():
    model = _tiny_model(family="qwen2")  # q/k/v bias
    quantize_model(model, "fp8", include_head=True)
    model.to(torch.bfloat16)
    qkv = model.layers[0].attn.qkv_proj
    assert qkv.qweight.dtype == torch.float8_e4m3fn and qkv.scale.dtype == torch.float32
    assert qkv.bias.dtype == torch.bfloat16 and model.embed.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 100, (1, 5))).isfinite().all()


def test_fp8_on_a_gpu_without_fp8_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(schemes, "cuda_capability", lambda index: (8, 0))
    with pytest.raises(RuntimeError, match=r"compute capability >= 8\.9.*8\.0.*int8"):
        schemes.check_fp8_device(torch.device("cuda", 0))
    monkeypatch.setattr(schemes, "cuda_capability", lambda index: (9, 0))
    schemes.check_fp8_device(torch.device("cuda", 0))
    schemes.check_fp8_device(torch.device("cpu"))  # the CPU computes through the reference

    def refuse(device):
        raise RuntimeError(f"no fp8 on {device}")

    module = Fp8Linear.from_float(_weight())
    monkeypatch.setattr(schemes, "check_fp8_device", refuse)
    with pytest.raises(RuntimeError, match="no fp8 on cpu"):  # moving a module checks where it lands
        module.to("cpu")


# -- GPTQ ---------------------------------------------------------------------------------------


def _correlated_layer(seed: int, n_rows: int, n_in: int = 128, n_out: int = 64):
    """(generator, inputs x [n_rows, n_in], weight [n_out, n_in], H = 2 x^T x / n_rows), the
    inputs with strongly correlated features (a decaying spectrum), as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=g) * torch.logspace(0, -2, n_in)[:, None]
    x = torch.randn(n_rows, n_in, generator=g) @ mixing
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    return g, x, w, 2 * x.T @ x / n_rows


def _output_error(x, w):
    return lambda module: torch.linalg.norm(x @ w.T - x @ module.dequantize().T).item()


def test_gptq_beats_rtn_on_correlated_inputs():
    _, x, w, hessian = _correlated_layer(0, 4096)
    error = _output_error(x, w)
    for group_size in (32, 128):
        rtn = error(Int4Linear.from_float(w, group_size=group_size))
        gptq = error(gptq_int4(w, None, hessian, group_size, act_order=False))
        ordered = error(gptq_int4(w, None, hessian, group_size))  # act_order is the default
        assert gptq < 0.8 * rtn and ordered < 0.8 * rtn, (group_size, rtn, gptq, ordered)


def test_gptq_keeps_each_rows_better_of_gptq_and_rtn():
    n_in, n_out, group_size = 128, 64, 32
    g, x, w, hessian = _correlated_layer(1, 2048, n_in, n_out)
    # Half the rows already on a 4-bit grid with float32 scales (as a model shipped in 4 bits;
    # RTN's bfloat16 scale misses it by a rounding), half not.
    n_grid = (n_out // 2, n_in // group_size)
    codes = torch.randint(0, 16, (n_out // 2, n_in), generator=g).float()
    scale = torch.rand(n_grid, generator=g) * 0.01 + 0.002
    zero = torch.rand(n_grid, generator=g) * 15
    w[::2] = ((codes.reshape(n_out // 2, -1, group_size) - zero[..., None]) * scale[..., None]
              ).reshape(n_out // 2, n_in)
    rtn_module = Int4Linear.from_float(w, group_size=group_size)
    rtn = row_errors(rtn_module, w, hessian)
    # In column order: RTN takes 19 of 64 rows (with act-order, 1).
    plain = row_errors(gptq_int4(w, None, hessian, group_size, rtn_fallback=False, act_order=False),
                       w, hessian)
    kept = row_errors(gptq_int4(w, None, hessian, group_size, act_order=False), w, hessian)
    assert torch.equal(kept, torch.minimum(rtn, plain))
    torch.testing.assert_close(row_errors(rtn_module, w, hessian, rows_per_step=7), rtn)
    # Neither method wins every row here, so the layer beats both.
    assert 0 < int((rtn < plain).sum()) < n_out
    assert kept.sum() < rtn.sum() and kept.sum() < plain.sum()


def test_gptq_int8_beats_rtn_and_keeps_its_format():
    g, x, w, hessian = _correlated_layer(2, 4096)
    bias = torch.randn(w.shape[0], generator=g)
    error = _output_error(x, w)
    rtn_module = Int8Linear.from_float(w)
    rtn = error(rtn_module)
    for act_order in (False, True):
        module = gptq_int8(w, bias, hessian, act_order=act_order)
        assert isinstance(module, Int8Linear) and module.spec() == {"scheme": "int8"}
        assert module.qweight.dtype == torch.int8 and torch.equal(module.bias, bias)
        assert torch.equal(module.scale, rtn_module.scale)  # round-to-nearest's scales
        assert error(module) < 0.8 * rtn, (act_order, error(module), rtn)
        # every row at least as good as round-to-nearest under the Hessian
        assert (row_errors(module, w, hessian) <= row_errors(rtn_module, w, hessian)).all()
        assert row_errors(module, w, hessian).sum() < row_errors(rtn_module, w, hessian).sum()


def test_gptq_visits_columns_by_activation_unless_told(monkeypatch):
    seen = []
    for name in ("gptq_int4", "gptq_int8"):
        real = getattr(gptq, name)

        def spy(*args, act_order, real=real, which=name, **kwargs):
            seen.append((which, act_order))
            return real(*args, act_order=act_order, **kwargs)

        monkeypatch.setattr(gptq, name, spy)
    calibration = torch.randint(0, 100, (2, 16))
    for mode, options, want in (("int4-gptq", {}, True), ("int8-gptq", {}, True),
                                ("int8-gptq", {"act_order": False}, False)):
        seen.clear()
        quantize_model(_tiny_model(), mode, 32, calibration_tokens=calibration, **options)
        assert seen and set(seen) == {(f"gptq_{mode[:4]}", want)}, (mode, seen)


def test_gptq_refuses_a_scheme_without_codes_to_choose():
    with pytest.raises(ValueError, match="GPTQ stores int4 or int8 codes, not 'fp8'"):
        gptq.gptq_quantize_model(_tiny_model(), torch.randint(0, 100, (2, 16)), scheme="fp8")


def test_gptq_output_is_an_ordinary_int4_module():
    w, bias = _weight(), torch.randn(48)
    x = torch.randn(512, 128)
    module = gptq_int4(w, bias, 2 * x.T @ x / 512, 64)
    assert isinstance(module, Int4Linear) and module.spec() == {"scheme": "int4", "group_size": 64}
    assert torch.equal(module.bias, bias)
    # Codes lie on each group's own grid: never more than half a step outside the group range.
    deq = module.dequantize().reshape(48, 2, 64)
    zero, scale = module.zero.float()[..., None], module.scale.float()[..., None]
    assert (deq >= -zero * scale - 1e-5).all()


def test_calibration_windows():
    windows = calibration_windows(list(range(100)), n_samples=3, seq_len=20)
    assert windows.shape == (3, 20)
    assert windows[0, 0] == 0 and windows[-1, -1] == 99  # spread over the whole text
    with pytest.raises(ValueError, match=r"has 100 tokens but 8 samples x 20 tokens = 160"):
        calibration_windows(list(range(100)), n_samples=8, seq_len=20)
    # By default as many windows as the text holds, at most 128.
    assert calibration_windows(list(range(100)), seq_len=20).shape == (5, 20)
    assert calibration_windows(list(range(5000)), seq_len=16).shape == (128, 16)
    with pytest.raises(ValueError, match=r"has 10 tokens, fewer than one window of 20"):
        calibration_windows(list(range(10)), seq_len=20)


# -- the model transform --------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_quantize_model_swaps_every_linear(tie):
    model = _tiny_model(tie=tie)
    embed = model.embed.weight.clone()
    tokens = torch.randint(0, 100, (1, 12))
    reference = model(tokens)
    lines = []
    specs = quantize_model(model, "int8", include_head=True, progress=lines.append)
    assert set(specs) == {f"layers.{i}.{n}" for i in range(2) for n in
                          ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} | {"lm_head"}
    assert not linear_names(model, include_head=True)
    assert len(lines) == len(specs)
    assert torch.equal(model.embed.weight, embed)  # the embedding stays float (and untouched)
    logits = model(tokens)
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def _random_norms(model, seed=3):
    """Norm weights away from one (build_random_model leaves them at 1), so folding shows."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.data = torch.rand(module.weight.shape, generator=gen) + 0.5
    return model


@pytest.mark.parametrize("tie, head", [(True, True), (False, False)])
def test_int8_folds_each_input_norm_into_the_linear_after_it(tie, head):
    """int8 quantizes W * g (the norm's weight in W's columns) and leaves the norm without a
    weight: same function as the float model, and each Linear within half a step of W * g."""
    model = _random_norms(_tiny_model(tie=tie))
    gains = {name: model.get_submodule(name).weight.clone() for name in folded_names(head)}
    weights = {name: model.get_submodule(name).weight.clone() for name in linear_names(model, head)}
    if tie and head:
        assert model.lm_head.weight is model.embed.weight
    tokens = torch.randint(0, 100, (2, 12))
    reference = model(tokens)
    quantize_model(model, "int8", include_head=head)
    assert folded_norms(model) == list(gains)
    assert model.norm.weight.numel() == (0 if head else model.config.dim)
    for name, w in weights.items():
        if name.endswith(("qkv_proj", "gate_up_proj", "lm_head")):  # after a norm: W * g
            w = w * gains[FOLDED_NORM[name.split(".")[-1]](name)][None, :]
        module = model.get_submodule(name)
        step = module.scale[:, None]
        assert ((module.dequantize() - w).abs() <= 0.5 * step + 1e-7).all(), name
    logits = model(tokens)
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert torch.equal(model.embed.weight, _tiny_model(tie=tie).embed.weight)  # untouched


FOLDED_NORM = {"qkv_proj": lambda name: name.replace("attn.qkv_proj", "attn_norm"),
               "gate_up_proj": lambda name: name.replace("mlp.gate_up_proj", "mlp_norm"),
               "lm_head": lambda name: "norm"}  # a Linear's name -> its input norm's


def folded_names(head):
    return [f"layers.{i}.{n}" for i in range(2) for n in ("attn_norm", "mlp_norm")] + (
        ["norm"] if head else [])


def test_fold_norms_false_keeps_the_norm_weights():
    model = _random_norms(_tiny_model())
    gains = [m.weight.clone() for m in model.modules() if isinstance(m, RMSNorm)]
    apply_quant_option(model, "int8", include_head=True, fold_norms=False)
    assert not folded_norms(model) and len(quantized_modules(model)) == 9
    assert all(torch.equal(a, m.weight) for a, m in
               zip(gains, (m for m in model.modules() if isinstance(m, RMSNorm))))


@pytest.mark.parametrize("mode", ["fp8", "int4", "int8-gptq"])
def test_other_modes_keep_their_norm_weights(mode):
    model = _random_norms(_tiny_model())
    gains = [m.weight.clone() for m in model.modules() if isinstance(m, RMSNorm)]
    calibration = torch.randint(0, 100, (4, 16)) if mode.endswith("-gptq") else None
    quantize_model(model, mode, 32, include_head=True, calibration_tokens=calibration)
    assert not folded_norms(model)
    assert all(torch.equal(a, m.weight) for a, m in
               zip(gains, (m for m in model.modules() if isinstance(m, RMSNorm))))


def test_folded_norms_save_load_and_bad_lists(tmp_path):
    model = _random_norms(_tiny_model(tie=False))
    quantize_model(model, "int8", include_head=True)
    save_quantized(model, tmp_path, mode="int8")
    meta = json.loads((tmp_path / "quantization.json").read_text())
    assert meta["format_version"] == 3 and meta["folded_norms"] == folded_names(True)
    assert load_file(tmp_path / "model.safetensors")["norm.weight"].shape == (0,)
    loaded = build_quantized_model(tmp_path, dtype=torch.float32)
    assert folded_norms(loaded) == folded_names(True)
    tokens = torch.randint(0, 100, (2, 10))
    assert torch.equal(loaded(tokens), model(tokens))
    for bad, message in ((["layers.0.attn.o_proj"], "is not an RMSNorm"),
                         (["layers.9.attn_norm"], "is not an RMSNorm"),
                         ("norm", "must be a list"),
                         (folded_names(True)[:-1], r"tensor 'norm\.weight' has shape \[0\]")):
        edited = dict(meta, folded_norms=bad)
        (tmp_path / "quantization.json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match=message):
            build_quantized_model(tmp_path)
    # without folded norms the folder stays version 2, which older readers take
    fp8 = _tiny_model()
    quantize_model(fp8, "fp8")
    save_quantized(fp8, tmp_path / "fp8", mode="fp8")
    meta = json.loads((tmp_path / "fp8" / "quantization.json").read_text())
    assert meta["format_version"] == 2 and "folded_norms" not in meta


def test_quantize_model_leaves_the_tied_head_by_default():
    model = _tiny_model(tie=True)
    quantize_model(model, "int4", group_size=32)
    assert type(model.lm_head) is FusedLinear and model.lm_head.weight is model.embed.weight


def test_apply_quant_option():
    model = _tiny_model()
    assert apply_quant_option(model, None) is model and not quantized_modules(model)
    for mode in ("int4-gptq", "int8-gptq"):
        with pytest.raises(ValueError, match=f"offline: tachylm quantize MODEL --mode {mode}"):
            apply_quant_option(model, mode)
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        apply_quant_option(model, "int3")
    apply_quant_option(model, "fp8", device="cpu")
    assert len(quantized_modules(model)) == 8


def test_gptq_model_is_better_than_rtn_on_its_calibration_distribution():
    torch.manual_seed(0)
    float_model = _tiny_model(tie=False, seed=1)
    calibration = torch.randint(0, 100, (32, 32))  # 1024 tokens: H well estimated for widths 64 and 128
    held_out = torch.randint(0, 100, (4, 32))
    reference = float_model(held_out)

    def quantized(mode, **kwargs):
        model = _tiny_model(tie=False, seed=1)
        quantize_model(model, mode, 32, include_head=True, **kwargs)
        return (model(held_out) - reference).pow(2).mean().item()

    for scheme in ("int4", "int8"):
        rtn = quantized(scheme)
        gptq = quantized(f"{scheme}-gptq", calibration_tokens=calibration)
        assert gptq < 0.8 * rtn, (scheme, gptq, rtn)
        with pytest.raises(ValueError, match=f"{scheme}-gptq needs calibration tokens"):
            quantize_model(_tiny_model(), f"{scheme}-gptq", 32)
    with pytest.raises(ValueError, match="calibration applies to int4-gptq and int8-gptq only"):
        quantize_model(_tiny_model(), "int8", 32, calibration_tokens=calibration)


def test_prepare_for_quantized_load_rejects_bad_specs():
    with torch.device("meta"):
        model = Transformer(tiny_config())
    with pytest.raises(ValueError, match="unknown quantization scheme 'int2'"):
        prepare_for_quantized_load(model, {"layers.0.attn.o_proj": {"scheme": "int2"}})
    with pytest.raises(ValueError, match="not a Linear"):
        prepare_for_quantized_load(model, {"layers.0.attn_norm": {"scheme": "int8"}})
    prepare_for_quantized_load(model, {"layers.0.attn.o_proj": {"scheme": "int4", "group_size": 32}})
    assert isinstance(model.layers[0].attn.o_proj, QuantizedLinear)
    assert model.layers[0].attn.o_proj.qweight.is_meta


def test_int4_linears_are_linked_to_their_producers():
    """Quantizing to int4 (or preparing an int4 load) links each Linear's input to the kernel
    that computes it (`kernels.InputLink`): o_proj to its attention, gate_up_proj to o_proj,
    down_proj to gate_up_proj, the next layer's qkv_proj to down_proj, and a quantized lm_head
    to the last down_proj. One link per consumer; other schemes stay unlinked."""
    def links(model):
        pairs = []
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.attn, layer.mlp
            pairs += [(attn.output_link, attn.o_proj.fed_by),
                      (attn.o_proj.feeds, mlp.gate_up_proj.fed_by),
                      (mlp.gate_up_proj.feeds, mlp.down_proj.fed_by)]
            if i + 1 < len(model.layers):
                pairs.append((mlp.down_proj.feeds, model.layers[i + 1].attn.qkv_proj.fed_by))
        return pairs

    model = _tiny_model()
    quantize_model(model, "int4", 32)
    pairs = links(model)
    assert all(out and out == fed for out, fed in pairs) and len(set(pairs)) == len(pairs)
    assert not model.layers[0].attn.qkv_proj.fed_by  # the embedding computes its input
    assert not model.layers[-1].mlp.down_proj.feeds  # the head is not quantized
    assert not any(getattr(m, "feeds", 0) for name, m in model.named_modules()
                   if name.endswith("qkv_proj"))
    model = _tiny_model()
    quantize_model(model, "int4", 32, include_head=True)
    assert model.layers[-1].mlp.down_proj.feeds == model.lm_head.fed_by != 0
    model = _tiny_model()
    quantize_model(model, "int8")
    assert not any(layer.attn.output_link for layer in model.layers)
    assert not any(getattr(m, "feeds", 0) for m in model.modules())
    with torch.device("meta"):
        model = Transformer(tiny_config())
    prepare_for_quantized_load(model, {name: {"scheme": "int4", "group_size": 32}
                                       for name in linear_names(model)})
    assert all(out and out == fed for out, fed in links(model))


# -- quantized checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("mode, tie, head, family", [
    ("int8", True, False, "llama"), ("int8", True, True, "qwen2"), ("fp8", False, True, "llama"),
    ("int4", False, False, "qwen3"), ("int4-gptq", True, True, "llama"),
    ("int8-gptq", False, True, "qwen2")])
def test_quantize_save_load_identical_logits(tmp_path, mode, tie, head, family):
    model = _tiny_model(tie=tie, family=family)
    calibration = torch.randint(0, 100, (4, 16)) if mode.endswith("-gptq") else None
    quantize_model(model, mode, 32, include_head=head, calibration_tokens=calibration)
    save_quantized(model, tmp_path, mode=mode)
    assert is_quantized_folder(tmp_path) and not is_quantized_folder(tmp_path / "model.safetensors")
    meta = json.loads((tmp_path / "quantization.json").read_text())
    assert meta["mode"] == mode and meta["include_head"] == head and meta["dtype"] == "float32"
    loaded = build_quantized_model(tmp_path, device="cpu", dtype=torch.float32)
    tokens = torch.randint(0, 100, (2, 10))
    assert torch.equal(loaded(tokens), model(tokens))
    assert (getattr(loaded.lm_head, "weight", None) is loaded.embed.weight) == (tie and not head)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_save_in_bfloat16_keeps_quantized_tensors_exact(tmp_path):
    model = _tiny_model()
    quantize_model(model, "int4", 32)
    save_quantized(model, tmp_path, mode="int4", dtype=torch.float16)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["embed.weight"].dtype == torch.float16
    assert stored["layers.0.attn.qkv_proj.scale"].dtype == torch.bfloat16  # the format's, not dtype's
    loaded = build_quantized_model(tmp_path, dtype=torch.float16)
    for name in ("qweight", "scale", "zero"):
        assert torch.equal(getattr(loaded.layers[1].mlp.down_proj, name),
                           getattr(model.layers[1].mlp.down_proj, name))
    assert loaded.embed.weight.dtype == torch.float16


@pytest.fixture
def saved(tmp_path):
    model = _tiny_model()
    quantize_model(model, "int4", 32)
    save_quantized(model, tmp_path, mode="int4")
    return tmp_path


def _rewrite(folder, change):
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors")


def test_truncated_weights_are_a_checkpoint_error(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted or truncated"):
        build_quantized_model(saved)


def test_wrong_dtype_is_a_checkpoint_error(saved):
    _rewrite(saved, lambda s: s.update({"layers.1.mlp.down_proj.scale":
                                        s["layers.1.mlp.down_proj.scale"].half()}))
    with pytest.raises(CheckpointError, match=r"'layers\.1\.mlp\.down_proj\.scale' has dtype torch\.float16, "
                                              r"expected torch\.bfloat16"):
        build_quantized_model(saved)


def test_version_1_folder_with_float32_int4_parameters_still_loads(saved):
    model = build_quantized_model(saved)
    # What version 1 wrote: the same tensors with float32 scales and zero points.
    _rewrite(saved, lambda s: s.update({name: t.float() for name, t in s.items()
                                        if name.endswith((".scale", ".zero"))}))
    path = saved / "quantization.json"
    with pytest.raises(CheckpointError, match=r"scale' has dtype torch\.float32, expected torch\.bfloat16"):
        build_quantized_model(saved)  # version 2 says bfloat16: float32 there is a damaged file
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(dict(meta, format_version=1)))
    old = build_quantized_model(saved)
    for name, tensor in model.state_dict().items():
        assert old.state_dict()[name].dtype == tensor.dtype and torch.equal(old.state_dict()[name], tensor)


def test_wrong_shape_missing_and_extra_tensors_are_checkpoint_errors(saved):
    _rewrite(saved, lambda s: s.update({"layers.0.attn.o_proj.zero": s["layers.0.attn.o_proj.zero"][:, :1].clone()}))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.o_proj\.zero' has shape \[64, 1\]"):
        build_quantized_model(saved)
    _rewrite(saved, lambda s: s.pop("layers.0.attn.o_proj.zero"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['layers\.0\.attn\.o_proj\.zero'\]"):
        build_quantized_model(saved)
    _rewrite(saved, lambda s: s.update({"layers.0.attn.o_proj.zero": torch.zeros(64, 2),
                                        "layers.0.attn.o_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['layers\.0\.attn\.o_proj\.weight'\]"):
        build_quantized_model(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        build_quantized_model(saved)


def _edit_module(name, **changes):
    return lambda meta: meta["modules"][name].update(changes)


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta.update(format_version=7), "format version 7"),
    (_edit_module("layers.1.mlp.down_proj", scheme="int3"), "unknown quantization scheme 'int3'"),
    (_edit_module("layers.0.attn.o_proj", group_size=48), "group size must be one of"),
    (_edit_module("layers.0.attn.o_proj", group_size=64), r"attn\.o_proj\.scale' has shape \[64, 2\]"),
    (lambda meta: meta["config"].update(n_layerz=2), "unknown config field"),
    (lambda meta: meta["config"].update(n_heads=3), "invalid model config"),
    (lambda meta: meta.pop("modules"), r"missing key\(s\) \['modules'\]"),
    (lambda meta: meta["modules"].update({"layers.0.mlp": {"scheme": "int8"}}), "not a Linear"),
])
def test_bad_quantization_json_is_a_checkpoint_error(saved, edit, message):
    path = saved / "quantization.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message) as error:
        build_quantized_model(saved)
    assert "quantization.json" in str(error.value) or "model.safetensors" in str(error.value)


def test_quantization_json_that_is_not_json_is_a_checkpoint_error(saved):
    path = saved / "quantization.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(CheckpointError, match=r"quantization\.json: not valid JSON"):
        build_quantized_model(saved)


def test_save_refuses_a_file_or_a_folder_of_other_files(tmp_path):
    model = _tiny_model()
    quantize_model(model, "int8", 32)
    source = tmp_path / "source"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"the source checkpoint")
    with pytest.raises(ValueError, match="already holds files and is not a quantized checkpoint"):
        save_quantized(model, source, mode="int8")
    assert (source / "model.safetensors").read_bytes() == b"the source checkpoint"
    assert sorted(os.listdir(source)) == ["model.safetensors"]
    with pytest.raises(ValueError, match="is a file"):
        save_quantized(model, source / "model.safetensors", mode="int8")
    # an earlier quantized output is written over (a rerun); no temporary file stays behind
    out = tmp_path / "out"
    save_quantized(model, out, mode="int8")
    quantize_model(other := _tiny_model(), "int4", 32)
    save_quantized(other, out, mode="int4")
    assert sorted(os.listdir(out)) == ["model.safetensors", "quantization.json"]
    assert json.loads((out / "quantization.json").read_text())["mode"] == "int4"


def test_cli_quantize_checks_the_output_before_loading(tmp_path, monkeypatch):
    import tachylm.cli_quant as cli_quant

    (tmp_path / "config.json").write_text("{}")
    loads = []
    monkeypatch.setattr(cli_quant, "resolve_model", lambda *a, **kw: loads.append(a))
    with pytest.raises(ValueError, match="already holds files"):
        _quant_cli(["quantize", "smollm2-135m-instruct", "--mode", "int8", "--no-eval",
                    "-o", str(tmp_path), "--device", "cpu"])
    assert loads == [] and os.listdir(tmp_path) == ["config.json"]


def test_save_refuses_a_float_model(tmp_path):
    with pytest.raises(ValueError, match="no quantized modules"):
        save_quantized(_tiny_model(), tmp_path, mode="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checkpoint_moves_between_cpu_and_cuda(tmp_path):
    model = _tiny_model()
    quantize_model(model, "int4", 32, include_head=True)
    save_quantized(model, tmp_path / "cpu", mode="int4")
    on_gpu = build_quantized_model(tmp_path / "cpu", device="cuda")
    tokens = torch.randint(0, 100, (2, 10))
    torch.testing.assert_close(on_gpu(tokens.cuda()).cpu(), model(tokens), atol=1e-3, rtol=1e-3)
    save_quantized(on_gpu, tmp_path / "gpu", mode="int4")
    back = build_quantized_model(tmp_path / "gpu", device="cpu")
    assert torch.equal(back(tokens), model(tokens))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int4-gptq", "int8-gptq"])
def test_host_model_quantized_on_cuda(mode):
    calibration = torch.randint(0, 100, (8, 16))
    on_cpu, host = _tiny_model(), _tiny_model()
    quantize_model(on_cpu, mode, 32, include_head=True, calibration_tokens=calibration)
    quantize_model(host, mode, 32, include_head=True, calibration_tokens=calibration, device="cuda")
    assert all(t.device.type == "cpu" for t in host.state_dict().values())  # blocks went back home
    # Rounding ties may flip a few codes, and later layers see inputs computed on another device;
    # int8's grid is 16 times finer than int4's, so more of its codes sit near a tie (on an H100:
    # 17 of 8192 in one layer), each one step off.
    identical = 0.99 if mode == "int8-gptq" else 0.999
    codes = schemes.unpack_int4 if mode == "int4-gptq" else (lambda q: q)
    for (name, expected), got in zip(quantized_modules(on_cpu).items(), quantized_modules(host).values()):
        step = (codes(expected.qweight).int() - codes(got.qweight).int()).abs()
        same = (step == 0).float().mean().item()
        assert same > (0.99 if name == "lm_head" else identical), (name, same)
        assert (step <= 1).float().mean().item() > 0.999, name
    rtn = _tiny_model()
    apply_quant_option(rtn, "int8", device="cuda")
    assert all(t.device.type == "cuda" for t in rtn.state_dict().values())


# -- perplexity -----------------------------------------------------------------------------------


def _scored(n, window, stride):
    scored = []
    for begin, end, n_scored in sliding_windows(n, window, stride):
        assert end - begin <= window and n_scored <= end - begin - 1
        scored += range(end - n_scored, end)
    return scored


def test_sliding_windows_score_every_token_once():
    for n, window, stride in [(20, 8, 4), (21, 8, 3), (5, 8, 4), (9, 8, 1), (8, 8, 8)]:
        assert _scored(n, window, stride) == list(range(1, n)), (n, window, stride)
    # Non-overlapping windows cannot predict their first token from inside the window.
    assert _scored(20, 8, 8) == [t for t in range(1, 20) if t not in (8, 16)]


def test_perplexity_is_exp_mean_nll():
    model = _tiny_model()
    tokens = torch.randint(0, 100, (24,))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(tokens[None])[0, :-1].double(), dim=-1)
    nll = -log_probs[torch.arange(23), tokens[1:]].mean().item()
    assert math.isclose(perplexity(model, tokens, window=24, stride=24), math.exp(nll), rel_tol=1e-6)
    assert math.isclose(perplexity(model, tokens.tolist(), window=64, stride=64), math.exp(nll), rel_tol=1e-6)
    # Windows of 16 every 4 tokens: the first 15 predictions are the full forward's, the other 8
    # see 12 to 15 tokens of context instead of up to 23.
    sliding = perplexity(model, tokens, window=16, stride=4)
    assert sliding != math.exp(nll) and math.isclose(sliding, math.exp(nll), rel_tol=0.1)
    lines = []
    batched = perplexity(model, tokens, window=16, stride=4, batch_size=3, progress=lines.append)
    assert math.isclose(batched, sliding, rel_tol=1e-5) and lines
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokens, window=8, stride=9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, tokens[:1])


def test_token_nlls_are_the_full_forwards_in_text_order():
    model = _tiny_model()
    tokens = torch.randint(0, 100, (24,))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(tokens[None])[0, :-1].double(), dim=-1)
    want = -log_probs[torch.arange(23), tokens[1:]]
    got = token_nlls(model, tokens, window=24, stride=24)
    assert got.dtype == torch.float64 and got.shape == (23,)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # Sliding windows: the first window's 15 predictions are the full forward's, in order.
    sliding = token_nlls(model, tokens, window=16, stride=4)
    assert sliding.shape == (23,) and torch.allclose(sliding[:15], want[:15], rtol=1e-5, atol=1e-6)


def test_perplexity_change_and_its_standard_error():
    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(1000, generator=gen, dtype=torch.float64) * 4
    # The same model: no change and no spread.
    same = perplexity_change(reference, reference.clone())
    assert same.percent == 0.0 and same.stderr_percent == 0.0 and same.blocks == 1000 // 64
    assert math.isclose(same.reference, math.exp(reference.mean().item()))
    # A constant shift of every token's NLL by c: the ratio is exactly exp(c), with no spread.
    shifted = perplexity_change(reference, reference + 0.01)
    assert math.isclose(shifted.percent, 100 * math.expm1(0.01), rel_tol=1e-9)
    assert shifted.stderr_percent < 1e-9
    assert math.isclose(shifted.value / shifted.reference, math.exp(0.01), rel_tol=1e-9)
    # Independent noise of standard deviation sigma per token, blocks of 50: the standard error
    # of the mean is about sigma / sqrt(1000), whatever the blocking.
    noise = torch.randn(1000, generator=gen, dtype=torch.float64) * 0.1
    noisy = perplexity_change(reference, reference + noise, block_tokens=50)
    assert noisy.blocks == 20
    assert 0.5 * 10 / math.sqrt(1000) < noisy.stderr_percent < 1.5 * 10 / math.sqrt(1000)
    assert math.isclose(noisy.percent, 100 * math.expm1(noise.mean().item()), rel_tol=1e-9)
    # Too few tokens for two blocks: no standard error.
    assert math.isnan(perplexity_change(reference[:10], reference[:10] + noise[:10]).stderr_percent)
    with pytest.raises(ValueError, match="equal 1-D"):
        perplexity_change(reference, reference[:-1])
    with pytest.raises(ValueError, match="block_tokens"):
        perplexity_change(reference, reference, block_tokens=0)


# -- the real model (slow) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_path():
    from tachylm.checkpoints.resolve import DEFAULT_MODEL, resolve_model

    try:
        return resolve_model(DEFAULT_MODEL, allow_download=False)
    except (ValueError, RuntimeError) as e:
        pytest.skip(f"default model not available: {e}")


def _quant_cli(argv):
    from tachylm.cli_quant import add_quant_parsers

    parser = argparse.ArgumentParser(prog="tachylm")
    add_quant_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.slow
def test_data_texts_are_long_enough_and_different(smollm_path):
    from tachylm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm_path)
    eval_text, calib_text = open(EVAL_TEXT).read(), open(CALIB_TEXT).read()
    assert len(tokenizer.encode(eval_text)) >= 2000
    assert len(tokenizer.encode(calib_text)) >= 2048
    assert not set(eval_text.split("\n\n")) & set(calib_text.split("\n\n"))


@pytest.mark.slow
def test_cli_quantize_int8_then_eval(smollm_path, tmp_path, capsys):
    out, text = tmp_path / "int8", tmp_path / "short.txt"
    text.write_text(open(EVAL_TEXT).read()[:4000])  # about 800 tokens: enough to see a broken model
    assert _quant_cli(["quantize", smollm_path, "--mode", "int8", "-o", str(out), "--device", "cpu",
                       "--dtype", "float32", "--eval-text", str(text), "--window", "256"]) == 0
    stdout = capsys.readouterr().out
    delta = float(stdout.rsplit("(", 1)[1].split("%")[0])
    assert abs(delta) < 2.0, stdout
    stderr = float(stdout.rsplit("±", 1)[1].split("%")[0])
    assert 0.0 < stderr < 2.0, stdout
    # The folder carries the tokenizer: it loads, tokenizes and chats like the source.
    from tachylm.tokenizer import load_tokenizer

    source, copy = load_tokenizer(smollm_path), load_tokenizer(out)
    sample = "Hello <|im_start|>user 12345, naïve café!\n"
    assert copy.encode(sample) == source.encode(sample)
    assert (copy.stop_ids, copy.bos_id, copy.eos_id, copy.add_bos, copy.chat_template) == (
        source.stop_ids, source.bos_id, source.eos_id, source.add_bos, source.chat_template)
    assert _quant_cli(["eval", "perplexity", str(out), "--text", str(text), "--device", "cpu",
                       "--window", "256", "--stride", "256"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    # Against the source on the same tokens (the quantize run's windows): the same change.
    assert _quant_cli(["eval", "perplexity", str(out), "--text", str(text), "--device", "cpu",
                       "--window", "256", "--stride", "256", "--compare", smollm_path]) == 0
    compared = capsys.readouterr().out.splitlines()[-1]
    assert compared.startswith("against ") and "±" in compared, compared
    assert f"change {delta:+.2f}%" in compared, (compared, delta)


@pytest.mark.slow
def test_cli_errors(smollm_path, tmp_path):
    for mode in ("int4-gptq", "int8-gptq"):
        with pytest.raises(ValueError, match=f"--mode {mode} needs --calib"):
            _quant_cli(["quantize", smollm_path, "--mode", mode, "-o", str(tmp_path)])
    with pytest.raises(ValueError, match="--calib applies to --mode int4-gptq or int8-gptq only, not int8"):
        _quant_cli(["quantize", smollm_path, "--mode", "int8", "--calib", CALIB_TEXT, "-o", str(tmp_path)])
    with pytest.raises(ValueError, match="same"):
        _quant_cli(["quantize", smollm_path, "--mode", "int4-gptq", "--calib", EVAL_TEXT, "-o", str(tmp_path)])
    with pytest.raises(ValueError, match=r"in_features 576 is not a multiple of the int4 group size 128.*32 or 64"):
        _quant_cli(["quantize", smollm_path, "--mode", "int4", "-o", str(tmp_path), "--device", "cpu",
                    "--no-eval"])


@pytest.mark.parametrize("content", [None, " \n"])
def test_cli_eval_checks_the_text_before_loading_a_model(tmp_path, monkeypatch, content):
    import tachylm.cli_quant as cli_quant

    text = tmp_path / "eval.txt"
    if content is not None:
        text.write_text(content)
    loads = []
    monkeypatch.setattr(cli_quant, "_eval_model", lambda *a, **kw: loads.append(a))
    with pytest.raises(ValueError, match="does not exist" if content is None else "is empty"):
        _quant_cli(["eval", "perplexity", "smollm2-135m-instruct", "--text", str(text),
                    "--device", "cpu"])
    assert loads == []


def test_cli_quantize_checks_an_empty_eval_text_before_loading(tmp_path, monkeypatch):
    import tachylm.cli_quant as cli_quant

    text = tmp_path / "eval.txt"
    text.write_text("\n")
    loads = []
    monkeypatch.setattr(cli_quant, "resolve_model", lambda *a, **kw: loads.append(a))
    with pytest.raises(ValueError, match="is empty"):
        _quant_cli(["quantize", "smollm2-135m-instruct", "--mode", "int8", "--eval-text", str(text),
                    "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert loads == []


@pytest.mark.slow
def test_cli_compare_refuses_models_that_tokenize_differently(smollm_path, tmp_path, monkeypatch):
    import tachylm.cli_quant as cli_quant

    text = tmp_path / "short.txt"
    text.write_text(open(EVAL_TEXT).read()[:600])
    real = cli_quant._eval_tokens
    calls = []

    def tokens(tokenizer, path):  # the second model's tokenizer drops the text's last token
        calls.append(path)
        ids = real(tokenizer, path)
        return ids if len(calls) == 1 else ids[:-1]

    monkeypatch.setattr(cli_quant, "_eval_tokens", tokens)
    with pytest.raises(ValueError, match="tokenizes the text differently.*same tokens"):
        _quant_cli(["eval", "perplexity", smollm_path, "--text", str(text), "--device", "cpu",
                    "--window", "64", "--stride", "64", "--compare", smollm_path])
    assert len(calls) == 2


# -- fusions (the keywords every Linear of the model takes) ---------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "fp8", "int4"])
def test_quantized_forward_takes_the_fusions(scheme):
    torch.manual_seed(0)
    w, k = torch.randn(24, 64) * 0.1, 64
    module = SCHEMES[scheme].from_float(w, **({"group_size": 32} if scheme == "int4" else {}))
    x, residual = torch.randn(3, k), torch.randn(3, 24)
    g = torch.rand(k) + 0.5
    normed = g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.allclose(module(x, norm=(g, 1e-5), residual=residual), residual + module(normed),
                          atol=1e-5)
    gate_up = module(x)
    swiglu = torch.nn.functional.silu(gate_up[:, :12]) * gate_up[:, 12:]
    assert torch.allclose(module(x, swiglu=True), swiglu, atol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        module(x, residual=torch.randn(3, 25))
    with pytest.raises(ValueError, match="norm weight"):
        module(x, norm=(torch.ones(k + 1), 1e-5))


def test_gptq_calibrates_on_what_the_layer_multiplies():
    # The model hands each projection its un-normed input plus norm=...; GPTQ's Hessian must be
    # built from the normed input the weights actually see.
    from tachylm.kernels.linear import FusedLinear
    from tachylm.quant import gptq

    torch.manual_seed(0)
    layer = FusedLinear(16, 8, bias=False)
    x = torch.randn(5, 16) * 3
    g = torch.rand(16) + 0.5

    def run():
        try:
            layer(x, norm=(g, 1e-6))
        except gptq._Captured:  # the hook stops the forward once it has the input
            pass

    hessian = gptq.input_hessian(layer, run, 16, torch.device("cpu"))
    normed = g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(hessian, 2 * normed.T @ normed / 5, rtol=1e-5, atol=1e-6)


def test_int4_packed_scales_follow_every_load():
    """Int4Linear's packed scale and zero point (what the one-row GPU kernel reads) is derived:
    never saved, and rebuilt whenever a state dict is loaded, assigned or copied in, so it can
    never disagree with the scale and zero point it came from."""
    from tachylm.kernels import quant_matmul as qm
    torch.manual_seed(0)
    module = Int4Linear.from_float(torch.randn(24, 64), group_size=32)
    assert "scale_zero" not in module.state_dict()
    assert torch.equal(module.scale_zero, qm.pack_scale_zero(module.scale, module.zero))
    # assign-loading into an empty (meta) module, as build does
    empty = Int4Linear.empty(64, 24, False, device="meta", group_size=32)
    empty.load_state_dict(module.state_dict(), assign=True)
    assert torch.equal(empty.scale_zero, qm.pack_scale_zero(module.scale, module.zero))
    # copying other values into an existing module
    other = Int4Linear.from_float(torch.randn(24, 64), group_size=32)
    empty.load_state_dict(other.state_dict())
    assert torch.equal(empty.scale_zero, qm.pack_scale_zero(other.scale, other.zero))
    assert not torch.equal(empty.scale_zero, module.scale_zero)
    # the low half holds the scale's bits, the high half the zero point's
    assert torch.equal((empty.scale_zero & 0xFFFF).to(torch.int16).view(torch.bfloat16),
                       other.scale)
    assert torch.equal((empty.scale_zero >> 16).to(torch.int16).view(torch.bfloat16), other.zero)
