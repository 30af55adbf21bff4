"""Sampling on the device, without host synchronisation.

`SamplingParams` is what a user asks for (validated, with explicit defaults). `SamplingTensors`
holds the same values as per-row device tensors, so one compiled step serves every setting.
`sample()` draws a token per row with an exponential race (argmax of p / Exp(1) samples from p),
applies top-k, top-p and min-p by masks over a sorted candidate set, repetition penalty from a
per-row "seen" mask, and greedy rows (temperature 0) by argmax, all as tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from tachylm.kernels.topk import seed_sampling, topk_sample, topk_sample_applies

# Up to this many top-k candidates are ranked pairwise (a [B, k, k] comparison) instead of sorted.
PAIRWISE_RANKS = 512


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        temperature: 0 means greedy; otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 = no limit). Where logits tie at the k-th place,
            CUDA's top-k kernels (16-bit logits, top-k alone) keep every tied token, as
            transformers does; elsewhere k of them are kept.
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 = off).
        min_p: drop tokens less likely than min_p times the most likely one (0 = off).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (1 = off).
        seed: seed for the random draws (None = nondeterministic).
    """

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def greedy_params(cls) -> "SamplingParams":
        return cls(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


class SamplingTensors(NamedTuple):
    """Per-row sampling settings on the device; each field is [B] (top_k long, others float)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor


@dataclass(frozen=True)
class SamplingPlan:
    """The static part of sampling, fixed per compiled step: which operations run at all.

    Attributes:
        candidates: how many top tokens to sort for filtering (0 = no filtering at all).
        penalize: apply the repetition penalty.
        rank: rank the candidates for per-row top-k, top-p and min-p; False when every sampled
            row keeps all of them, so sampling is a softmax over the candidates.
        sampled: some row samples (temperature > 0); False when every row is greedy, so the
            step is an argmax of the (penalized) logits and draws nothing.
    """

    candidates: int
    penalize: bool
    rank: bool = True
    sampled: bool = True


def plan_for(params: list[SamplingParams], vocab_size: int) -> SamplingPlan:
    """Choose the static plan that serves every row's parameters.

    Args:
        params: one entry per row.
        vocab_size: logits per row.
    Returns:
        the plan to pass to `sample` (and to key compiled steps by).
    """
    sampled = [p for p in params if not p.greedy]
    filtering = any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in sampled)
    candidates = 0
    if filtering:
        unlimited = any(not p.top_k for p in sampled)
        candidates = vocab_size if unlimited else min(vocab_size, max(p.top_k for p in sampled))
    keeps_all = all(p.top_p == 1 and p.min_p == 0 and min(p.top_k or vocab_size, vocab_size) == candidates
                    for p in sampled)
    return SamplingPlan(candidates=candidates,
                        penalize=any(p.repetition_penalty != 1 for p in params),
                        rank=bool(candidates) and not keeps_all, sampled=bool(sampled))


def seed_draws(device: torch.device | str, seed: int | None) -> None:
    """Seed a generation's draws: torch's generators with `seed` when given, then, on CUDA, the
    top-k kernels' own seed from torch's default generator (`kernels.topk.seed_sampling`), so a
    seed reproduces a generation whichever path samples it."""
    if seed is not None:
        torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        seed_sampling(device)


def to_tensors(params: list[SamplingParams], device: torch.device | str) -> SamplingTensors:
    """Stack per-row parameters into device tensors."""
    def col(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)
    return SamplingTensors(
        temperature=col([p.temperature for p in params], torch.float32),
        top_k=col([p.top_k for p in params], torch.long),
        top_p=col([p.top_p for p in params], torch.float32),
        min_p=col([p.min_p for p in params], torch.float32),
        repetition_penalty=col([p.repetition_penalty for p in params], torch.float32),
    )


def _filtered_probs(values: torch.Tensor, settings: SamplingTensors, descending: bool) -> torch.Tensor:
    """Probabilities over the candidates after each row's top-k, top-p and min-p.

    Args:
        values: [B, k] scaled logits of the candidates.
        settings: per-row settings.
        descending: `values` are sorted in descending order; otherwise they are ranked here pairwise
            (a [B, k, k] comparison: over a few hundred candidates one fused kernel, where sorting
            them costs a slow single-block sort per step).
    Returns:
        [B, k] probabilities, zero where filtered out (not renormalised: the race does not need it).
    """
    candidates = values.shape[-1]
    order = torch.arange(candidates, device=values.device)
    if descending:
        above = None
        ranks = order[None, :]
    else:
        # above[b, i, j]: candidate j ranks above candidate i (ties: the earlier one first)
        above = ((values[:, None, :] > values[:, :, None])
                 | ((values[:, None, :] == values[:, :, None]) & (order[None, :] < order[:, None])))
        ranks = above.sum(dim=-1)
    top_k = torch.where(settings.top_k > 0, settings.top_k, candidates)[:, None]
    probs = torch.softmax(values.masked_fill(ranks >= top_k, float("-inf")), dim=-1)
    if above is None:  # probability mass ranked above each candidate
        before = probs.cumsum(dim=-1) - probs
    else:
        before = (above * probs[:, None, :]).sum(dim=-1)
    keep = (before < settings.top_p[:, None]) & (
        probs >= settings.min_p[:, None] * probs.amax(dim=-1, keepdim=True))
    return probs * keep


def sample(logits: torch.Tensor, settings: SamplingTensors, plan: SamplingPlan,
           seen: torch.Tensor | None = None, feed: tuple | None = None) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: [B, V] float32, or bfloat16/float16 (a model's own output dtype, computed in
            float32 here; without a repetition penalty the top-k candidates are then selected
            on the 16-bit values, where a radix select takes half the passes, in the same order:
            the temperature is a positive factor per row).
        settings: per-row settings.
        plan: static choice of operations (see `plan_for`).
        seen: [B, V] bool, tokens already in the sequence (needed when plan.penalize).
        feed: optional (token [B, 1], position [B, 1]) long tensors, the next decode step's
            inputs: the drawn tokens are written into the first and the positions advanced by
            one (by the top-k kernels themselves where they run).
    Returns:
        [B] long token ids.

    On CUDA, 16-bit logits under a plan of top-k alone (the bench's) are sampled by
    `kernels.topk.topk_sample` in three Triton kernels, in place of a radix top-k and the ops
    after it; it keeps every logit equal to the k-th largest (torch.topk keeps k, any of them).
    """
    select = logits if logits.dtype in (torch.bfloat16, torch.float16) and not plan.penalize else None
    if (plan.sampled and plan.candidates and not plan.rank and select is not None
            and topk_sample_applies(select)):
        return topk_sample(select, settings.temperature, plan.candidates, feed)
    tokens = _sample_torch(logits, settings, plan, seen, select)
    if feed is not None:
        feed[0].copy_(tokens[:, None])
        feed[1].add_(1)
    return tokens


def _sample_torch(logits: torch.Tensor, settings: SamplingTensors, plan: SamplingPlan,
                  seen: torch.Tensor | None, select: torch.Tensor | None) -> torch.Tensor:
    """`sample` in torch operations (`select`: the 16-bit logits that may pick the top-k)."""
    logits = logits.float()
    if plan.penalize:
        penalty = settings.repetition_penalty[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if not plan.sampled:
        # Every row greedy: no softmax and no random draw over the vocabulary (on an H100 that
        # draw made greedy decode of the 8B shape slower than sampling top-k 200).
        return logits.argmax(dim=-1)
    scaled = logits / settings.temperature.clamp_min(1e-5)[:, None]
    if plan.candidates:
        # Sorted only past PAIRWISE_RANKS candidates; fewer are ranked pairwise. (A Python branch:
        # under torch.compile the plan's integers may be symbolic, and topk's `sorted` must not
        # be; `bool(...)` of the condition stays symbolic there, an `if` specializes it.)
        if plan.rank and plan.candidates > PAIRWISE_RANKS:
            descending = True
        else:
            descending = False
        source = scaled if select is None else select
        _, indices = source.topk(plan.candidates, dim=-1, sorted=descending)
        values = scaled.gather(-1, indices)
        if plan.rank:
            probs = _filtered_probs(values, settings, descending)
        else:  # every sampled row keeps every candidate
            probs = torch.softmax(values, dim=-1)
        # temperature only rescales, so the top candidate is also the greedy token
        greedy_tokens = indices.gather(-1, values.argmax(dim=-1, keepdim=True))[:, 0]
    else:
        indices = None
        probs = torch.softmax(scaled, dim=-1)
        greedy_tokens = logits.argmax(dim=-1)
    # exponential_ can return exactly 0 in float32; clamp so 0/0 never yields NaN
    race = probs / torch.empty_like(probs).exponential_(1).clamp_min_(1e-20)
    choice = race.argmax(dim=-1)
    if indices is not None:
        choice = indices.gather(-1, choice[:, None])[:, 0]
    return torch.where(settings.temperature > 0, choice, greedy_tokens)
