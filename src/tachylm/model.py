"""The network: one Llama-family decoder covering every supported family by configuration.

`Transformer.forward(tokens[B, T], input_pos[B, T], cache) -> logits`. The model knows nothing
about devices, dtypes, checkpoint formats, quantization or parallelism: build.py creates it (on
the meta device), swaps modules and loads weights; the KV cache is passed in.

Parameter names are the canonical checkpoint names (checkpoints/__init__.py) except two fused
matrices: `attn.qkv_proj` = [q_proj; k_proj; v_proj] and `mlp.gate_up_proj` = [gate_proj; up_proj]
stacked along the output dimension (build.py does the stacking).

Every projection is a `FusedLinear` (or a quantized Linear after build.py's swap) and is called
with the element-wise steps around it as keywords: the RMSNorm before qkv, gate_up and the head
(`norm=`), SiLU(gate) * up as gate_up's output (`swiglu=True`) and the residual adds after o and
down (`residual=`). On the CPU these are the usual PyTorch ops; on a GPU the decode kernels do them
while they read the weights (kernels/quant_matmul.py); decode attention rotates q and k and
writes the new key and value into the cache itself (kernels/attention.py), so a decode layer
costs five kernels. Prefill multiplies with cuBLAS, and on a GPU the steps between are one kernel
each (kernels/elementwise.py: SwiGLU, and q and k rotated with k and v written into the cache; the
RMSNorm is quant_matmul's); a prompt at position 0 (`fresh`) attends with a causal SDPA kernel.

Differences between families are flags on `ModelConfig`: grouped-query attention
(n_kv_heads < n_heads), q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings
(Llama 3.2, SmolLM2), Llama 3.1 rotary scaling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tachylm.config import ModelConfig, rope_frequencies
from tachylm.kernels.attention import decode_attention
from tachylm.kernels.elementwise import apply_rotary, rotate_into_cache
from tachylm.kernels.linear import FusedLinear, mlp
from tachylm.kernels.quant_matmul import rms_norm_ref

if TYPE_CHECKING:  # the cache is passed in; the model only calls its update()
    from tachylm.cache import KVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled in the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)

    def fused(self) -> tuple[torch.Tensor, float]:
        """The `norm=` argument of a Linear that applies this norm to its input itself."""
        return self.weight, self.eps


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                      ) -> torch.Tensor:
    """Masked attention for grouped-query heads without copying the cache.

    The query heads that share a kv head are folded into the query-length axis, so each kv head
    is read once (expanding k/v to every query head would copy the whole cache each step).

    Args:
        q: [B, H, T, D]; k, v: [B, KVH, S, D] with H a multiple of KVH.
        mask: [B, 1, T, S] bool, True where a query may attend.
    Returns:
        [B, H, T, D].
    """
    batch, n_heads, seq, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    if group > 1:
        q = q.reshape(batch, n_kv_heads, group * seq, head_dim)  # rows ordered (head in group, t)
        mask = mask.expand(batch, group, seq, mask.shape[-1]).reshape(batch, 1, group * seq, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, n_heads, seq, head_dim)  # SDPA's math path may not be contiguous


class Attention(nn.Module):
    # An id the decode attention kernel may prepare its output under for o_proj's kernel
    # (`decode_attention(feed=)`), set by whoever swaps o_proj (quant.link_inputs); 0: none.
    output_link = 0

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        # q, k and v in one matrix: one larger matrix-vector product reads memory better than three.
        self.qkv_proj = FusedLinear(c.dim, self.q_size + 2 * self.kv_size, bias=c.qkv_bias)
        self.o_proj = FusedLinear(c.n_heads * c.head_dim, c.dim, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, layer: int, input_pos: torch.Tensor, cache: KVCache | None,
                kv_limit: int | None = None, rope_tables: tuple | None = None) -> torch.Tensor:
        """x + attention(norm(x)): the norm and the residual add happen in the projections.

        rope_tables: optional (cos, sin) tables [P, head_dim / 2] that cos and sin were gathered
        from; decode hands them to the attention kernel, which reads each row's position itself.
        """
        batch, seq, _ = x.shape
        qkv = self.qkv_proj(x, norm=norm.fused())
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # [B, T, H * D] -> [B, H, T, D]
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None and seq == 1:
            # Decode: one kernel rotates q and k, writes k and v into the cache and attends over
            # its filled part.
            k_layer, v_layer = cache.layer(layer)
            if rope_tables is not None and rope_tables[0].shape[0] >= k_layer.shape[2]:
                rope_cos, rope_sin, table = *rope_tables, True
            else:
                rope_cos, rope_sin, table = cos[:, 0, 0], sin[:, 0, 0], False
            out = decode_attention(q[:, :, 0], k_layer, v_layer, input_pos[:, 0], rope_cos,
                                   rope_sin, k[:, :, 0], v[:, :, 0], kv_limit, rope_table=table,
                                   feed=self.output_link)
            return self.o_proj(out.reshape(batch, 1, self.q_size), residual=x)  # out: [B, H, D]
        if cache is not None:
            # Prefill: one kernel (on CUDA) rotates q and k and writes k and v into the cache.
            k_layer, v_layer = cache.layer(layer)
            q = rotate_into_cache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  cos[:, 0], sin[:, 0], input_pos, k_layer, v_layer)
            k, v = k_layer, v_layer
            if kv_limit is not None:  # attend over the filled slots only
                k, v = k[:, :, :kv_limit], v[:, :, :kv_limit]
            k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if mask is None:
            if self.n_kv_heads != self.n_heads:
                repeat = self.n_heads // self.n_kv_heads
                k = k.repeat_interleave(repeat, dim=1)
                v = v.repeat_interleave(repeat, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = grouped_attention(q, k, v, mask)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.o_proj(out, residual=x)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ffn_dim = config.ffn_dim
        # gate and up projections fused into one matrix, like q/k/v.
        self.gate_up_proj = FusedLinear(config.dim, 2 * config.ffn_dim, bias=False)
        self.down_proj = FusedLinear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """x + down(SiLU(gate) * up) of norm(x): the norm, SiLU-multiply and residual add happen
        in the projections (for dense decode on a GPU, in one kernel: `kernels.linear.mlp`)."""
        return mlp(self.gate_up_proj, self.down_proj, x, norm.fused())


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, layer, input_pos, cache, kv_limit=None, rope_tables=None):
        x = self.attn(x, self.attn_norm, cos, sin, mask, layer, input_pos, cache, kv_limit,
                      rope_tables)
        return self.mlp(x, self.mlp_norm)


class Transformer(nn.Module):
    """A Llama-family decoder-only transformer.

    Args:
        config: the architecture.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # With tied embeddings build.py makes lm_head.weight the embedding table itself; the head
        # is still a module so quantization can swap it like any other Linear.
        self.lm_head = FusedLinear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def setup_rope(self, max_seq_len: int, device: torch.device | str) -> None:
        """(Re)compute the rotary tables for positions [0, max_seq_len) on `device`."""
        inv_freq = torch.tensor(rope_frequencies(self.config), dtype=torch.float64, device=device)
        angles = torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq
        self.rope_cos = angles.cos().float()  # [S, head_dim / 2]
        self.rope_sin = angles.sin().float()

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, logit_index: torch.Tensor | None = None,
                kv_limit: int | None = None, float_logits: bool = True,
                fresh: bool = False) -> torch.Tensor:
        """Run the network.

        Args:
            tokens: [B, T] token ids.
            input_pos: [B, T] position of each token; default 0..T-1 for every row.
            cache: the KV cache to write to and attend over; None attends causally within
                `tokens` only.
            logit_index: optional [B] index into T: return logits for that one position per row.
            kv_limit: attend over cache slots [0, kv_limit) only; every query position must be
                below it. Saves reading the empty part of a long cache (eager decode).
            float_logits: return the logits in float32 (False: in the output head's dtype, which
                float32 holds exactly; a compiled decode step then writes no float32 copy).
            fresh: the tokens are positions 0..T-1 of every row (a prompt at the cache's start,
                the caller's promise): attention is plainly causal over the first T slots (a
                causal SDPA kernel instead of a masked one; kv_limit, if given, must be T).
        Returns:
            logits [B, T, vocab] (or [B, 1, vocab] with `logit_index`), float32.
        """
        batch, seq = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(seq, device=tokens.device).expand(batch, seq)
        if self.rope_cos.numel() == 0:
            raise RuntimeError("Transformer.setup_rope() must be called before forward()")
        cos = self.rope_cos[input_pos][:, None]  # [B, 1, T, head_dim / 2]
        sin = self.rope_sin[input_pos][:, None]
        mask = None
        if fresh:
            if kv_limit not in (None, seq):
                raise ValueError(f"fresh tokens fill cache slots 0..{seq - 1}: kv_limit must be "
                                 f"{seq} (or None), got {kv_limit}")
            kv_limit = seq
        elif cache is not None:
            slots = torch.arange(kv_limit or cache.max_seq_len, device=tokens.device)
            mask = (slots[None, None, :] <= input_pos[:, :, None])[:, None]  # [B, 1, T, S]
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, i, input_pos, cache, kv_limit,
                      (self.rope_cos, self.rope_sin))
        if logit_index is not None:
            x = x[torch.arange(batch, device=x.device), logit_index][:, None]
        logits = self.lm_head(x, norm=self.norm.fused())
        return logits.float() if float_logits else logits
