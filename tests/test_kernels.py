"""Decode linear kernels (quantized and dense): references against float64, Triton interpreted.

The references (the CPU path) are checked against a float64 dequantize + matmul. The Triton
kernels run under Triton's CPU interpreter, which must be switched on before triton is imported,
so they run in one child process (this file run as a script) and the tests read its results. The
inline PTX the GPU uses instead of the plain conversions is checked by emulating it here on every
byte value. FastLinear is checked against nn.Linear on the CPU. CUDA-only tests (dispatch,
torch.compile with CUDA graphs) run where a GPU is present.
"""

import importlib.util
import json
import re
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tachylm.kernels import quant_matmul as qm
from tachylm.kernels.linear import FastLinear, FusedLinear, use_fast_linears
from tachylm.kernels.linear import mlp as linear_mlp
from triton_interpreter import outcome, patch_interpreter, run_child

HAS_TRITON = importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------------------------
# Random quantized weights and the float64 oracle
# ----------------------------------------------------------------------------------------------

def make_int8(n, k, gen):
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.02 + 0.002
    return q, scale


def make_fp8(n, k, gen):
    w = torch.randn(n, k, generator=gen) * 100
    q = w.clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(n, generator=gen) * 0.002 + 0.0002
    return q, scale


def make_int4(n, k, group, gen):
    q = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=gen) * 0.05 + 0.005
    zero = torch.rand(n, k // group, generator=gen) * 15  # fractional zero points
    return q, scale, zero


def make_dense(n, k, gen, dtype=torch.bfloat16):
    return ((torch.randn(n, k, generator=gen) * 0.05).to(dtype),)


def make_weights(scheme, n, k, group, gen, dtype):
    """(weights tuple, scale or None, zero or None) of a scheme's layer [n, k]."""
    if scheme == "int4":
        weights = make_int4(n, k, group, gen)
    elif scheme == "dense":
        weights = make_dense(n, k, gen, dtype)
    else:
        weights = (make_int8 if scheme == "int8" else make_fp8)(n, k, gen)
    return (weights, weights[1] if len(weights) > 1 else None,
            weights[2] if len(weights) > 2 else None)


def oracle(scheme, x, weights, group=0, bias=None):
    """float64 y = x @ w.T + bias, w dequantized element by element without any shortcut."""
    if scheme == "dense":
        w = weights[0].double()
    elif scheme == "int4":
        q, scale, zero = weights
        codes = torch.empty(q.shape[0], 2 * q.shape[1], dtype=torch.float64)
        codes[:, 0::2] = (q & 0xF).double()
        codes[:, 1::2] = (q >> 4).double()
        g = torch.arange(codes.shape[1]) // group
        w = (codes - zero.double()[:, g]) * scale.double()[:, g]
    else:
        q, scale = weights
        w = q.double() * scale.double()[:, None]
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


EPS = 1e-5


def make_fusion_inputs(kind, m, n, k, dtype, gen):
    """x and the fusion of one case: kind names its parts, "+"-joined: "norm", "swiglu",
    "residual" (e.g. "norm+swiglu", gate_up's fusion); "unitnorm" is the norm without a weight
    (an empty one: folded into the layer's weight)."""
    x = torch.randn(m, k, generator=gen).to(dtype)
    norm = None
    if "norm" in kind:
        x = x * 3  # RMS away from 1, so a missing 1/rms shows
        weight = (torch.empty(0) if "unitnorm" in kind else torch.rand(k, generator=gen) + 0.5)
        norm = (weight.to(dtype), EPS)
    swiglu = "swiglu" in kind
    residual = None
    if "residual" in kind:
        residual = torch.randn(m, n // 2 if swiglu else n, generator=gen).to(dtype)
    return x, qm.make_fusion(norm, swiglu, residual)


def fused_oracle(scheme, x, weights, group, bias, fusion):
    """float64 residual + epilogue(w @ prologue(x) + bias)."""
    x = x.double()
    if fusion.norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + fusion.eps)
        if fusion.norm_weight.numel():
            x = x * fusion.norm_weight.double()
    y = oracle(scheme, x, weights, group, bias)
    if fusion.swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = gate * torch.sigmoid(gate) * up
    return y if fusion.residual is None else y + fusion.residual.double()


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------------------------
# References (CPU path) and the dispatchers on CPU
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2),
                                       (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(1, 64), (3, 53), (2, 3, 100)])
