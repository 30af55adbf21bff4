"""The element-wise prefill kernels (`tachylm.kernels.elementwise`) against their references:
under Triton's interpreter on the CPU (a child process, see triton_interpreter.py) and on CUDA."""
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from tachylm.kernels import elementwise as ew
from triton_interpreter import outcome, patch_interpreter, run_child

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# One rounding of the result to the dtype (the interpreter truncates to bfloat16: up to 2^-7).
TOLERANCE = {"bf16": 8e-3, "fp16": 1e-3, "fp32": 1e-6}

# name -> (leading shape, F, dtype): F = 1100 spans two blocks with a masked tail
SWIGLU_CASES = {"swiglu-3x96-bf16": ((3,), 96, "bf16"),
                "swiglu-2x5x1100-fp16": ((2, 5), 1100, "fp16"),
                "swiglu-4x33-fp32": ((4,), 33, "fp32")}
# name -> (B, T, H, KVH, D, S, dtype, q from one qkv tensor)
ROTATE_CASES = {"rotate-b2-t5-bf16": (2, 5, 4, 2, 16, 12, "bf16", True),
                "rotate-b1-t7-h3-fp32": (1, 7, 3, 3, 8, 9, "fp32", True),
                "rotate-b2-t3-fp16-separate": (2, 3, 6, 2, 32, 4, "fp16", False)}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def swiglu_oracle(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def make_swiglu(name):
    lead, f, dtype = SWIGLU_CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (3 * torch.randn(*lead, 2 * f, generator=gen)).to(DTYPES[dtype])


def make_rotate(name, device="cpu"):
    """q, k, v [B, T, heads, D] views, cos, sin [B, T, D/2], positions [B, T] (distinct slots
    per row, not in order) and two caches of random contents."""
    b, t, h, kvh, d, s, dtype, fused = ROTATE_CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dt = DTYPES[dtype]
    if fused:  # views of one projection output, as the model has them
        qkv = torch.randn(b, t, (h + 2 * kvh) * d, generator=gen).to(dt)
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        q, k, v = (x.view(b, t, -1, d) for x in (q, k, v))
    else:
        q, k, v = (torch.randn(b, t, n, d, generator=gen).to(dt) for n in (h, kvh, kvh))
    pos = torch.stack([torch.randperm(s, generator=gen)[:t] for _ in range(b)])
    angles = pos[..., None].double() * torch.rand(d // 2, generator=gen, dtype=torch.float64)
    cos, sin = angles.cos().float(), angles.sin().float()
    k_cache = torch.randn(b, kvh, s, d, generator=gen).to(dt)
    v_cache = torch.randn(b, kvh, s, d, generator=gen).to(dt)
    return [x.to(device) for x in (q, k, v, cos, sin, pos, k_cache, v_cache)]


def rotate_results(run, tensors) -> tuple:
    q, k, v, cos, sin, pos, k_cache, v_cache = tensors
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = run(q, k, v, cos, sin, pos, k_cache, v_cache)
    return out, k_cache, v_cache


def unwritten_kept(tensors, results) -> bool:
    """Whether every cache slot that no position names holds its old contents, bit for bit."""
    pos, k_cache, v_cache = tensors[5:]
    kept = torch.ones(k_cache.shape[0], k_cache.shape[2], dtype=torch.bool)
    for b in range(pos.shape[0]):
        kept[b, pos[b].cpu()] = False
    return all(torch.equal(new.cpu().transpose(1, 2)[kept], old.cpu().transpose(1, 2)[kept])
               for new, old in zip(results[1:], (k_cache, v_cache)))


def _interpreter_child():
    patch_interpreter()
    results = {}

    def swiglu_case(name):
        y = make_swiglu(name)
        out = ew.swiglu_triton(y)
        return {"rel": rel_err(out, swiglu_oracle(y)), "shape": list(out.shape),
                "dtype": str(out.dtype)}

    def rotate_case(name):
        tensors = make_rotate(name)
        got = rotate_results(ew.rotate_into_cache_triton, tensors)
        want = rotate_results(ew.rotate_into_cache_ref, tensors)
        return {"rel": [rel_err(g, w) for g, w in zip(got, want)],
                "unwritten_kept": unwritten_kept(tensors, got),
                "shape": list(got[0].shape), "contiguous": got[0].is_contiguous()}

    for name in SWIGLU_CASES:
        results[name] = outcome(swiglu_case, name)
    for name in ROTATE_CASES:
        results[name] = outcome(rotate_case, name)
    import json
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    return run_child(__file__)


@pytest.mark.parametrize("name", SWIGLU_CASES)
def test_swiglu_kernel_matches_float64(interpreted, name):
    r = interpreted[name]
    assert "error" not in r, r
    lead, f, dtype = SWIGLU_CASES[name]
    assert r["shape"] == [*lead, f] and r["dtype"] == str(DTYPES[dtype])
    assert r["rel"] < TOLERANCE[dtype]


@pytest.mark.parametrize("name", ROTATE_CASES)
def test_rotate_kernel_matches_reference(interpreted, name):
    """q rotated into attention's layout, and both caches after the writes (every slot, so a
    write to a wrong slot shows), against `rotate_into_cache_ref`."""
    r = interpreted[name]
    assert "error" not in r, r
    b, t, h, kvh, d, s, dtype, _ = ROTATE_CASES[name]
    assert r["shape"] == [b, h, t, d] and r["contiguous"]
    q_err, k_err, v_err = r["rel"]
    assert q_err < TOLERANCE[dtype] and k_err < TOLERANCE[dtype]
    assert v_err == 0.0  # v is copied
    assert r["unwritten_kept"]


def test_references_on_cpu_are_the_model_ops():
    """On the CPU the dispatchers are the references, and those are the PyTorch ops the model
    used before: SiLU(gate) * up, `apply_rotary` and the cache's indexed write."""
    y = make_swiglu("swiglu-3x96-bf16")
    gate, up = y.chunk(2, dim=-1)
    assert torch.equal(ew.swiglu(y), F.silu(gate) * up)
    tensors = make_rotate("rotate-b2-t5-bf16")
    q, k, v, cos, sin, pos, k_cache, v_cache = tensors
    out, k_got, v_got = rotate_results(ew.rotate_into_cache, tensors)
    c, s_ = cos[:, None], sin[:, None]  # [B, 1, T, D/2] against [B, H, T, D]
    assert torch.equal(out, ew.apply_rotary(q.transpose(1, 2), c, s_))
    k_want, v_want = k_cache.clone(), v_cache.clone()
    for bi in range(q.shape[0]):
        for ti, slot in enumerate(pos[bi].tolist()):
            k_want[bi, :, slot] = ew.apply_rotary(k.transpose(1, 2), c, s_)[bi, :, ti]
            v_want[bi, :, slot] = v[bi, ti]
    assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)


def test_kernels_refuse_what_they_cannot_take():
    with pytest.raises(ValueError, match="must be even; got 7"):
        ew.swiglu_triton(torch.zeros(2, 7))
    q, k, v, cos, sin, pos, k_cache, v_cache = make_rotate("rotate-b2-t5-bf16")
    with pytest.raises(ValueError, match="power-of-two head size"):
        ew.rotate_into_cache_triton(q[..., :12], k[..., :12], v[..., :12], cos[..., :6],
                                    sin[..., :6], pos, k_cache[..., :12], v_cache[..., :12])


cuda = pytest.mark.skipif(not (torch.cuda.is_available() and ew.HAS_TRITON),
                          reason="needs a CUDA GPU and triton")


@cuda
@pytest.mark.parametrize("name", SWIGLU_CASES)
def test_cuda_swiglu_matches_float64(name):
    y = make_swiglu(name).cuda()
    out = ew.swiglu(y)
    dtype = SWIGLU_CASES[name][2]
    assert rel_err(out, swiglu_oracle(y)) < TOLERANCE[dtype] / 2  # the GPU rounds to nearest


@cuda
@pytest.mark.parametrize("name", ROTATE_CASES)
def test_cuda_rotate_matches_reference(name):
    tensors = make_rotate(name, "cuda")
    got = rotate_results(ew.rotate_into_cache, tensors)
    want = rotate_results(ew.rotate_into_cache_ref, tensors)
    dtype = ROTATE_CASES[name][6]
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOLERANCE[dtype] / 2
    assert unwritten_kept(tensors, got)


@cuda
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("quant", [None, "int8"])
def test_cuda_prefill_with_the_kernels_matches_pytorch_ops(monkeypatch, qk_norm, quant):
    """A whole prefill (a prompt, then a second one after it in the same cache, as a chat's next
    turn) with the kernels against the same model on PyTorch ops: logits and both caches."""
    from tachylm.build import build_random_model
    from tachylm.cache import KVCache
    from tachylm.config import ModelConfig
    from tachylm.kernels import quant_matmul as qm
    from tachylm.kernels.linear import use_fast_linears
    from tachylm.quant import quantize_model

    config = ModelConfig(family="llama", vocab_size=512, dim=256, n_layers=3, n_heads=8,
                         n_kv_heads=2, head_dim=32, ffn_dim=640, max_seq_len=256,
                         qk_norm=qk_norm)
    model = build_random_model(config, device="cuda", dtype=torch.bfloat16, seed=0, std=0.1)
    use_fast_linears(model)
    if quant:
        quantize_model(model, quant)
    gen = torch.Generator().manual_seed(3)
    first = torch.randint(0, 512, (2, 48), generator=gen).cuda()
    second = torch.randint(0, 512, (2, 32), generator=gen).cuda()

    def run():
        cache = KVCache(3, 2, 128, 2, 32, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            a = model(first, cache=cache, kv_limit=48)
            pos = torch.arange(48, 80, device="cuda").expand(2, -1)
            b = model(second, pos, cache=cache, kv_limit=80)
        return [a, b, *cache.k, *cache.v]

    fast = run()
    monkeypatch.setattr(ew, "_use_kernel", lambda x: False)
    monkeypatch.setattr(qm, "_use_triton", lambda x: False)
    reference = run()
    for got, want in zip(fast, reference):
        assert rel_err(got, want) < 2e-2


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpreter_child()
