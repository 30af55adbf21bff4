"""Model quality measurements: perplexity over a token sequence with a sliding window.

Perplexity = exp(mean negative log-likelihood of each token given the ones before it). A text
longer than the window is covered by windows `stride` tokens apart (Hugging Face's recipe); each
window scores only the tokens the previous window did not, so every token from the second on is
scored exactly once, with at least `window - stride` tokens of context once past the first window.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

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


@torch.inference_mode()
def perplexity(model: Transformer, token_ids: Sequence[int] | torch.Tensor, window: int = 512,
               stride: int = 256, batch_size: int = 1, progress: Progress | None = None) -> float:
    """Sliding-window perplexity of `model` on one token sequence.

    Args:
        model: the model (full forward, no KV cache), on any device.
        token_ids: the sequence, at least 2 tokens.
        window: tokens per forward; at most the model's rotary table length.
        stride: distance between window starts (1 <= stride <= window).
        batch_size: windows per forward (windows of equal length are batched).
        progress: called with a line after each forward.
    Returns:
        exp(total NLL / number of scored tokens); log-softmax in float32.
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
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    n_scored_total = 0
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
            total_nll += target_nll[row, -n_scored:].double().sum()
            n_scored_total += n_scored
        done += len(group)
        if progress is not None:
            progress(f"perplexity: {done}/{len(spans)} windows")
    return math.exp(total_nll.item() / n_scored_total)