def test_rowwise_references_match_float64(dtype, tol, shape):
    gen = torch.Generator().manual_seed(0)
    n, k = 37, shape[-1]
    x = torch.randn(*shape, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    for scheme, make, ref, dispatch in (("int8", make_int8, qm.int8_linear_ref, qm.int8_linear),
                                        ("fp8", make_fp8, qm.fp8_linear_ref, qm.fp8_linear)):
        q, scale = make(n, k, gen)
        want = oracle(scheme, x.reshape(-1, k), (q, scale), bias=bias).reshape(*shape[:-1], n)
        got = ref(x, q, scale, bias)
        assert got.shape == (*shape[:-1], n) and got.dtype == dtype
        assert rel_err(got, want) < tol, scheme
        assert torch.equal(dispatch(x, q, scale, bias), got)  # CPU dispatch is the reference
        assert rel_err(ref(x, q, scale), oracle(scheme, x.reshape(-1, k), (q, scale)).reshape(
            *shape[:-1], n)) < tol


@pytest.mark.parametrize("group", qm.INT4_GROUP_SIZES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_int4_reference_matches_float64(group, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    n, k = 29, 3 * group
    x = torch.randn(2, 3, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    weights = make_int4(n, k, group, gen)
    want = oracle("int4", x.reshape(-1, k), weights, group, bias).reshape(2, 3, n)
    got = qm.int4_linear_ref(x, *weights, group, bias)
    assert got.shape == (2, 3, n) and got.dtype == dtype
    assert rel_err(got, want) < tol
    assert torch.equal(qm.int4_linear(x, *weights, group, bias), got)


def test_int4_low_nibble_is_the_even_k():
    q = torch.tensor([[0x21, 0x43]], dtype=torch.uint8)
    assert qm.unpack_int4(q).tolist() == [[1, 2, 3, 4]]
    one = torch.ones(1, 32)
    w = qm.dequantize_int4(torch.full((1, 16), 0xF0, dtype=torch.uint8), one[:, :1],
                           0 * one[:, :1], 32)
    assert w[0, 0::2].eq(0).all() and w[0, 1::2].eq(15).all()


def test_bad_inputs_raise_clear_errors():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64)
    q8, s8 = make_int8(8, 64, gen)
    q4, s4, z4 = make_int4(8, 64, 32, gen)
    cases = [
        (lambda: qm.int8_linear(x, q8.float(), s8), "2-D torch.int8"),
        (lambda: qm.int8_linear(torch.randn(2, 63), q8, s8), "K = 64"),
        (lambda: qm.int8_linear(x, q8, s8[:4]), "scale has shape"),
        (lambda: qm.int8_linear(x, q8, s8.to(torch.int32)), "scale has dtype"),
        (lambda: qm.int8_linear(x, q8, s8, torch.zeros(7)), "bias has shape"),
        (lambda: qm.int8_linear(x.to(torch.int32), q8, s8), "x has dtype"),
        (lambda: qm.fp8_linear(x, q8, s8), "float8_e4m3fn"),
        (lambda: qm.int4_linear(x, q4, s4, z4, 48), "group_size 48"),
        (lambda: qm.int4_linear(x, q4.to(torch.int8), s4, z4, 32), "uint8"),
        (lambda: qm.int4_linear(torch.randn(2, 128), q4, s4, z4, 32), "K = 64"),
        (lambda: qm.int4_linear(x, q4, s4, z4[:, :1], 32), "zero has shape"),
        (lambda: qm.int4_linear(torch.randn(2, 96), torch.zeros(8, 48, dtype=torch.uint8),
                                s4[:, :1], z4[:, :1], 64), "not a multiple of group_size"),
        # int4's packed scales: of the pair they came from, in the pair's bfloat16
        (lambda: qm.int4_linear(x, q4, s4, z4, 32, scale_zero=torch.zeros(8, 1, dtype=torch.int32)),
         "scale_zero must be pack_scale_zero"),
        (lambda: qm.int4_linear(x, q4, s4, z4, 32, scale_zero=s4), "scale_zero must be"),
        (lambda: qm.pack_scale_zero(s4, z4), "bfloat16 scale and zero point"),
        (lambda: qm.pack_scale_zero(s4.bfloat16(), z4[:, :1].bfloat16()), "of one shape"),
    ]
    # The CUDA path refuses layouts it could only serve by copying the weight on every call.
    cases += [
        (lambda: qm._triton_linear(qm.INT8, x, q8.t().contiguous().t(), s8, None, 0, None),
         "qweight must be contiguous"),
        (lambda: qm._triton_linear(qm.INT4, x, q4, s4, torch.cat([z4, z4], 1)[:, :2], 32, None),
         "share one layout"),
        # the integer GEMV reads weight rows as 32-bit words (a view starting mid-word)
        (lambda: qm._int4_dp4a_gemv(x[:1], torch.zeros(260, dtype=torch.uint8)[1:257].view(8, 32),
                                    None, 32, None),
         "multiples of 4 bytes"),
        # one row only; a handed-over x of the wrong size
        (lambda: qm._int4_dp4a_gemv(x[:2], q4, None, 32, None), "takes one row of x, got 2"),
        (lambda: qm._int4_dp4a_gemv(x[:1], q4, None, 32, None,
                                    prepared=torch.zeros(3, dtype=torch.int32)),
         "prepared_x_numel"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_custom_ops_trace_with_fake_tensors():
    # What torch.compile sees of the CUDA path: an opaque op with a shape function.
    from torch.fx.experimental.proxy_tensor import make_fx

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    q8, s8 = make_int8(24, 64, gen)
    q4, s4, z4 = make_int4(24, 64, 32, gen)

    (w,) = make_dense(24, 64, gen)

    def layer(x, q8, s8, q4, s4, z4, w):
        flat = x.reshape(-1, 64)
        a = torch.ops.tachylm.int8_linear(flat, q8, s8, None)
        b = torch.ops.tachylm.int4_linear(flat, q4, s4, z4, 32, None)
        c = torch.ops.tachylm.dense_linear(flat, w, None)
        return (a + b + c).reshape(2, 3, 24)

    graph = make_fx(layer, tracing_mode="fake")(x, q8, s8, q4, s4, z4, w)
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {"tachylm.int8_linear.default", "tachylm.int4_linear.default",
            "tachylm.dense_linear.default"} <= targets
    out = [n for n in graph.graph.nodes if n.op == "output"][0].args[0]
    assert tuple(out.meta["val"].shape) == (2, 3, 24)
    assert out.meta["val"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Dense weights: dispatch rules and FastLinear (CPU)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2),
                                       (torch.float16, 2e-3)])
def test_dense_linear_on_cpu_is_f_linear(dtype, tol):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 40, generator=gen).to(dtype)
    weights = make_dense(24, 40, gen, dtype)
    bias = torch.randn(24, generator=gen).to(dtype)
    got = qm.dense_linear(x, *weights, bias)
    assert torch.equal(got, F.linear(x, *weights, bias))
    assert torch.equal(qm.dense_linear_ref(x, *weights), F.linear(x, *weights))
    want = oracle("dense", x.reshape(-1, 40), weights, bias=bias).reshape(2, 3, 24)
    assert rel_err(got, want) < tol


def test_dense_linear_takes_the_kernels_only_where_they_compute_f_linear(monkeypatch):
    monkeypatch.setattr(qm, "_use_triton", lambda x: True)  # decide as on a GPU
    applies = qm._dense_gemv_applies
    bf16 = torch.bfloat16
    w = torch.randn(24, 64).to(bf16)
    b = torch.randn(24).to(bf16)
    x = torch.randn(1, 64).to(bf16)
    assert applies(x, w, b) and applies(x, w, None)
    assert applies(torch.randn(2, 8, 64).to(bf16), w, b)  # 16 rows
    assert applies(x, torch.randn(48, 64).to(bf16)[::2], b)  # a view of rows: read in place
    assert applies(x.float(), w.float(), b.float())  # float32: the m1 kernel, one row only
    assert not applies(torch.randn(2, 64), w.float(), b.float())
    assert not applies(torch.randn(17, 64).to(bf16), w, b)  # prefill sizes: cuBLAS
    assert not applies(torch.randn(0, 64).to(bf16), w, b)
    # What F.linear refuses, F.linear reports.
    assert not applies(x, w.half(), b) and not applies(x, w, b.float())
    assert not applies(torch.randn(1, 63).to(bf16), w, b) and not applies(x, w, b[:23])
    assert not applies(x, w.t().contiguous().t(), b)  # K axis strided: cuBLAS reads it as is
    trained = w.clone().requires_grad_()
    assert not applies(x, trained, b)  # the custom op has no backward
    with torch.no_grad():
        assert applies(x, trained, b)
    with torch.inference_mode():
        assert applies(x, trained, b)


def test_fast_linear_traces_to_the_custom_op(monkeypatch):
    # What Dynamo sees on a GPU: one graph, the kernel an opaque op.
    monkeypatch.setattr(qm, "_use_triton", lambda x: True)
    layer = FastLinear(64, 24, dtype=torch.bfloat16).requires_grad_(False)
    program = torch.export.export(layer, (torch.randn(1, 1, 64).to(torch.bfloat16),), strict=True)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "tachylm.dense_linear.default" in targets, targets


class TiedModel(nn.Module):
    """Embedding, two MLP blocks and an output head tied to the embedding."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim, bias=False))
            for _ in range(2))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.lm_head(h)


@pytest.mark.parametrize("bias", [True, False])
def test_fast_linear_is_an_nn_linear(bias):
    torch.manual_seed(0)
    plain = nn.Linear(40, 24, bias=bias)
    fast = FastLinear(40, 24, bias=bias)
    assert list(fast.state_dict()) == list(plain.state_dict())
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 40)
    assert torch.equal(fast(x), plain(x))
    assert isinstance(fast, nn.Linear) and fast.extra_repr() == plain.extra_repr()
    # The fusions: FusedLinear (PyTorch ops) and FastLinear (dense_linear) agree, and both are
    # residual + linear(prologue(x)).
    fused = FusedLinear(40, 24, bias=bias)
    fused.load_state_dict(plain.state_dict())
    g, residual = torch.rand(40) + 0.5, torch.randn(2, 3, 24)
    normed = g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    for layer in (fused, fast):
        out = layer(x, norm=(g, 1e-5), residual=residual)
        assert torch.allclose(out, residual + plain(normed), atol=1e-6)
        gate_up = plain(x)
        assert torch.allclose(layer(x, swiglu=True),
                              F.silu(gate_up[..., :12]) * gate_up[..., 12:], atol=1e-6)


@pytest.mark.parametrize("kinds", [("fast", "fast"), ("fused", "fused"), ("fast", "fused")])
def test_mlp_of_two_linears_equals_calling_them(kinds):
    """`linear.mlp`: a pair of FastLinears goes through `dense_mlp` (on the CPU its two
    `dense_linear` calls), any other pair is called as two Linears; the result is the same."""
    torch.manual_seed(0)
    make = {"fast": FastLinear, "fused": FusedLinear}
    gate_up, down = make[kinds[0]](32, 48, bias=False), make[kinds[1]](24, 32, bias=False)
    x, g = torch.randn(1, 1, 32), torch.rand(32) + 0.5
    want = x + down(gate_up(x, norm=(g, 1e-5), swiglu=True))
    assert torch.allclose(linear_mlp(gate_up, down, x, (g, 1e-5)), want, atol=1e-6)
    # dense_mlp itself, off the kernel's path (CPU), is the two dense_linear calls
    out = qm.dense_mlp(x, gate_up.weight, down.weight, norm=(g, 1e-5), residual=x)
    assert torch.allclose(out, want, atol=1e-6)
    assert not qm._dense_mlp_applies(x, gate_up.weight, down.weight, g, x)


def test_use_mlp_launch_switches_the_one_launch_mlp():
    """By default the one-launch MLP is on for the card it was measured faster on (an H100),
    never off CUDA; `use_mlp_launch` forces it on or off everywhere (the forced answers never
    ask the device, so this runs without a GPU)."""
    card = torch.device("cuda", 0)
    try:
        qm.use_mlp_launch(False)
        assert not qm._mlp_launch_on(card)
        qm.use_mlp_launch(True)
        assert qm._mlp_launch_on(card)
    finally:
        qm.use_mlp_launch(None)
    assert qm._MLP_LAUNCH["enabled"] is None
    assert not qm._mlp_launch_on(torch.device("cpu"))


def test_dense_fusions_refuse_what_does_not_fit():
    # A residual of the wrong shape would broadcast silently; a clear error names it instead.
    layer = FusedLinear(40, 24)
    x = torch.randn(3, 40)
    for call in (layer, lambda t, **kw: qm.dense_linear(t, layer.weight, layer.bias, **kw)):
        with pytest.raises(ValueError, match="residual"):
            call(x, residual=torch.randn(1, 24))
        with pytest.raises(ValueError, match="norm weight"):
            call(x, norm=(torch.ones(24), 1e-5))
    odd = FusedLinear(40, 25)  # no [gate; up] halves
    for call in (odd, lambda t, **kw: qm.dense_linear(t, odd.weight, odd.bias, **kw)):
        with pytest.raises(ValueError, match="even number of rows"):
            call(x, swiglu=True)


def test_use_fast_linears_shares_parameters_and_keeps_ties():
    torch.manual_seed(0)
    model = TiedModel()
    tokens = torch.randint(0, 50, (2, 5))
    want = model(tokens)
    keys = list(model.state_dict())
    params = dict(model.named_parameters(remove_duplicate=False))
    assert use_fast_linears(model) == 5
    assert all(type(m) is FastLinear for m in model.modules() if isinstance(m, nn.Linear))
    assert model.lm_head.weight is model.embed.weight
    assert all(p is params[name] for name, p in model.named_parameters(remove_duplicate=False))
    assert list(model.state_dict()) == keys
    assert torch.equal(model(tokens), want)
    assert use_fast_linears(model) == 0
    # build.py's order: meta init -> swap -> assign-load.
    with torch.device("meta"):
        fresh = TiedModel()
    assert use_fast_linears(fresh) == 5
    fresh.load_state_dict(model.state_dict(), assign=True)
    assert torch.equal(fresh(tokens), want)


# ----------------------------------------------------------------------------------------------
# The inline PTX, emulated
# ----------------------------------------------------------------------------------------------

def _f32(bits):
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def _bits32(value):
    return int(np.array([value], dtype=np.float32).view(np.uint32)[0])


def _half(bits, dtype):
    if dtype == "bf16":
        return _f32(bits << 16)
    return np.array([bits], dtype=np.uint16).view(np.float16)[0]


def _half_bits(value, dtype):
    t = torch.tensor([float(value)], dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
    return int(t.view(torch.int16).item()) & 0xFFFF


def _bf16_bits_rne(value):
    """bfloat16 bits of a float64 value, rounded once to nearest even (finite values)."""
    bits = int(np.array([value], dtype=np.float64).view(np.uint64)[0])
    sign, rest = bits >> 63, bits & ((1 << 63) - 1)
    exp = (rest >> 52) - 1023
    if rest == 0:
        return sign << 15
    assert -126 <= exp < 127, value
    drop = 52 - 7  # float64 keeps 52 fraction bits, bfloat16 7
    mant = (rest & ((1 << 52) - 1)) | (1 << 52)
    kept, tail = mant >> drop, mant & ((1 << drop) - 1)
    half = 1 << (drop - 1)
    if tail > half or (tail == half and kept & 1):
        kept += 1
    if kept >> 8:  # carried into the next power of two
        kept >>= 1
        exp += 1
    return (sign << 15) | ((exp + 127) << 7) | (kept & 0x7F)


def run_ptx(text, inputs, n_out):
    """Execute the few PTX instructions the conversions use; registers hold uint32 values."""
    regs = {f"${n_out + i}": v for i, v in enumerate(inputs)}

    def val(tok):
        if tok.startswith("0f"):
            return int(tok[2:], 16)
        if tok.startswith("0x"):
            return int(tok, 16)
        if tok.isdigit():
            return int(tok)
        return regs[tok]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        a = [val(t) for t in src]
        if op == "mov.b32":
            r = a[0]
        elif op == "xor.b32":
            r = a[0] ^ a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "shr.b32":
            r = a[0] >> a[1]
        elif op == "prmt.b32":
            pool = a[0] | (a[1] << 32)
            r = 0
            for i in range(4):
                sel = (a[2] >> (4 * i)) & 0x7
                r |= ((pool >> (8 * sel)) & 0xFF) << (8 * i)
        elif op == "sub.f32":
            r = _bits32(np.float32(_f32(a[0])) - np.float32(_f32(a[1])))
        elif op == "sub.f16x2":
            lo = np.float16(_half(a[0] & 0xFFFF, "f16") - _half(a[1] & 0xFFFF, "f16"))
            hi = np.float16(_half(a[0] >> 16, "f16") - _half(a[1] >> 16, "f16"))
            r = _half_bits(lo, "f16") | (_half_bits(hi, "f16") << 16)
        elif op == "fma.rn.bf16x2":  # exact product and sum (float64), rounded once
            halves = [tuple(float(_half((v >> sh) & 0xFFFF, "bf16")) for v in a) for sh in (0, 16)]
            r = 0
            for i, (x, y, z) in enumerate(halves):
                r |= _bf16_bits_rne(x * y + z) << (16 * i)
        elif op == "dp4a.u32.s32":  # c + sum of unsigned bytes of a times signed bytes of b
            r = a[2] + sum(((a[0] >> (8 * i)) & 0xFF) * _int8((a[1] >> (8 * i)) & 0xFF)
                           for i in range(4))
        elif op == "cvt.rn.bf16x2.f32":  # d = {a -> upper half, b -> lower half}
            r = (_half_bits(_f32(a[0]), "bf16") << 16) | _half_bits(_f32(a[1]), "bf16")
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
        regs[d] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(n_out)]


def _words():
    # Every byte value in every lane: word i holds bytes i, i + 1, i + 2, i + 3 (mod 256).
    return [sum(((i + j) % 256) << (8 * j) for j in range(4)) for i in range(256)]


def _bytes(word):
    return [(word >> (8 * j)) & 0xFF for j in range(4)]


def _int8(byte):
    return struct.unpack("b", bytes([byte]))[0]


def _halves(regs):
    return [h for r in regs for h in (r & 0xFFFF, r >> 16)]


def test_ptx_int8_to_f32_matches_plain_form():
    for word in _words():
        out = run_ptx(qm._PTX_INT8_TO_F32, [word], 4)
        assert [float(_f32(r)) for r in out] == [float(_int8(b)) for b in _bytes(word)]


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_ptx_int8_to_16bit_matches_plain_form(dtype):
    text = qm._PTX_INT8_TO_BF16 if dtype == "bf16" else qm._PTX_INT8_TO_F16
    for word in _words():
        out = _halves(run_ptx(text, [word], 2))
        assert [float(_half(h, dtype)) for h in out] == [float(_int8(b)) for b in _bytes(word)]


@pytest.mark.parametrize("dtype,offset", [("bf16", 128), ("f16", 1024)])
def test_ptx_nibbles_match_plain_form(dtype, offset):
    text = qm._PTX_NIBBLES_TO_BF16 if dtype == "bf16" else qm._PTX_NIBBLES_TO_F16
    for word in _words():
        out = run_ptx(text, [word], 4)
        low, high = _halves(out[:2]), _halves(out[2:])
        assert [float(_half(h, dtype)) for h in low] == [offset + (b & 0xF) for b in _bytes(word)]
        assert [float(_half(h, dtype)) for h in high] == [offset + (b >> 4) for b in _bytes(word)]


@pytest.mark.parametrize("scale,m", [(0.0625, -0.5), (0.01171875, 0.0869140625),
                                     (3.0517578125e-05, -0.000457763671875)])
def test_ptx_nibbles_scaled_match_one_rounding(scale, m):
    """The PRESCALE conversion: every nibble of every byte lane becomes q * scale + m, rounded
    once to bfloat16, with scale and m in each element's own lane of the operand pairs."""
    assert _half(_half_bits(scale, "bf16"), "bf16") == scale and \
        _half(_half_bits(m, "bf16"), "bf16") == m  # exact bfloat16 operands
    # Elements 0-3 carry different (scale, m): 1, 2, 3, 4 times the given ones.
    scales = [_half_bits(scale * (i + 1), "bf16") for i in range(4)]
    ms = [_half_bits(m * (i + 1), "bf16") for i in range(4)]
    pairs = lambda h: [h[0] | h[1] << 16, h[2] | h[3] << 16]  # noqa: E731
    for word in _words():
        out = run_ptx(qm._PTX_NIBBLES_SCALED_BF16, [word] + pairs(scales) + pairs(ms), 4)
        low, high = _halves(out[:2]), _halves(out[2:])
        for i, byte in enumerate(_bytes(word)):
            s_i, m_i = _half(scales[i], "bf16"), _half(ms[i], "bf16")
            assert low[i] == _bf16_bits_rne(float(byte & 0xF) * float(s_i) + float(m_i))
            assert high[i] == _bf16_bits_rne(float(byte >> 4) * float(s_i) + float(m_i))


def test_ptx_dp4a_matches_plain_form():
    """The int4 GEMV's integer dot product: the PTX instruction (as the ISA defines it) against
    the plain Triton form's arithmetic, for every byte value in both operands' lanes."""
    def plain(a, b, c):  # `_dp4a`'s plain form, on Python ints
        total = c
        for i in range(4):
            b_i = ((b << (24 - 8 * i)) & 0xFFFFFFFF)
            b_i = (b_i - (1 << 32) if b_i >> 31 else b_i) >> 24  # arithmetic shift of an int32
            total += ((a >> (8 * i)) & 0xFF) * b_i
        return total
    words = _words()
    for a in words:
        for b in words[::17]:
            for c in (0, 12345, -(1 << 20)):
                got = run_ptx(qm._PTX_DP4A, [a, b, c & 0xFFFFFFFF], 1)[0]
                got = got - (1 << 32) if got >> 31 else got
                assert got == plain(a, b, c), (hex(a), hex(b), c)


def test_bf16_rounding_helper_rounds_to_nearest_even():
    assert _bf16_bits_rne(1.0) == 0x3F80 and _bf16_bits_rne(-2.0) == 0xC000
    assert _bf16_bits_rne(1.0 + 2**-8) == 0x3F80  # a tie: stays even
    assert _bf16_bits_rne(1.0 + 3 * 2**-8) == 0x3F82  # a tie: up to even
    assert _bf16_bits_rne(1.0 + 2**-8 + 2**-20) == 0x3F81  # past the tie
    assert _bf16_bits_rne(255.9) == 0x4380  # carries into 256


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (child process)
# ----------------------------------------------------------------------------------------------

N, K = 40, 96  # K = 96 leaves a ragged last tile for every BLOCK_K of 64

M1 = dict(BLOCK_N=16, BLOCK_K=64, STAGES=2, num_warps=4)
DOT = dict(BLOCK_N=16, SUB_K=16, K_SLICES=2, STAGES=2, num_warps=2)

# name -> (scheme, m, x dtype, group, config or None for the dequantize + matmul path, bias, K)
CASES = {}
for _scheme in ("int8", "fp8"):
    for _split in (1, 2):
        CASES[f"{_scheme}-m1-split{_split}"] = (_scheme, 1, "bf16", 0, {**M1, "SPLIT_K": _split},
                                                True, K)
        CASES[f"{_scheme}-m3-split{_split}"] = (_scheme, 3, "bf16", 0, {**DOT, "SPLIT_K": _split},
                                                True, K)
    CASES[f"{_scheme}-m1-evenK"] = (_scheme, 1, "bf16", 0, {**M1, "SPLIT_K": 1}, False, 128)
    CASES[f"{_scheme}-m2-fp16"] = (_scheme, 2, "fp16", 0, {**DOT, "SPLIT_K": 1}, False, K)
    CASES[f"{_scheme}-m5-evenK"] = (_scheme, 5, "bf16", 0, {**DOT, "SPLIT_K": 1}, True, 128)
    CASES[f"{_scheme}-m20-dequant"] = (_scheme, 20, "bf16", 0, None, True, K)
    CASES[f"{_scheme}-m1-dotkernel"] = (_scheme, 1, "bf16", 0, {**DOT, "SPLIT_K": 1, "kind": "dot"},
                                        True, K)
# The fp8 prefill GEMM with explicit small tiles: ragged K (BLOCK_K 64 against K = 96), M and N
# past the tiles, both 16-bit dtypes. The autotuned path runs in the fp8-m20-dequant case above.
GEMM = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, STAGES=2, num_warps=4, kind="gemm")
CASES["fp8-m20-gemm"] = ("fp8", 20, "bf16", 0, GEMM, True, K)
CASES["fp8-m33-gemm-fp16-evenK"] = ("fp8", 33, "fp16", 0, GEMM, False, 128)
CASES["fp8-m17-gemm-bk32"] = ("fp8", 17, "bf16", 0, {**GEMM, "BLOCK_K": 32}, True, K)
CASES["int8-m1-fp32"] = ("int8", 1, "fp32", 0, {**M1, "SPLIT_K": 1}, True, K)
for _group in (32, 64):
    for _m in (1, 3):
        for _split in (1, 2):
            CASES[f"int4-g{_group}-m{_m}-split{_split}"] = (
                "int4", _m, "bf16", _group,
                {**DOT, "SUB_K": _group, "K_SLICES": 2, "SPLIT_K": _split}, True, 3 * _group)
    CASES[f"int4-g{_group}-m2-fp16"] = ("int4", 2, "fp16", _group,
                                       {**DOT, "SUB_K": _group, "K_SLICES": 2, "SPLIT_K": 1}, False,
                                       2 * _group)
    CASES[f"int4-g{_group}-m20-dequant"] = ("int4", 20, "bf16", _group, None, True, 2 * _group)
# PRESCALE (weights scaled in registers, slices of several groups): K = 3 groups against tiles of
# 4 (a masked group), and an even K.
for _group in (32, 64, 128):
    _pre = {**DOT, "SUB_K": 2 * _group, "K_SLICES": 2, "PRESCALE": True}
    for _m in (1, 3):
        for _split in (1, 2):
            CASES[f"int4-g{_group}-m{_m}-split{_split}-prescale"] = (
                "int4", _m, "bf16", _group, {**_pre, "SPLIT_K": _split}, True, 3 * _group)
    CASES[f"int4-g{_group}-m2-evenK-prescale"] = ("int4", 2, "bf16", _group,
                                                 {**_pre, "SPLIT_K": 1}, False, 8 * _group)

# Dense 16-bit weights (and float32, which takes the m1 kernel for one row): ragged N and K.
for _split in (1, 2):
    CASES[f"dense-m1-split{_split}"] = ("dense", 1, "bf16", 0, {**M1, "SPLIT_K": _split}, True, K)
    CASES[f"dense-m3-split{_split}"] = ("dense", 3, "bf16", 0, {**DOT, "SPLIT_K": _split}, True, K)
CASES["dense-m1-evenK"] = ("dense", 1, "bf16", 0, {**M1, "SPLIT_K": 1}, False, 128)
CASES["dense-m1-fp16"] = ("dense", 1, "fp16", 0, {**M1, "SPLIT_K": 2}, True, K)
CASES["dense-m1-fp32"] = ("dense", 1, "fp32", 0, {**M1, "SPLIT_K": 2}, True, K)
CASES["dense-m3-fp16"] = ("dense", 3, "fp16", 0, {**DOT, "SPLIT_K": 1}, True, K)
CASES["dense-m5-evenK"] = ("dense", 5, "bf16", 0, {**DOT, "SPLIT_K": 1}, False, 128)
CASES["dense-m1-dotkernel"] = ("dense", 1, "bf16", 0, {**DOT, "SPLIT_K": 1, "kind": "dot"}, True, K)
CASES["dense-m20-cublas"] = ("dense", 20, "bf16", 0, None, True, K)
CASES["dense-m3-fp32-cublas"] = ("dense", 3, "fp32", 0, None, True, K)

# Every autotuned int4 config of the tensor-core kernel (the batch ones too), run on one row of x,
# K split in two: K = 2048 is two tiles of the largest BLOCK_K (1024) and even for all; K = 2176
# (17 * 128) is ragged for all.
# (The GPU once got G = 64 wrong here at M = 1, from a Triton miscompilation the interpreter does
# not share: see test_dot_kernel_mma_accumulators_stay_apart; these check the arithmetic.)
if qm.HAS_TRITON:
    for _group in (32, 64, 128):
        for _i, _c in enumerate(qm._make_configs(qm.INT4, "dot", _group, prescale=True)):
            for _k in (2048, 2176):
                CASES[f"int4-g{_group}-tuned{_i}-m1-k{_k}-split2"] = (
                    "int4", 1, "bf16", _group,
                    {**_c.kwargs, "SPLIT_K": 2, "num_warps": _c.num_warps}, False, _k)

OP_CASES = {f"op-{scheme}-m{m}": (scheme, m)
            for scheme in ("int8", "fp8", "int4", "dense") for m in (1, 3)}

# The fusions (RMSNorm / SiLU-multiply prologue, residual epilogue) in both kernels, with and
# without split-K (the norm's sums of squares cross the split), ragged and even K.
# name -> (scheme, m, fusion kind, group, config, K)
FUSION_CASES = {}
for _scheme in ("int8", "fp8", "dense", "int4"):
    _group = 32 if _scheme == "int4" else 0
    _dot = {**DOT, "SUB_K": 32, "K_SLICES": 2} if _scheme == "int4" else DOT
    for _kind in ("norm", "swiglu", "residual", "norm+swiglu"):
        for _split in (1, 2):
            if _scheme != "int4":
                FUSION_CASES[f"{_scheme}-m1-{_kind}-split{_split}"] = (
                    _scheme, 1, _kind, _group, {**M1, "SPLIT_K": _split}, K)
            FUSION_CASES[f"{_scheme}-m3-{_kind}-split{_split}"] = (
                _scheme, 3, _kind, _group, {**_dot, "SPLIT_K": _split}, K)
    FUSION_CASES[f"{_scheme}-m2-norm+residual-evenK"] = (
        _scheme, 2, "norm+residual", _group, {**_dot, "SPLIT_K": 2}, 128)
    FUSION_CASES[f"{_scheme}-m20-norm-unfused"] = (_scheme, 20, "norm", _group, None, K)
    FUSION_CASES[f"{_scheme}-m20-norm+swiglu-unfused"] = (_scheme, 20, "norm+swiglu", _group,
                                                          None, K)
    FUSION_CASES[f"{_scheme}-m2-swiglu+residual-evenK"] = (
        _scheme, 2, "swiglu+residual", _group, {**_dot, "SPLIT_K": 1}, 128)
    # The norm without a weight (a folded norm: PROLOGUE 2), in both kernels and around cuBLAS.
    for _split in (1, 2):
        if _scheme != "int4":
            FUSION_CASES[f"{_scheme}-m1-unitnorm+swiglu-split{_split}"] = (
                _scheme, 1, "unitnorm+swiglu", _group, {**M1, "SPLIT_K": _split}, K)
        FUSION_CASES[f"{_scheme}-m3-unitnorm-split{_split}"] = (
            _scheme, 3, "unitnorm", _group, {**_dot, "SPLIT_K": _split}, K)
    FUSION_CASES[f"{_scheme}-m20-unitnorm+swiglu-unfused"] = (_scheme, 20, "unitnorm+swiglu",
                                                              _group, None, K)
for _kind in ("norm", "swiglu", "norm+swiglu", "norm+residual"):
    FUSION_CASES[f"dense-m1-{_kind}-evenK"] = ("dense", 1, _kind, 0, {**M1, "SPLIT_K": 2}, 128)
_pre = {**DOT, "SUB_K": 64, "K_SLICES": 2, "PRESCALE": True}
FUSION_CASES["int4-m1-norm+swiglu-split2-prescale"] = ("int4", 1, "norm+swiglu", 32,
                                                        {**_pre, "SPLIT_K": 2}, K)
FUSION_CASES["int4-m3-norm+residual-evenK-prescale"] = ("int4", 3, "norm+residual", 32,
                                                         {**_pre, "SPLIT_K": 1}, 128)

# int4's one-row integer GEMV (`_int4_x_kernel` + `_int4_dp4a_kernel`): name -> (group, K,
# fusion kind, config or None to autotune, x dtype). The small tile (16 words = 128 columns) at
# K = 96 / 192 / 640 leaves a ragged last tile with whole groups masked; 384 is even.
DP4A = dict(BLOCK_N=8, BLOCK_W=16, STAGES=2, num_warps=4)
DP4A_CASES = {}
for _group, _k in ((32, 96), (64, 192), (128, 384), (128, 640)):
    for _kind in ("plain", "norm", "swiglu", "residual", "norm+swiglu", "norm+residual"):
        DP4A_CASES[f"dp4a-g{_group}-k{_k}-{_kind}"] = (_group, _k, _kind, DP4A, "bf16")
DP4A_CASES["dp4a-g32-k96-fp16"] = (32, 96, "plain", DP4A, "fp16")
DP4A_CASES["dp4a-g32-k96-fp32-norm"] = (32, 96, "norm", DP4A, "fp32")
DP4A_CASES["dp4a-g64-k192-tuned-norm+swiglu"] = (64, 192, "norm+swiglu", None, "bf16")
DP4A_CASES["dp4a-g128-k640-wide"] = (128, 640, "plain", dict(DP4A, BLOCK_W=32, BLOCK_N=16), "bf16")
# x's preparation in programs of 1024 columns: with the RMSNorm, the GEMV's 1 / rms comes from
# the sums of squares of three programs (the last ragged).
DP4A_CASES["dp4a-g32-k2080-norm+residual"] = (32, 2080, "norm+residual", DP4A, "bf16")
DP4A_CASES["dp4a-g128-k2304-norm+swiglu"] = (128, 2304, "norm+swiglu", DP4A, "bf16")
# An int4 Linear's integer GEMV also preparing the next one's input (`_feed_prepare`): name ->
# (the producer's group, the consumer's group, the consumer's width = the producer's outputs,
# config or None to autotune through the dispatcher, the producer's fusion, whether the
# consumer has an RMSNorm). gate_up for down (SwiGLU); o or down for gate_up, qkv or the head
# (a residual, the consumer's norm). Widths past one chunk of 1024 outputs, the last ragged.
FEED_CASES = {"feed-g32-g32-w1280": (32, 32, 1280, DP4A, "norm+swiglu", False),
              "feed-g32-g128-w1152-bn16": (32, 128, 1152, dict(DP4A, BLOCK_N=16), "norm+swiglu",
                                           False),
              "feed-g64-g64-w1088-tuned": (64, 64, 1088, None, "norm+swiglu", False),
              "feed-g32-g64-w1088-norm": (32, 64, 1088, DP4A, "residual", True),
              "feed-g128-g32-w1056-norm-tuned": (128, 32, 1056, None, "norm+residual", True)}

# A decode MLP in one launch (`_mlp_m1_kernel`): name -> (dim, ffn, outputs, config or None to
# autotune through the dispatcher's op). Each case runs three launches in a row, so the tag the
# hidden vector is handed over under flips between them; ffn 72 leaves ragged tiles in both phases.
MLP = dict(BLOCK_N1=8, BLOCK_K1=32, BLOCK_N2=8, BLOCK_K2=32, STAGES=2)
MLP_CASES = {"mlp-d64-f128": (64, 128, 64, MLP),
             "mlp-d48-f72-n40-ragged": (48, 72, 40, dict(MLP, BLOCK_N1=4, BLOCK_K2=64)),
             "mlp-d64-f96-tuned": (64, 96, 64, None),
             "mlp-d64-f128-fp16": (64, 128, 64, dict(MLP, BLOCK_N2=4)),
             # the norm without a weight (folded into gate_up: PROLOGUE 2)
             "mlp-d64-f96-n48-unitnorm": (64, 96, 48, MLP),
             # the op on a card the launch is off for: the two GEMVs, no count
             "mlp-d64-f80-tuned-launch-off": (64, 80, 64, None)}

# The standalone RMSNorm kernel (the tensor-core kernels' norm, on CUDA): name -> (M, K, x dtype,
# weight dtype). K = 96 leaves a masked tail of the row's block; a float32 weight promotes.
NORM_CASES = {"norm-m1-k96-bf16": (1, 96, "bf16", "bf16"),
              "norm-m3-k4096-bf16": (3, 4096, "bf16", "bf16"),
              "norm-m2-k96-fp16-f32weight": (2, 96, "fp16", "fp32"),
              "norm-m2-k96-bf16-noweight": (2, 96, "bf16", "none")}

# Relative error against float64 is the rounding of the output to x's dtype; the interpreter
# truncates float32 -> bfloat16 (the GPU rounds to nearest), about 3.5e-3 instead of 1.7e-3.
TOLERANCE = {"bf16": 8e-3, "fp16": 2e-3, "fp32": 1e-5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCHEMES = {"int8": qm.INT8, "fp8": qm.FP8, "int4": qm.INT4, "dense": qm.DENSE}


def _interpreter_child():
    """Run every case of CASES with the Triton interpreter; print one JSON object of results."""
    patch_interpreter()
    # Autotuning on CPU tensors: timing means nothing here, so every config is run once and the
    # first is kept.
    qm._tuning_bench = lambda fn, quantiles: (fn(), [1.0] * len(quantiles))[1]
    def case(name, scheme, m, dtype, group, config, with_bias, k):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        x = torch.randn(m, k, generator=gen).to(DTYPES[dtype])
        bias = torch.randn(N, generator=gen).to(DTYPES[dtype]) if with_bias else None
        weights, scale, zero = make_weights(scheme, N, k, group, gen, DTYPES[dtype])
        if config is None:
            out = qm._triton_linear(SCHEMES[scheme], x, weights[0], scale, zero, group, bias)
        else:
            config = dict(config)
            kind = config.pop("kind", None)
            if kind == "gemm":
                out = qm._gemm(x, weights[0], scale, bias, config)
            else:
                out = qm._gemv(SCHEMES[scheme], x, weights[0], scale, zero, group, bias,
                               config, kind)
        counters = int(qm.split_counters(x.device).abs().sum())
        return {"rel": rel_err(out, oracle(scheme, x, weights, group, bias)),
                "dtype": str(out.dtype), "shape": list(out.shape),
                "finite": bool(torch.isfinite(out).all()), "counters": counters}

    def fusion_case(name, scheme, m, kind, group, config, k):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        x, fusion = make_fusion_inputs(kind, m, N, k, torch.bfloat16, gen)
        bias = torch.randn(N, generator=gen).to(torch.bfloat16)
        weights, scale, zero = make_weights(scheme, N, k, group, gen, torch.bfloat16)
        if config is None:
            out = qm._triton_linear(SCHEMES[scheme], x, weights[0], scale, zero, group, bias,
                                    fusion)
        else:
            out = qm._gemv(SCHEMES[scheme], x, weights[0], scale, zero, group, bias,
                           dict(config), fusion=fusion)
        counters = int(qm.split_counters(x.device).abs().sum())
        want = fused_oracle(scheme, x, weights, group, bias, fusion)
        return {"rel": rel_err(out, want), "dtype": str(out.dtype),
                "shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
                "counters": counters}

    def norm_case(name, m, k, dtype, wdtype):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        x = (3 * torch.randn(m, k, generator=gen)).to(DTYPES[dtype])
        if wdtype == "none":  # no weight: an empty one (a folded norm)
            weight = torch.empty(0, dtype=x.dtype)
        else:
            weight = (torch.rand(k, generator=gen) + 0.5).to(DTYPES[wdtype])
        out = qm.rms_norm_triton(x, weight, EPS)
        want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + EPS)
        if weight.numel():
            want = want * weight.double()
        return {"rel": rel_err(out, want), "dtype": str(out.dtype),
                "shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
                "counters": 0,
                "same_as_ref": rel_err(out, qm.rms_norm_ref(x, weight, EPS).double())}

    def op_case(name, scheme, m):
        """The custom ops (what the CUDA dispatch calls) on CPU tensors, through the autotuner."""
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        x = torch.randn(m, 64, generator=gen).to(torch.bfloat16)
        if scheme == "int4":
            weights = make_int4(24, 64, 32, gen)
            out = torch.ops.tachylm.int4_linear(x, *weights, 32, None)
        elif scheme == "dense":
            weights = make_dense(24, 64, gen)
            out = torch.ops.tachylm.dense_linear(x, *weights, None)
        else:
            weights = (make_int8 if scheme == "int8" else make_fp8)(24, 64, gen)
            out = getattr(torch.ops.tachylm, f"{scheme}_linear")(x, *weights, None)
        return {"rel": rel_err(out, oracle(scheme, x, weights, 32)),
                "dtype": str(out.dtype), "shape": list(out.shape),
                "finite": bool(torch.isfinite(out).all()), "counters": 0}

    def dp4a_case(name, group, k, kind, config, dtype):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        kind = "" if kind == "plain" else kind
        x, fusion = make_fusion_inputs(kind, 1, N, k, DTYPES[dtype], gen)
        x[0, 5] *= 40  # an outlier: its group's scale is set by it
        q, scale, zero = make_int4(N, k, group, gen)
        scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
        bias = torch.randn(N, generator=gen).to(DTYPES[dtype])
        packed = qm.pack_scale_zero(scale, zero)
        if config is None:  # through the dispatcher, as the custom op runs it
            out = qm._triton_linear(qm.INT4, x, q, scale, zero, group, bias, fusion, packed)
        else:
            out = qm._int4_dp4a_gemv(x, q, packed, group, bias, fusion, dict(config))
        want = fused_oracle("int4", x, (q, scale, zero), group, bias, fusion)
        return {"rel": rel_err(out, want), "dtype": str(out.dtype), "shape": list(out.shape),
                "finite": bool(torch.isfinite(out).all()), "counters": 0}

    def feed_case(name, group, down_group, width, config, kind, down_norm):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        n = 2 * width if "swiglu" in kind else width
        x, fusion = make_fusion_inputs(kind, 1, n, 128, torch.bfloat16, gen)
        q, scale, zero = make_int4(n, 128, group, gen)
        scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
        packed = qm.pack_scale_zero(scale, zero)
        link = qm.input_link(qm.link_int4(width, down_group))
        # the consumer: its weights, and its RMSNorm if it has one
        dq, dscale, dzero = make_int4(24, width, down_group, gen)
        dscale, dzero = dscale.to(torch.bfloat16), dzero.to(torch.bfloat16)
        dpacked = qm.pack_scale_zero(dscale, dzero)
        dfusion = qm.make_fusion(((torch.rand(width, generator=gen) + 0.5).to(torch.bfloat16),
                                  1e-5) if down_norm else None)

        def produce():
            if config is None:  # through the dispatcher, as the custom op runs it
                return qm._triton_linear(qm.INT4, x, q, scale, zero, group, None, fusion, packed,
                                         feed=link.id)
            return qm._int4_dp4a_gemv(x, q, packed, group, None, fusion, dict(config), feed=link)

        def consume(h):
            return qm._triton_linear(qm.INT4, h, dq, dscale, dzero, down_group, None, dfusion,
                                     dpacked, fed=link.id)

        result = {}
        if down_norm:  # the first handoff has no norm: refused, and the consumer's norm noted
            consume(produce())
            result["first_taken"] = link.taken
        fed = produce()
        own = qm._int4_dp4a_gemv(x, q, packed, group, None, fusion, dict(config or DP4A))
        counters = link.tags(x.device)
        # the consumer's GEMV on the prepared output, and on a copy it must prepare itself
        before = link.taken
        linked = consume(fed)
        taken = link.taken - before
        unlinked = consume(fed.clone())
        want = fused_oracle("int4", x, (q, scale, zero), group, None, fusion)
        return {**result, "rel": rel_err(fed, want), "same_bits": torch.equal(fed, own),
                "down_same_bits": torch.equal(linked, unlinked), "taken": taken,
                "taken_after": link.taken - before, "counters": int(counters.abs().sum()),
                "shape": list(fed.shape), "finite": bool(torch.isfinite(fed).all())}

    def packed_op_case(name):
        """The int4 custom op given the packed scales: one row takes the integer GEMV."""
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        x = torch.randn(1, 64, generator=gen).to(torch.bfloat16)
        q, scale, zero = make_int4(24, 64, 32, gen)
        scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
        out = torch.ops.tachylm.int4_linear(x, q, scale, zero, 32, None,
                                            scale_zero=qm.pack_scale_zero(scale, zero))
        return {"rel": rel_err(out, oracle("int4", x, (q, scale, zero), 32)),
                "dtype": str(out.dtype), "shape": list(out.shape),
                "finite": bool(torch.isfinite(out).all()), "counters": 0}

    def mlp_case(name, *args):
        # the op takes the kernel on any device (by default, an H100's), or never; the default
        # is restored for the cases after
        qm.use_mlp_launch(not name.endswith("launch-off"))
        try:
            return mlp_launch_case(name, *args)
        finally:
            qm.use_mlp_launch(None)

    def mlp_launch_case(name, dim, ffn, n_out, config):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        dtype = torch.float16 if name.endswith("fp16") else torch.bfloat16
        (gate_up,), (down,) = make_dense(2 * ffn, dim, gen, dtype), make_dense(n_out, ffn, gen,
                                                                               dtype)
        norm_weight = (torch.rand(dim, generator=gen) + 0.5).to(dtype)
        if name.endswith("unitnorm"):
            norm_weight = norm_weight[:0]
        errors, twins = [], []
        for _ in range(3):
            x = 3 * torch.randn(1, dim, generator=gen).to(dtype)
            residual = torch.randn(1, n_out, generator=gen).to(dtype)
            if config is None:
                out = torch.ops.tachylm.dense_mlp(x, gate_up, down, norm_weight, EPS, residual)
            else:
                out = qm._mlp_gemv(x, gate_up, down, norm_weight, EPS, residual, dict(config))
            up = qm.make_fusion((norm_weight, EPS), True, None)
            hidden = fused_oracle("dense", x, (gate_up,), 0, None, up).to(dtype)
            want = fused_oracle("dense", hidden, (down,), 0, None,
                                qm.make_fusion(None, False, residual))
            errors.append(rel_err(out, want))
            # the two kernels it replaces
            two = qm._triton_linear(qm.DENSE, x, gate_up, None, None, 0, None, up)
            two = qm._triton_linear(qm.DENSE, two, down, None, None, 0, None,
                                    qm.make_fusion(None, False, residual))
            twins.append(rel_err(out, two.double()))
            finite = bool(torch.isfinite(out).all())
        counts = qm._mlp_buffers(x.device, ffn, n_out, config)[1]
        consumers = None if config is None else -(-n_out // config["BLOCK_N2"])
        return {"rel": max(errors), "twin": max(twins), "finite": finite,
                "shape": list(out.shape), "counts": counts.tolist(), "consumers": consumers,
                "dtype": str(out.dtype)}

    # a case that raises is reported to its parent test, which fails with the message
    results = {}
    for run, cases in ((case, CASES), (fusion_case, FUSION_CASES), (norm_case, NORM_CASES),
                       (op_case, OP_CASES), (dp4a_case, DP4A_CASES), (feed_case, FEED_CASES),
                       (mlp_case, MLP_CASES),
                       (packed_op_case, {"op-int4-m1-packed": ()})):
        results.update({name: outcome(run, name, *args) for name, args in cases.items()})
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    return run_child(__file__)


@pytest.mark.parametrize("name", list(CASES) + list(OP_CASES) + list(FUSION_CASES)
                         + list(NORM_CASES) + list(DP4A_CASES) + ["op-int4-m1-packed"]
                         + list(FEED_CASES) + list(MLP_CASES))
def test_triton_kernel_interpreted(interpreted, name):
    result = interpreted[name]
    assert "error" not in result, result.get("error")
    if name in MLP_CASES:
        # Three launches, each against float64 and the two kernels it replaces: a hidden value
        # taken under the wrong tag would be a NaN. down's programs counted themselves in.
        dim, ffn, n_out, config = MLP_CASES[name]
        dtype = "fp16" if name.endswith("fp16") else "bf16"
        assert result["shape"] == [1, n_out] and result["finite"], result
        assert result["dtype"] == str(DTYPES[dtype]), result
        assert result["rel"] < 2 * TOLERANCE["bf16"] and result["twin"] < 5e-3, result
        if config is not None:
            assert result["counts"] == [3 * result["consumers"]], result
        elif name.endswith("launch-off"):
            assert sum(result["counts"]) == 0, result
        else:  # autotuning ran each config once before the three calls of the first
            assert sum(result["counts"]) > 0, result
        return
    if name in FEED_CASES:
        # the producer's output is the same bits with the feed programs as without; the
        # consumer took the prepared output once and computed the bits it computes from its own
        # preparation (of a copy, which it must not take it for); the tagged words are zero
        # again. A consumer with an RMSNorm refused the first handoff, prepared without it.
        width = FEED_CASES[name][2]
        assert result["shape"] == [1, width] and result["finite"]
        assert result["rel"] < 2 * max(TOLERANCE["bf16"], 2e-4), result
        assert result["same_bits"] and result["down_same_bits"], result
        assert (result["taken"], result["taken_after"], result["counters"]) == (1, 1, 0), result
        assert result.get("first_taken", 0) == 0, result
        return
    if name in DP4A_CASES or name == "op-int4-m1-packed":
        group, k, kind, config, dtype = DP4A_CASES.get(name, (32, 64, "plain", None, "bf16"))
        n = N // 2 if "swiglu" in kind else (N if name in DP4A_CASES else 24)
        assert result["shape"] == [1, n]
        assert result["dtype"] == str(DTYPES[dtype])
        assert result["finite"], "an output element was not written or is not finite"
        # x as 16-bit integers per group adds ~1e-5 (relative to the group's largest value) to
        # the rounding of the output; SiLU(gate) * up doubles the bound, as above
        tolerance = max(TOLERANCE[dtype], 2e-4) * (2 if "swiglu" in kind else 1)
        assert result["rel"] < tolerance, result
        return
    if name in NORM_CASES:
        m, k, dtype, wdtype = NORM_CASES[name]
        assert result["shape"] == [m, k]
        wtype = DTYPES[dtype] if wdtype == "none" else DTYPES[wdtype]
        assert result["dtype"] == str(torch.promote_types(DTYPES[dtype], wtype))
        assert result["finite"]
        # x / rms is rounded to x's dtype before the weight, as the reference does: one rounding
        # (twice the bound: the interpreter truncates), and no more than that from the reference
        assert result["rel"] < 2 * TOLERANCE[dtype], result
        assert result["same_as_ref"] < 2 * TOLERANCE[dtype], result
        return
    if name in CASES:
        _, m, dtype = CASES[name][:3]
        n = N
    elif name in FUSION_CASES:
        m, dtype = FUSION_CASES[name][1], "bf16"
        n = N // 2 if "swiglu" in FUSION_CASES[name][2] else N
    else:
        (_, m), dtype, n = OP_CASES[name], "bf16", 24
    assert result["shape"] == [m, n]
    assert result["dtype"] == str(DTYPES[dtype])
    assert result["finite"], "an output element was not written or is not finite"
    tolerance = TOLERANCE[dtype]
    if name in FUSION_CASES and "swiglu" in FUSION_CASES[name][2]:
        # SiLU(gate) * up multiplies two results that the interpreter's truncation biases the
        # same way (towards zero), so their relative errors add: twice the single-product bound.
        tolerance *= 2
    config = (CASES.get(name) or FUSION_CASES.get(name) or (None,) * 5)[4]
    if config and config.get("PRESCALE"):
        # PRESCALE rounds each weight to bfloat16 before the product, as the reference's
        # F.linear does; truncated here like the output, towards zero: again twice the bound.
        tolerance *= 2
    assert result["rel"] < tolerance, result
    assert result["counters"] == 0, "split-K counters were not reset"


# ----------------------------------------------------------------------------------------------
# The tensor-core kernel compiled for an H100 (no GPU needed): MMA accumulators
# ----------------------------------------------------------------------------------------------

def _mma_chains(llir):
    """(MMA count, chains started from zero, faults) of the m16n8k16 MMAs in LLVM IR.

    Each MMA's accumulator input must be four zeros (a chain's first K step) or the four results,
    in order, of one earlier MMA that feeds no other MMA.
    """
    extracts = {m.group(1): (m.group(2), int(m.group(3))) for m in re.finditer(
        r"(%[\w.]+) = extractvalue \{ float, float, float, float \} (%[\w.]+), (\d)", llir)}
    calls = re.findall(r"(%[\w.]+) = tail call \{ float, float, float, float \} asm sideeffect "
                       r"\"mma\.sync[^\"]*\", \"[^\"]*\"\(([^)]*)\)", llir)
    zero_starts, faults, fed = 0, [], set()
    for name, operands in calls:
        acc = [op.split()[1] for op in operands.split(", ")[:4]]
        if all(v == "0.000000e+00" for v in acc):
            zero_starts += 1
            continue
        sources = [extracts.get(v) for v in acc]
        if None in sources or len({s[0] for s in sources}) != 1 or \
                [s[1] for s in sources] != [0, 1, 2, 3] or sources[0][0] in fed:
            faults.append(f"{name} accumulates onto {acc}")
        else:
            fed.add(sources[0][0])
    return len(calls), zero_starts, faults


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_split_k_candidates():
    """Autotuning candidates on a 132-SM GPU for a 4096 x 4096 weight: each config with the
    heuristic's split (the largest); int4 also with every smaller power of two."""
    n = k = 4096
    for scheme, smaller in ((qm.INT8, False), (qm.INT4, True)):
        configs = qm._make_configs(scheme, "m1" if scheme == qm.INT8 else "dot", 128)
        split = qm._with_split(configs, n, k, 132, smaller)
        for c in configs:
            top = qm._choose_split_k(-(-n // c.kwargs["BLOCK_N"]), -(-k // qm._block_k(c.kwargs)),
                                     132)
            got = sorted(d.kwargs["SPLIT_K"] for d in split
                         if {**d.kwargs, "SPLIT_K": 0} == {**c.kwargs, "SPLIT_K": 0}
                         and d.num_warps == c.num_warps)
            want = [2 ** i for i in range(top.bit_length()) if 2 ** i <= top] if smaller else [top]
            assert got == want, (scheme, c, got, want)
        if smaller:
            assert any(d.kwargs["SPLIT_K"] > 1 for d in split)  # the shape does get split


def _nvidia_backend():
    if not HAS_TRITON:
        return False
    import triton.backends
    return "nvidia" in triton.backends.backends


def _compile_sm90(fn, meta: dict, num_warps: int, num_stages: int, w_type: str = "*u8"):
    """Compile a GEMV kernel for an H100 (sm_90) without a GPU, specialized as the launcher
    specializes K = 4096: aligned pointers, K and strides divisible by 16."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    # Constexpr parameters with defaults (PRESCALE) keep them unless meta gives them.
    defaults = {name: p.default for name, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    meta = {**defaults, **meta}
    signature = {name: "i32" for name in fn.arg_names}
    types = {"x_ptr": "*bf16", "w_ptr": w_type, "s_ptr": "*fp32", "z_ptr": "*fp32",
             "b_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
             "g_ptr": "*bf16", "r_ptr": "*bf16", "eps": "fp32"}
    signature.update({name: t for name, t in types.items() if name in signature})
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("K", "stride_xm", "stride_wn",
                                                                       "stride_sn", "stride_om")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    sig = dict(signature, **{name: "constexpr" for name in meta})
    return triton.compile(triton.compiler.ASTSource(fn, sig, meta, attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton with its NVIDIA backend")
@pytest.mark.parametrize("group", [32, 128])
def test_int4_dp4a_kernels_compile_for_sm90(group):
    """int4's one-row integer GEMV lowers for an H100 at every autotuned config with every
    epilogue (its dp4a instructions in the PTX), and so does the kernel that prepares x, with
    and without the RMSNorm."""
    import triton
    from triton.backends.compiler import GPUTarget

    def compile_(fn, types, meta, num_warps, num_stages):
        sig = {name: types.get(name, "i32") for name in fn.arg_names}
        sig.update({name: "constexpr" for name in meta})
        aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("KW", "K", "stride_wn",
                                                                          "stride_sn", "stride_x")]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        return triton.compile(triton.compiler.ASTSource(fn, sig, meta, attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))

    types = {"xw_ptr": "*i32", "xs_ptr": "*fp32", "sx_ptr": "*fp32", "ss_ptr": "*fp32",
             "w_ptr": "*i32", "sz_ptr": "*i32", "b_ptr": "*bf16", "r_ptr": "*bf16",
             "out_ptr": "*bf16", "fw_ptr": "*i32", "fs_ptr": "*fp32", "fsx_ptr": "*fp32",
             "fss_ptr": "*fp32", "fg_ptr": "*bf16", "tag_ptr": "*i32", "eps": "fp32"}
    for bn, bw, nw, st in qm._DP4A_CONFIGS:
        # the last two: the output also prepared for the next Linear by the feed programs (as
        # gate_up for down, and as o or down for a Linear with an RMSNorm)
        for norm, swiglu, residual, feed, feed_norm in (
                (False, False, False, 0, False), (True, True, True, 0, False),
                (True, True, False, group, False), (False, False, True, group, True)):
            meta = dict(GROUP=group, NORM=norm, HAS_BIAS=True, SWIGLU=swiglu,
                        HAS_RESIDUAL=residual, FAST=True, PDL=True, BLOCK_N=bn, BLOCK_W=bw,
                        STAGES=st, EVEN_K=True, GROUPS_P2=4096 // group, FEED_GROUP=feed,
                        FEED_NORM=feed_norm)
            ptx = compile_(qm._int4_dp4a_kernel, types, meta, nw, st).asm["ptx"]
            assert ptx.count("dp4a.u32.s32") > 0
            # the feed programs read the tagged outputs through to L2 until they are all there
            assert ("ld.volatile.global" in ptx) == bool(feed)
    prep_types = {"x_ptr": "*bf16", "g_ptr": "*bf16", "xw_ptr": "*i32", "xs_ptr": "*fp32",
                  "sx_ptr": "*fp32", "ss_ptr": "*fp32"}
    for norm in (True, False):
        meta = dict(GROUP=group, BLOCK_G=1024 // group, NORM=norm, PDL=True)
        kernel = compile_(qm._int4_x_kernel, prep_types, meta, 4, 1)
        assert "st.global" in kernel.asm["ptx"]


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton with its NVIDIA backend")
def test_mlp_kernel_compiles_for_sm90_with_both_loops_pipelined():
    """`_mlp_m1_kernel` at each config lowers for an H100 with the weights of
    both phases software-pipelined (the tag wait is asm, not a nested loop, which Triton would
    not pipeline) and the wait's volatile reads in the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    fn = qm._mlp_m1_kernel
    types = {"x_ptr": "*bf16", "g_ptr": "*bf16", "w1_ptr": "*bf16", "w2_ptr": "*bf16",
             "r_ptr": "*bf16", "out_ptr": "*bf16", "tag_ptr": "*i32", "cnt_ptr": "*i64",
             "eps": "fp32"}
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("K1", "stride_w1",
                                                                      "stride_w2")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    for slot, (bn1, bk1, bn2, bk2, nw, st) in enumerate(qm._MLP_DENSE_CONFIGS):
        for even in (True, False):
            meta = dict(FAST=True, PDL=True, PROLOGUE=1 + even, BLOCK_N1=bn1, BLOCK_K1=bk1,
                        BLOCK_N2=bn2, BLOCK_K2=bk2, STAGES=st, SLOT=slot, EVEN_K1=even,
                        EVEN_K2=even)
            sig = {name: types.get(name, "i32") for name in fn.arg_names}
            sig.update({name: "constexpr" for name in meta})
            kernel = triton.compile(triton.compiler.ASTSource(fn, sig, meta, attrs),
                                    target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=nw, num_stages=st))
            ptx = kernel.asm["ptx"]
            # two pipelined loops: async copies committed in each, several stages deep
            commits = ptx.count("cp.async.commit_group")
            assert commits >= 2 * (st - 1), (meta, commits)
            assert "ld.volatile.global.b32" in ptx and "atom.global" in ptx


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton with its NVIDIA backend")
@pytest.mark.parametrize("kind", ["m1", "dot"])
def test_swiglu_epilogue_compiles_for_sm90(kind):
    """The SwiGLU epilogue (reshape, permute, split of the accumulator) lowers for an H100, with
    every other fusion and split-K, for each autotuned config; the interpreter checks values but
    not the GPU layouts."""
    scheme = qm.INT8 if kind == "m1" else qm.INT4
    fn = qm._qgemv_m1_kernel if kind == "m1" else qm._qgemv_dot_kernel
    for c in qm._make_configs(scheme, kind, 128):
        meta = dict(c.kwargs, SPLIT_K=2, EVEN_K=True, SCHEME=scheme, HAS_BIAS=True, FAST=True,
                    PROLOGUE=1, SWIGLU=True, HAS_RESIDUAL=True, PDL=False)
        if kind == "dot":
            meta.update(GROUP=128, M_P2=2)
        kernel = _compile_sm90(fn, meta, c.num_warps, c.num_stages)
        assert "ex2.approx" in kernel.asm["ptx"]  # the sigmoid's exponential is there


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton with its NVIDIA backend")
def test_prefill_gemm_takes_hopper_mma_with_the_weight_in_registers():
    """Every autotuned config of the fp8 prefill GEMM lowers for an H100 to wgmma with the
    converted weight tile as its register operand: never written back to memory."""
    for c in qm._tuned_kernel(qm.FP8, "gemm", 0).configs:
        meta = dict(c.kwargs, EVEN_K=True, SCHEME=qm.FP8, HAS_BIAS=True, FAST=True)
        kernel = _compile_sm90(qm._qgemm_kernel, meta, c.num_warps, c.num_stages, "*fp8e4nv")
        dots = [line for line in kernel.asm["ttgir"].splitlines() if "ttng.warp_group_dot " in line]
        assert dots, f"{c}: no wgmma"
        assert all("dot_op<{opIdx = 0" in line.split("*")[0] for line in dots), c


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton with its NVIDIA backend")
@pytest.mark.parametrize("group", qm.INT4_GROUP_SIZES)
def test_dot_kernel_mma_accumulators_stay_apart(group):
    """Every autotuned int4 config, compiled for sm_90 as the launch for one row of x makes it.

    Triton 3.6 lowers a batched tl.dot whose result has one column (BLOCK_M = 1) with the
    accumulators of a warp's second slice overlapping its first slice's (see qm._pads_m):
    int4 with G = 64 came out with a relative error of ~7 on an H100 while the interpreter was
    right. Each (slice of a warp, 16 rows, 8 columns) tile must be its own chain of G / 16 MMAs
    that starts from zero.
    """
    failures = {}
    for c in qm._make_configs(qm.INT4, "dot", group, one_row=True):
        meta = dict(c.kwargs, SPLIT_K=2, EVEN_K=True, SCHEME=qm.INT4, GROUP=group, HAS_BIAS=False,
                    FAST=True, M_P2=1, PROLOGUE=0, SWIGLU=False, HAS_RESIDUAL=False,
                    PDL=False)
        block_m = 2 if c.kwargs["PAD_M"] else 1
        assert c.kwargs["PAD_M"] == (c.kwargs["K_SLICES"] > c.num_warps)
        kernel = _compile_sm90(qm._qgemv_dot_kernel, meta, c.num_warps, c.num_stages)
        n_mma, zero_starts, faults = _mma_chains(kernel.asm["llir"])
        per_warp = max(1, c.kwargs["K_SLICES"] // c.num_warps)
        chains = per_warp * (c.kwargs["BLOCK_N"] // 16) * -(-block_m // 8)
        if faults or zero_starts != chains or n_mma != chains * (group // 16):
            failures[f"{ {k: meta[k] for k in c.kwargs} } num_warps={c.num_warps} "
                     f"BLOCK_M={block_m}"] = (
                f"{n_mma} MMAs, {zero_starts} chains from zero (want {chains}); {faults[:2]}")
    assert not failures, failures


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton with its NVIDIA backend")
@pytest.mark.parametrize("group", qm.INT4_GROUP_SIZES)
def test_prescale_configs_compile_for_sm90(group):
    """Every PRESCALE config lowers for an H100: the nibbles become weights through the packed
    bfloat16 FMAs, and the MMAs are one chain of SUB_K / 16 steps per (slice of a warp, 16 rows,
    8 columns) in each tile."""
    configs = [c for c in qm._make_configs(qm.INT4, "dot", group, one_row=True, prescale=True)
               if c.kwargs.get("PRESCALE")]
    assert configs
    for c in configs:
        meta = dict(c.kwargs, SPLIT_K=2, EVEN_K=True, SCHEME=qm.INT4, GROUP=group, HAS_BIAS=False,
                    FAST=True, M_P2=1, PROLOGUE=0, SWIGLU=False, HAS_RESIDUAL=False,
                    PDL=False)
        block_m = 2 if c.kwargs["PAD_M"] else 1
        kernel = _compile_sm90(qm._qgemv_dot_kernel, meta, c.num_warps, c.num_stages)
        assert "fma.rn.bf16x2" in kernel.asm["ptx"], c
        n_mma, _, _ = _mma_chains(kernel.asm["llir"])
        tiles = (c.kwargs["K_SLICES"] // c.num_warps) * (c.kwargs["BLOCK_N"] // 16) * -(-block_m // 8)
        assert n_mma == tiles * c.kwargs["SUB_K"] // 16, (c, n_mma)


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and qm.HAS_TRITON),
                          reason="needs a CUDA GPU and triton")


def _cuda_layer(scheme, n, k, group, gen):
    if scheme == "int4":
        weights = make_int4(n, k, group, gen)
        return weights, lambda t, w, b: qm.int4_linear(t, *w, group, b)
    if scheme == "dense":
        weights = make_dense(n, k, gen)
        return weights, lambda t, w, b: qm.dense_linear(t, *w, b)
    weights = (make_int8 if scheme == "int8" else make_fp8)(n, k, gen)
    fn = qm.int8_linear if scheme == "int8" else qm.fp8_linear
    return weights, lambda t, w, b: fn(t, *w, b)


def _counters_sum() -> int:
    return int(qm.split_counters(torch.device("cuda", torch.cuda.current_device())).abs().sum())


@cuda
@pytest.mark.parametrize("m", [1, 4, 16, 40])
@pytest.mark.parametrize("scheme", ["int8", "fp8", "int4", "dense"])
def test_cuda_dispatch_matches_float64(scheme, m):
    gen = torch.Generator().manual_seed(m)
    n, k, group = 300, 1024, 128
    x = torch.randn(2, m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    weights, call = _cuda_layer(scheme, n, k, group, gen)
    want = oracle(scheme, x.reshape(-1, k), weights, group, bias).reshape(2, m, n)
    out = call(x.cuda(), [w.cuda() for w in weights], bias.cuda())
    assert out.shape == (2, m, n) and out.dtype == torch.bfloat16
    err = rel_err(out.cpu(), want)
    assert err < 8e-3, f"relative error {err:.2e}"
    assert _counters_sum() == 0


@cuda
@pytest.mark.parametrize("m", [1, 4, 40])
@pytest.mark.parametrize("kind", ["norm", "swiglu", "norm+swiglu", "norm+residual", "residual",
                                  "unitnorm+swiglu", "unitnorm+residual"])
@pytest.mark.parametrize("scheme", ["int8", "fp8", "int4", "dense"])
def test_cuda_fused_dispatch_matches_float64(scheme, kind, m):
    """The dispatchers with fusions, through the autotuned kernels (m <= 16) and the PyTorch ops
    around cuBLAS (m = 40); K = 4096 splits K for the norm's sums of squares."""
    gen = torch.Generator().manual_seed(m)
    n, k, group = 300, 4096, 128
    x, fusion = make_fusion_inputs(kind, 2 * m, n, k, torch.bfloat16, gen)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    weights, _ = _cuda_layer(scheme, n, k, group, gen)
    want = fused_oracle(scheme, x, weights, group, bias, fusion)
    dev = [w.cuda() for w in weights]
    norm = None if fusion.norm_weight is None else (fusion.norm_weight.cuda(), fusion.eps)
    n_out = n // 2 if fusion.swiglu else n
    residual = None if fusion.residual is None else fusion.residual.reshape(2, m, n_out).cuda()
    kwargs = dict(norm=norm, swiglu=fusion.swiglu, residual=residual)
    xc = x.reshape(2, m, -1).cuda()
    with torch.inference_mode():
        if scheme == "int4":
            out = qm.int4_linear(xc, *dev, group, bias.cuda(), **kwargs)
        elif scheme == "dense":
            assert qm._dense_gemv_applies(xc, dev[0], bias.cuda(), qm.make_fusion(**kwargs)) == (m <= 16)
            out = qm.dense_linear(xc, *dev, bias.cuda(), **kwargs)
        else:
            out = getattr(qm, f"{scheme}_linear")(xc, *dev, bias.cuda(), **kwargs)
    assert out.shape == (2, m, n_out) and out.dtype == torch.bfloat16
    err = rel_err(out.reshape(2 * m, n_out).cpu(), want)
    assert err < 8e-3, f"relative error {err:.2e}"
    assert _counters_sum() == 0


@cuda
@pytest.mark.parametrize("k", [4096, 14336])
@pytest.mark.parametrize("kind", ["unitnorm+swiglu", "unitnorm", "norm+swiglu"])
@pytest.mark.parametrize("scheme", ["int8", "fp8", "dense"])
def test_cuda_one_row_norm_with_and_without_weight_matches_float64(scheme, kind, k):
    """Decode's one row through the m1 kernel (autotuned) with the RMSNorm prologue, its weight
    folded away ("unitnorm": an empty weight, what int8 quantization leaves) or not."""
    gen = torch.Generator().manual_seed(k)
    n = 1024
    x, fusion = make_fusion_inputs(kind, 1, n, k, torch.bfloat16, gen)
    weights, _ = _cuda_layer(scheme, n, k, 128, gen)
    want = fused_oracle(scheme, x, weights, 128, None, fusion)
    norm = (fusion.norm_weight.cuda(), fusion.eps)
    with torch.inference_mode():
        dev = [w.cuda() for w in weights]
        if scheme == "dense":
            out = qm.dense_linear(x.cuda(), *dev, norm=norm, swiglu=fusion.swiglu)
        else:
            out = getattr(qm, f"{scheme}_linear")(x.cuda(), *dev, norm=norm, swiglu=fusion.swiglu)
    err = rel_err(out.cpu(), want)
    assert err < 8e-3, f"relative error {err:.2e}"
    assert _counters_sum() == 0


@cuda
@pytest.mark.parametrize("group", qm.INT4_GROUP_SIZES)
def test_cuda_int4_every_one_row_config_matches_float64(group):
    """Every int4 tensor-core config of one row of x, unsplit and split, on the GPU: x stays one
    row where the config allows it and is padded to two where it sets PAD_M (qm._pads_m; a
    config that needs the padding and lacks it is wrong on the GPU by a factor of ~7)."""
    gen = torch.Generator().manual_seed(group)
    n, k = 300, 2048
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    weights = make_int4(n, k, group, gen)
    want = oracle("int4", x, weights, group)
    dev = [w.cuda() for w in weights]
    configs = qm._make_configs(qm.INT4, "dot", group, one_row=True, prescale=True)
    assert any(not c.kwargs["PAD_M"] for c in configs)
    errors = {}
    for c in configs:
        for split in (1, 2):
            cfg = dict(c.kwargs, SPLIT_K=split, num_warps=c.num_warps)
            out = qm._gemv(qm.INT4, x.cuda(), *dev, group, None, config=cfg)
            errors[str(cfg)] = rel_err(out.cpu(), want)
    assert max(errors.values()) < 8e-3, errors
    assert _counters_sum() == 0


@cuda
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("kind", ["", "norm", "swiglu+residual", "norm+swiglu"])
def test_cuda_int4_dp4a_matches_float64(group, kind):
    """int4's one-row integer GEMV on the GPU (dp4a), every config and the autotuned launch,
    with the fusions, at K = 4096 and a ragged K, against float64; and through `int4_linear`
    with the packed scales, which must pick it for one row and keep the tensor cores for more."""
    gen = torch.Generator().manual_seed(group)
    n = 300
    for k in (4096, 17 * group):
        x, fusion = make_fusion_inputs(kind, 1, n, k, torch.bfloat16, gen)
        x[0, 3] *= 60
        q, scale, zero = make_int4(n, k, group, gen)
        scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
        bias = torch.randn(n, generator=gen).to(torch.bfloat16)
        want = fused_oracle("int4", x, (q, scale, zero), group, bias, fusion)
        dev_fusion = qm.Fusion(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in fusion))
        packed = qm.pack_scale_zero(scale, zero).cuda()
        errors = {}
        configs = [dict(BLOCK_N=bn, BLOCK_W=bw, STAGES=st, num_warps=nw)
                   for bn, bw, nw, st in qm._DP4A_CONFIGS]
        for config in configs + [None]:  # None: autotuned
            out = qm._int4_dp4a_gemv(x.cuda(), q.cuda(), packed, group, bias.cuda(), dev_fusion,
                                     config)
            errors[str(config)] = rel_err(out.cpu(), want)
        # one bfloat16 rounding of the output (~1.7e-3); SiLU(gate) * up compounds two
        assert max(errors.values()) < (8e-3 if fusion.swiglu else 4e-3), (k, errors)
    norm = None if fusion.norm_weight is None else (fusion.norm_weight.cuda(), fusion.eps)
    residual = None if fusion.residual is None else fusion.residual.cuda()
    calls = []
    real = qm._int4_dp4a_gemv
    try:
        qm._int4_dp4a_gemv = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        for rows in (1, 2):
            xr = x.repeat(rows, 1).cuda()
            res = None if residual is None else residual.repeat(rows, 1)
            out = qm.int4_linear(xr, q.cuda(), scale.cuda(), zero.cuda(), group, bias.cuda(),
                                 norm=norm, swiglu=fusion.swiglu, residual=res,
                                 scale_zero=packed)
            assert rel_err(out[:1].cpu(), want) < 8e-3
    finally:
        qm._int4_dp4a_gemv = real
    assert len(calls) == 1  # one row took it, two rows did not


@cuda
@pytest.mark.parametrize("m", [256, 1024])
def test_cuda_fp8_every_prefill_gemm_tile_matches_float64(m):
    """Every tile of the fp8 prefill GEMM (`_GEMM_CONFIGS`), launched explicitly at an 8B
    layer's width: the autotuner may pick any of them. A float16 variant of this kernel gave
    wrong results at one of these tiles (BENCHMARKS.md, thirteenth session)."""
    gen = torch.Generator().manual_seed(m)
    n, k = 4096, 4096
    qweight, scale = make_fp8(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    qweight, scale = qweight.cuda(), scale.cuda()
    want = x.double() @ (qweight.double() * scale.double()[:, None]).T
    errors = {}
    for bm, bn, bk, warps, stages in qm._GEMM_CONFIGS:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, num_warps=warps)
        for _ in range(3):  # a race would not show on every run
            out = qm._gemm(x, qweight, scale, None, cfg)
            errors[str(cfg)] = max(errors.get(str(cfg), 0.0), rel_err(out.double(), want))
    assert max(errors.values()) < 8e-3, errors


def test_rms_norm_kernel_refuses_shapes_it_cannot_take():
    with pytest.raises(ValueError, match=r"expected x \[M, K <= 16384\] and weight \[K\]"):
        qm.rms_norm_triton(torch.zeros(2, 8), torch.ones(7), EPS)
    with pytest.raises(ValueError, match="K <= 16384"):
        qm.rms_norm_triton(torch.zeros(1, 16385), torch.ones(16385), EPS)


def test_pdl_is_on_by_default_but_never_on_cpu():
    assert qm._PDL["enabled"]
    assert qm.pdl_launch(torch.device("cpu")) == {"PDL": False}  # the interpreter has none
    qm.use_pdl(False)
    try:
        assert qm.pdl_launch(torch.device("cpu")) == {"PDL": False}
    finally:
        qm.use_pdl(True)


@cuda
@pytest.mark.parametrize("scheme", ["dense", "int8", "int4"])
def test_cuda_pdl_chain_equals_plain_launches(scheme):
    """A chain of GEMVs, each reading the one before (split-K, fusions): with programmatic
    dependent launch the results are the same bits as with plain launches."""
    gen = torch.Generator().manual_seed(7)
    k, group = 4096, 128
    layers = [_cuda_layer(scheme, k, k, group, gen) for _ in range(6)]
    weights = [[w.cuda() for w in ws] for ws, _ in layers]
    norm = ((torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16).cuda(), EPS)
    x0 = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()

    def chain():
        x = x0
        with torch.inference_mode():
            for i, ((_, call), w) in enumerate(zip(layers, weights)):
                y = call(x, w, None) if i % 2 else _fused_call(scheme, x, w, group, norm, x)
                x = y / y.float().norm() * 64  # keep the scale of x
        return x

    qm.use_pdl(False)
    try:
        plain = chain()
    finally:
        qm.use_pdl(True)
    if torch.cuda.get_device_capability(x0.device) >= (9, 0):  # else the chain runs plain twice
        assert qm.pdl_launch(x0.device)["PDL"], "Hopper with this Triton should launch with PDL"
    for _ in range(3):
        assert torch.equal(chain(), plain)
    assert _counters_sum() == 0


def _fused_call(scheme, x, w, group, norm, residual):
    if scheme == "int4":
        return qm.int4_linear(x, *w, group, None, norm=norm, residual=residual)
    if scheme == "dense":
        return qm.dense_linear(x, *w, None, norm=norm, residual=residual)
    return qm.int8_linear(x, *w, None, norm=norm, residual=residual)


DENSE_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


@cuda
@pytest.mark.parametrize("n,k", DENSE_8B_SHAPES)
def test_cuda_dense_linear_matches_f_linear_at_8b_shapes(n, k):
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w32 = torch.randn(n, k, generator=gen, device="cuda") * 0.02
    errors = {}
    for dtype, m, tol in ((torch.bfloat16, 1, 8e-3), (torch.bfloat16, 16, 8e-3),
                          (torch.float16, 1, 2e-3), (torch.float32, 1, 1e-5)):
        w = w32.to(dtype)
        x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
        ref = torch.addmm(bias.double(), x.double(), w.double().T)
        with torch.inference_mode():
            assert qm._dense_gemv_applies(x, w, bias)
            # Poison: a freed block of the output's size, which its allocation reuses, holds NaN.
            torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            out = qm.dense_linear(x, w, bias)
            cublas = F.linear(x, w, bias)
        name = f"{str(dtype)[6:]}/M={m}"
        errors[name] = (rel_err(out, ref), rel_err(cublas, ref))
        assert out.shape == (m, n) and out.dtype == dtype
        assert torch.isfinite(out).all(), f"{name}: an output element was not written"
        assert errors[name][0] < tol, f"{name}: (kernel, F.linear) relative errors {errors}"
    print(f"{n}x{k}: (kernel, F.linear) relative errors {errors}")
    assert _counters_sum() == 0


@cuda
@pytest.mark.parametrize("dim,ffn", [(4096, 14336), (4096, 11008), (256, 512)])
def test_cuda_dense_mlp_matches_the_two_linears(dim, ffn):
    """`dense_mlp` in one launch (8B, 7B with ragged tiles, a small model) equals gate_up then
    down in two GEMV launches, call after call (the tag flips), autotuned and at every config,
    eager and replayed in a CUDA graph on new inputs, against float64 too."""
    gen = torch.Generator(device="cuda").manual_seed(dim + ffn)
    gate_up = (torch.randn(2 * ffn, dim, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    down = (torch.randn(dim, ffn, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    norm = ((torch.rand(dim, generator=gen, device="cuda") + 0.5).to(torch.bfloat16), EPS)
    x = torch.empty(1, dim, dtype=torch.bfloat16, device="cuda")

    def new_input():
        x.copy_(3 * torch.randn(1, dim, generator=gen, device="cuda"))

    def two_kernels():
        hidden = qm.dense_linear(x, gate_up, norm=norm, swiglu=True)
        return qm.dense_linear(hidden, down, residual=x)

    qm.use_mlp_launch(True)  # whatever the card (by default, an H100's only)
    try:
        _dense_mlp_rounds(x, gate_up, down, norm, new_input, two_kernels)
    finally:
        qm.use_mlp_launch(None)


def _dense_mlp_rounds(x, gate_up, down, norm, new_input, two_kernels):
    with torch.inference_mode():
        assert qm._dense_mlp_applies(x, gate_up, down, norm[0], x)
        for _ in range(4):
            new_input()
            want = two_kernels()
            up = qm.make_fusion(norm, True, None)
            hidden = fused_oracle("dense", x, (gate_up,), 0, None, up).to(torch.bfloat16)
            exact = fused_oracle("dense", hidden, (down,), 0, None, qm.make_fusion(None, False, x))
            got = qm.dense_mlp(x, gate_up, down, norm=norm, residual=x)
            assert torch.isfinite(got).all()
            assert rel_err(got, want.double()) < 2e-3, rel_err(got, want.double())
            assert rel_err(got, exact) < 8e-3
            for bn1, bk1, bn2, bk2, nw, st in qm._MLP_DENSE_CONFIGS:
                config = dict(BLOCK_N1=bn1, BLOCK_K1=bk1, BLOCK_N2=bn2, BLOCK_K2=bk2, STAGES=st,
                              num_warps=nw)
                other = qm._mlp_gemv(x, gate_up, down, norm[0], EPS, x, config)
                assert rel_err(other, want.double()) < 2e-3, config
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = qm.dense_mlp(x, gate_up, down, norm=norm, residual=x)
        for _ in range(5):
            new_input()
            graph.replay()
            want = two_kernels()
            assert rel_err(replayed, want.double()) < 2e-3


@cuda
def test_cuda_compiled_with_cuda_graphs():
    """Every scheme under torch.compile(mode="reduce-overhead", fullgraph=True), as decode runs.

    Each layer's first call is the CUDA-graph trees' warm-up run: autotuning and the allocation of
    the split-K counters happen there (the counters must stay out of the graphs' memory pool).
    Then capture and replays, each call on fresh x, each output against its own float64 oracle.
    (This test once compared a bf16 sum of the outputs with eager at atol = rtol = 1e-2: that fails
    on rounding alone, since eager rounds the sum to bf16 after each add and Inductor's fused add
    rounds once; outputs of magnitude ~20 near cancellation differ by a bf16 ulp, 0.125.)
    """
    torch.cuda.synchronize()
    qm._PERSISTENT.clear()
    gen = torch.Generator().manual_seed(5)
    n, k, group = 256, 4096, 64  # 16-64 row blocks over 4-16 K tiles: every config splits K
    layers = {s: _cuda_layer(s, n, k, group, gen) for s in ("int8", "fp8", "int4")}
    on_gpu = [([w.cuda() for w in weights], call) for weights, call in layers.values()]
    dense = make_dense(n, k, gen)
    fast = FastLinear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    fast.weight.data.copy_(dense[0])
    layers["dense"] = (dense, None)

    def forward(x):
        return [call(x, weights, None) for weights, call in on_gpu] + [fast(x)]

    compiled = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    errors = {}
    with torch.inference_mode():  # as the engine's decode step (FastLinear's weight needs grad)
        for step in range(4):  # warm-up, capture, replays
            torch.compiler.cudagraph_mark_step_begin()
            x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
            outs = [out.cpu() for out in compiled(x.cuda())]
            for (scheme, (weights, _)), out in zip(layers.items(), outs):
                errors[f"{scheme}/call{step}"] = rel_err(out, oracle(scheme, x, weights, group))
    print("relative errors:", {name: f"{e:.2e}" for name, e in errors.items()})
    bad = {name: e for name, e in errors.items() if not e < 8e-3}
    assert not bad, f"relative errors over 8e-3: {bad}; all: {errors}"
    assert _counters_sum() == 0


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpreter_child()
