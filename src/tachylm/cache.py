"""The one KV cache: static, pre-allocated key/value buffers for every layer.

One signature serves prefill (T = prompt length), decode (T = 1), speculative verify
(T = k + 1) and ragged batches: each row writes its new keys/values at its own positions
`input_pos[b, t]`, and attention masks every cache slot past the query's own position. Because
masking is by position, rolling a row back is just decoding from an earlier position again:
stale slots are never read before they are overwritten. Shapes never change, so CUDA graphs
captured over the cache stay valid.
"""

from __future__ import annotations

import torch


class KVCache:
    """Key/value buffers, one pair per layer, each [batch, n_kv_heads, max_seq_len, head_dim].

    One buffer per layer, not one [n_layers, ...] tensor: a compiled step that writes into a view
    of one big tensor is functionalised into a copy of the whole tensor per write (torch.compile
    rebuilds the base of a mutated view), which at a 16k context made each token copy the whole
    cache once per layer. Separate buffers are written in place.

    Args:
        n_layers, batch_size, max_seq_len, n_kv_heads, head_dim: sizes.
        device, dtype: where and how the buffers are stored.
    """

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int,
                 head_dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_index = torch.arange(batch_size, device=device)[:, None]
        for t in self.k + self.v + [self.batch_index]:
            # Fixed addresses: CUDA graphs read and write these buffers in place. Unmarked, a
            # mutated input makes torch.compile skip CUDA graphs altogether.
            torch._dynamo.mark_static_address(t)

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def zero_(self) -> None:
        """Clear every buffer (a fresh cache)."""
        for t in self.k + self.v:
            t.zero_()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (keys, values) buffers, which attention writes its new entries into at
        their positions (`kernels.elementwise.rotate_into_cache` in prefill, the decode attention
        kernel in decode); each [B, n_kv_heads, max_seq_len, head_dim]."""
        return self.k[layer], self.v[layer]
