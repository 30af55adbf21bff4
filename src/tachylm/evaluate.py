"""Model quality measurements: perplexity over a token sequence with a sliding window.

Perplexity = exp(mean negative log-likelihood of each token given the ones before it). A text
longer than the window is covered by windows `stride` tokens apart (Hugging Face's recipe); each
window scores only the tokens the previous window did not, so every token from the second on is
scored exactly once, with at least `window - stride` tokens of context once past the first window.
`perplexity_change` compares two models on the same tokens, with a standard error.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from tachylm.model import Transformer

Progress = Callable[[str], None]


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of each window: it covers tokens [begin, end) and scores the last
    n_scored of them (the first window scores all but token 0, which has no context)."""
    spans = []
    scored_to = 0  # tokens [0, scored_to) are scored or have no prediction
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        n_scored = end - max(scored_to, begin + 1)
        if n_scored > 0:
            spans.append((begin, end, n_scored))
        scored_to = end
        if end == n_tokens:
            break
    return spans


def perplexity(model: Transformer, token_ids: Sequence[int] | torch.Tensor, window: int = 512,
               stride: int = 256, batch_size: int = 1, progress: Progress | None = None) -> float:
    """Sliding-window perplexity of `model` on one token sequence: exp(mean of `token_nlls`).

    Arguments and errors as `token_nlls`.
    """
    return math.exp(token_nlls(model, token_ids, window, stride, batch_size, progress).mean().item())


class PerplexityChange(NamedTuple):
    """Perplexity of a model against a reference on the same tokens (`perplexity_change`)."""

    reference: float  # the reference model's perplexity
    value: float  # the compared model's perplexity
    percent: float  # 100 * (value / reference - 1)
    stderr_percent: float  # its standard error, in percentage points (nan with one block)
    blocks: int  # blocks of consecutive tokens the standard error comes from


def perplexity_change(reference_nlls: torch.Tensor, nlls: torch.Tensor,
                      block_tokens: int = 64) -> PerplexityChange:
    """Compare two models' per-token NLLs (`token_nlls`) on the same tokens, pairwise.

    value / reference = exp(mean(d)) with d = nll - reference_nll per token, so the change is
    100 * (exp(mean(d)) - 1). Its standard error treats consecutive blocks of `block_tokens`
    tokens as independent samples (tokens within a block share their context, so single tokens
    are not): SE(mean(d)) = std(block means) / sqrt(blocks), scaled to the percentage by
    100 * exp(mean(d)). A change within about two standard errors of zero is not resolved by the
    text: a longer text narrows it.
    """
    if reference_nlls.shape != nlls.shape or nlls.dim() != 1 or nlls.numel() == 0:
        raise ValueError(f"expected two equal 1-D sequences of NLLs, got {tuple(reference_nlls.shape)} "
                         f"and {tuple(nlls.shape)}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    d = nlls.double() - reference_nlls.double()
    mean = d.mean().item()
    blocks = max(1, d.numel() // block_tokens)
    block_means = torch.stack([b.mean() for b in torch.tensor_split(d, blocks)])
    stderr = block_means.std().item() / math.sqrt(blocks) if blocks > 1 else float("nan")
    reference = math.exp(reference_nlls.double().mean().item())
    return PerplexityChange(reference, reference * math.exp(mean), 100.0 * math.expm1(mean),
                            100.0 * math.exp(mean) * stderr, blocks)


@torch.inference_mode()
def token_nlls(model: Transformer, token_ids: Sequence[int] | torch.Tensor, window: int = 512,
               stride: int = 256, batch_size: int = 1,
               progress: Progress | None = None) -> torch.Tensor:
    """The negative log-likelihood of every scored token of one sequence, sliding windows.

    Args:
        model: the model (full forward, no KV cache), on any device.
        token_ids: the sequence, at least 2 tokens.
        window: tokens per forward; at most the model's rotary table length.
        stride: distance between window starts (1 <= stride <= window).
        batch_size: windows per forward (windows of equal length are batched).
        progress: called with a line after each forward.
    Returns:
        float64 [number of scored tokens] on the CPU, in text order (token 1 first); log-softmax
        in float32.
    Raises:
        ValueError: a sequence too short, or window/stride out of range.
    """
    tokens = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if tokens.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    positions = model.rope_cos.shape[0]
    if not 2 <= window <= positions:
        raise ValueError(f"window must be in [2, {positions}] (the model's rotary table length), got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.rope_cos.device
    tokens = tokens.to(device)
    spans = sliding_windows(tokens.numel(), window, stride)
    pieces = []
    done = 0
    while done < len(spans):
        length = spans[done][1] - spans[done][0]
        group = [spans[done]]
        while (len(group) < batch_size and done + len(group) < len(spans)
               and spans[done + len(group)][1] - spans[done + len(group)][0] == length):
            group.append(spans[done + len(group)])
        inputs = torch.stack([tokens[begin:end] for begin, end, _ in group])  # [B, T]
        logits = model(inputs)  # [B, T, vocab], float32
        log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        # Logit t predicts token t + 1.
        target_nll = -log_probs.gather(-1, inputs[:, 1:, None])[..., 0]  # [B, T - 1]
        for row, (_, _, n_scored) in enumerate(group):
            pieces.append(target_nll[row, -n_scored:].double().cpu())
        done += len(group)
        if progress is not None:
            progress(f"perplexity: {done}/{len(spans)} windows")
    return torch.cat(pieces)
