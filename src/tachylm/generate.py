"""Plain generation: prefill a prompt, then decode token by token, as an iterator of ids.

The loop never reads a token on the host right after producing it: decode steps are queued in
blocks of `sync_every`, each block's tokens are copied to the host asynchronously, and the
previous block is checked for stop tokens while the device works on the next one. At most one
block of extra steps is computed past a stop token; those positions are simply never used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from tachylm.sampling import SamplingParams, plan_for, sample, seed_draws, to_tensors
from tachylm.steps import Steps


@dataclass
class GenerationStats:
    """Timing and counts of one generation (shared by every strategy and front end).

    Attributes:
        prompt_tokens: tokens prefilled.
        new_tokens: tokens produced (including a final stop token).
        prefill_s: seconds from start to the first token on the host (time to first token).
        decode_s: seconds from the first token to the last.
        stop_reason: "stop_token", "max_new_tokens" or "context_full".
        end_pos: cache position after the last token fed to the model.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""
    end_pos: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one, per second of decoding."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens; "
                f"time to first token {self.prefill_s * 1000:.0f} ms; "
                f"decode {self.decode_tokens_per_s:.1f} tokens/s")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generation:
    """An iterator of generated token ids for one row; `stats` fills in as it runs.

    Args:
        steps: compiled or eager steps over the model and cache.
        prompt: token ids to prefill at positions start_pos...
        max_new_tokens: upper bound on produced tokens.
        params: sampling parameters.
        stop_ids: ids that end generation (the stop token is yielded, then iteration ends).
        start_pos: first free cache position (earlier positions hold a conversation's history).
        history: ids already in the cache at positions [0, start_pos), for repetition penalty.
        sync_every: decode steps queued between host reads.
    """

    def __init__(self, steps: Steps, prompt: list[int], max_new_tokens: int, params: SamplingParams,
                 stop_ids: Iterable[int] = (), start_pos: int = 0, history: Iterable[int] = (),
                 sync_every: int = 8):
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.steps = steps
        self.prompt = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.params = params
        self.stop_ids = frozenset(stop_ids)
        self.start_pos = start_pos
        self.history = list(history)
        self.sync_every = max(1, sync_every)
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))

    def __iter__(self) -> Iterator[int]:
        steps, device = self.steps, self.steps.device
        vocab = steps.model.config.vocab_size
        room = steps.cache.max_seq_len - self.start_pos - len(self.prompt)
        if room < 1:
            raise ValueError(
                f"the context is full: {self.start_pos} tokens of history plus a {len(self.prompt)}-token "
                f"prompt leave no room in the {steps.cache.max_seq_len}-token cache; start a new "
                "conversation, shorten the prompt or raise --max-seq-len")
        budget = min(self.max_new_tokens, room)
        plan = plan_for([self.params], vocab)
        settings = to_tensors([self.params], device)
        seed_draws(device, self.params.seed)
        seen = None
        if plan.penalize:
            seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            seen[0, torch.tensor(self.history + self.prompt, device=device)] = True

        start = time.perf_counter()
        prompt = torch.tensor([self.prompt], device=device)
        logits = steps.prefill(prompt, self.start_pos)
        token = sample(logits, settings, plan, seen)  # [1]
        first = int(token.item())
        self.stats.prefill_s = time.perf_counter() - start
        self.stats.new_tokens = 1
        pos = self.start_pos + len(self.prompt)
        self.stats.end_pos = pos
        yield first
        if first in self.stop_ids:
            self.stats.stop_reason = "stop_token"
            return
        if budget == 1:
            self.stats.stop_reason = "max_new_tokens" if budget == self.max_new_tokens else "context_full"
            return

        decode_start = time.perf_counter()
        token = token[:, None]
        produced = 1
        pending = None  # (host tensor, event) of the block in flight
        finished = False
        while not finished:
            block = []
            for _ in range(min(self.sync_every, budget - produced)):
                if seen is not None:
                    seen.scatter_(1, token, True)
                # the position as an int, the token as the step returned it: a compiled step
                # then finds both already in its buffers (Steps.decode)
                next_token, _ = steps.decode(token, pos, settings, plan, seen, kv_limit=pos + 1,
                                             return_logits=False)
                token = next_token[:, None]
                block.append(next_token)
                pos += 1
                produced += 1
            ready = self._launch_copy(block) if block else None
            if pending is not None:
                finished = yield from self._drain(pending, decode_start)
            pending = ready
            if pending is None:
                break
            if produced >= budget and not finished:
                finished = yield from self._drain(pending, decode_start)
                pending = None
                if not finished:
                    self.stats.stop_reason = ("max_new_tokens" if budget == self.max_new_tokens
                                              else "context_full")
                    finished = True

    def _launch_copy(self, block: list[torch.Tensor]):
        tokens = torch.cat(block)
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event
        return tokens, None

    def _drain(self, pending, decode_start: float):
        host, event = pending
        if event is not None:
            event.synchronize()
        for value in host.tolist():
            self.stats.new_tokens += 1
            self.stats.end_pos += 1
            self.stats.decode_s = time.perf_counter() - decode_start
            yield value
            if value in self.stop_ids:
                self.stats.stop_reason = "stop_token"
                return True
        return False
