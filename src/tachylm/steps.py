"""Prefill and decode steps over one model and one KV cache, eager or compiled.

Strategies (generate.py, speculative decoding, the server) call these, never the model. The
compiled callables live in a `Steps` object; nothing is rebound at module level and compiler
options are passed to `torch.compile` here, scoped to these calls.

Decode runs model + sampling as one step (compiled with CUDA graphs when asked). Compiled decode
reads its inputs from persistent, static-address buffers that `Steps` owns, so CUDA graphs copy
none of them, and leaves in them the inputs of the step that continues it (the token it drew, the
next position): a step fed the token the last one returned, at the next position (an int), and
the same sampling settings, copies nothing in before its graph runs. Prefill pads the prompt to a
multiple of `PREFILL_MULTIPLE` so compiled prefill sees few distinct shapes, and returns the
logits of each row's last real token only.
Next to compiled decode on a GPU, a short prompt's prefill (up to max(PREFILL_GRAPH_LENGTHS)
tokens, a first prompt or a chat's next turn) replays a CUDA graph captured per padded length
instead of launching every kernel from Python.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from tachylm.cache import KVCache
from tachylm.kernels import custom_ops
from tachylm.model import Transformer
from tachylm.sampling import SamplingPlan, SamplingTensors, sample

PREFILL_MULTIPLE = 16
# Prompt lengths (after padding) whose prefill replays a captured CUDA graph when decode is
# compiled on a GPU. A short prompt's eager prefill is bound by the host launching ~20 kernels a
# layer (48 ms for 5 tokens of the Llama-3.1-8B shape on an H100, BENCHMARKS.md), far more than
# its GPU work; from a few hundred tokens the GPU work hides the launches.
PREFILL_GRAPH_LENGTHS = (16, 32, 64, 128, 256)


def padded_length(length: int, limit: int) -> int:
    """Prompt length rounded up to the prefill granularity, never past `limit`."""
    return min(-(-length // PREFILL_MULTIPLE) * PREFILL_MULTIPLE, limit)


def prefill_graph_length(length: int, start_pos: int, max_seq_len: int) -> int | None:
    """The captured prefill length that serves a prompt of `length` tokens at `start_pos`, or None
    where prefill runs eagerly (longer than the longest graph, or padded past the cache's end)."""
    return next((n for n in PREFILL_GRAPH_LENGTHS if length <= n and start_pos + n <= max_seq_len),
                None)


class _PrefillGraph:
    """Prefill of one padded length, captured as a CUDA graph over fixed input buffers. Replaying
    it writes the prompt's keys and values into the cache and leaves the logits of each row's last
    real token in `logits`.

    A graph for prompts at position 0 attends causally over the prompt's own slots (kv_limit =
    its length, `fresh`); one for later prompts (a chat's next turn) over the whole cache, masked
    by position, since where the history ends changes from call to call.
    """

    def __init__(self, steps: "Steps", tokens: torch.Tensor, input_pos: torch.Tensor,
                 logit_index: torch.Tensor, kv_limit: int | None, pool) -> None:
        # The buffers start with the first call's inputs, so the run before the capture writes
        # the cache exactly as the replay will (a prompt past position 0 must leave the earlier
        # slots alone). Every tensor the graph reads must outlive it: it holds addresses.
        self.tokens, self.input_pos = tokens.clone(), input_pos.clone()
        self.logit_index = logit_index.clone()

        def run():
            return steps._prefill_impl(self.tokens, self.input_pos, self.logit_index, kv_limit,
                                       fresh=kv_limit is not None)

        # The first run, outside the capture, also tunes and sets up the kernels (their first
        # call must not be captured).
        device = steps.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = run()

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor,
                 logit_index: torch.Tensor) -> torch.Tensor:
        torch._foreach_copy_([self.tokens, self.input_pos, self.logit_index],
                             [tokens, input_pos, logit_index])
        self.graph.replay()  # (a first call replays what its capture run did: the same writes)
        return self.logits.clone()  # the next replay overwrites `logits`


def register_inductor_fallbacks() -> list:
    """Register tachylm's custom ops with Inductor as fallback kernels before anything compiles;
    return the ones registered now.

    Inductor registers an op it has not seen at the op's first call in a graph, and up to at least
    torch 2.11 it formats that call's arguments for a log line eagerly, whatever the log level.
    The text of an argument includes its producers' arguments, recursively: when the first call
    sits deep in a graph (the dense output head after 32 int8 layers, whose residual stream runs
    from op to op) the text doubles with every layer and compilation never ends. Registered up
    front, with the layout constraint Inductor would choose itself, no text is made. Where
    Inductor's internals differ (other torch versions) nothing is registered and Inductor does it.
    """
    try:
        from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:
        return []
    registered = []
    for op in custom_ops():
        if op not in lowerings:
            tag = get_layout_constraint_tag(op, with_default=True)
            make_fallback(op, layout_constraint=tag_to_layout_constraint(tag))
            registered.append(op)
    return registered


def _holding(source) -> tuple:
    """What a buffer holds once `source` (a tensor or an int) is in it: the source, and its
    version where it counts versions (inference tensors do not)."""
    if isinstance(source, int) or source.is_inference():
        return source, None
    return source, source._version


def _float_copy(logits: torch.Tensor) -> torch.Tensor:
    """A fresh float32 copy of a step's logits (a CUDA-graph output is overwritten by the next
    replay)."""
    return logits.to(torch.float32, copy=True)


def _holds(held: tuple | None, source) -> bool:
    """A buffer holding `held` (see `_holding`) holds `source` already: the same int, or the
    same memory (the tensor itself, or a contiguous view of it with as many elements, as the
    [B, 1] view of the [B] token a step returned), unmodified since where versions are counted.
    An inference tensor changed in place under inference mode is not noticed: Steps' callers
    pass new tensors or the ones they were given, unchanged."""
    if held is None:
        return False
    if isinstance(source, int) or isinstance(held[0], int):
        return isinstance(source, int) and isinstance(held[0], int) and held[0] == source
    tensor, version = held
    return (source.dtype == tensor.dtype and source.data_ptr() == tensor.data_ptr()
            and source.numel() == tensor.numel() and source.is_contiguous()
            and tensor.is_contiguous()
            and _holding(source)[1] == version)


class Steps:
    """Prefill/decode callables bound to a model and its cache.

    Args:
        model: the network.
        cache: its KV cache (batch size and length fixed here).
        compile_decode: compile the decode step (CUDA graphs on a GPU).
        compile_prefill: compile prefill (dynamic length, so prompts do not recompile).
        prefill_graphs: replay prefills of up to max(PREFILL_GRAPH_LENGTHS) tokens as CUDA
            graphs, one captured per padded length (and for position 0 or later) at its first use
            (CUDA only; None = when decode is compiled on a GPU and prefill is not).
        backend: torch.compile backend ("inductor"; "eager"/"aot_eager" for fast CPU tests).
        tuning: Inductor's coordinate-descent tuning on CUDA. It finds better launch parameters
            for matrix-vector products Inductor generates itself (models without FastLinear or
            quantized Linears); with tachylm's GEMV and attention kernels only small pointwise
            kernels are left to it, and on an H100 (Llama-3.1-8B shape) it cost 14 s of cold and
            28 s of warm compile time for no speed (BENCHMARKS.md), so it is off by default.
    """

    def __init__(self, model: Transformer, cache: KVCache, *, compile_decode: bool = False,
                 compile_prefill: bool = False, prefill_graphs: bool | None = None,
                 backend: str = "inductor", tuning: bool = False):
        self.model = model
        self.cache = cache
        self.compile_decode = compile_decode
        self.compile_prefill = compile_prefill
        on_gpu = cache.device.type == "cuda"
        if prefill_graphs is None:
            prefill_graphs = compile_decode and on_gpu and not compile_prefill
        elif prefill_graphs and not on_gpu:
            raise ValueError(f"prefill_graphs needs the cache on a CUDA device, not {cache.device}")
        self.prefill_graphs = prefill_graphs
        self._captured_prefills: dict[tuple[int, int, bool], _PrefillGraph] = {}
        self._graph_pool = None
        self.backend = backend
        self.tuning = tuning
        self._decode_fns: dict[SamplingPlan, Callable] = {}
        self._decode_inputs: dict[tuple, list[torch.Tensor]] = {}  # see _static_inputs
        # per set of buffers: what they hold now, as (source tensor or int, its version) pairs
        self._held: dict[tuple, list] = {}
        self._prefill_fn = self._prefill_impl
        if backend == "inductor" and (compile_decode or compile_prefill):
            register_inductor_fallbacks()
        if compile_prefill:
            self._prefill_fn = torch.compile(self._prefill_impl, fullgraph=True, dynamic=True,
                                             backend=backend, options=self._options(cudagraphs=False))

    def _options(self, cudagraphs: bool) -> dict | None:
        """Inductor options, scoped to these compiled callables (never set globally)."""
        if self.backend != "inductor":
            return None
        # triton.cudagraphs is what mode="reduce-overhead" turns on; coordinate-descent tuning
        # only when asked (see the class docstring).
        return {"triton.cudagraphs": cudagraphs,
                "coordinate_descent_tuning": self.tuning and self.device.type == "cuda"}

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def _prefill_impl(self, tokens, input_pos, logit_index, kv_limit=None, fresh=False):
        return self.model(tokens, input_pos, self.cache, logit_index, kv_limit, fresh=fresh)[:, 0]

    def _decode_impl(self, token, input_pos, settings, seen, plan, kv_limit=None, advance=False):
        # The logits in the head's dtype (float32 would hold them exactly): a 16-bit one selects
        # the top-k candidates in half the radix passes, and the step writes no float32 copy.
        logits = self.model(token, input_pos, self.cache, kv_limit=kv_limit,
                            float_logits=False)[:, -1]
        # Compiled steps over their own buffers leave the next step's inputs in them.
        next_token = sample(logits.to(self.model.embed.weight.dtype), settings, plan, seen,
                            feed=(token, input_pos) if advance else None)
        return next_token, logits

    def _decode_fn(self, plan: SamplingPlan) -> Callable:
        fn = self._decode_fns.get(plan)
        if fn is None:
            fn = functools.partial(self._decode_impl, plan=plan)
            if self.compile_decode:
                fn = torch.compile(functools.partial(fn, advance=True), fullgraph=True,
                                   backend=self.backend,
                                   options=self._options(cudagraphs=self.device.type == "cuda"))
            self._decode_fns[plan] = fn
        return fn

    def _static_inputs(self, sources: list) -> tuple[tuple, list[torch.Tensor]]:
        """Bring this step's persistent input buffers to `sources`; return their key and them.

        CUDA-graph trees copy every graph input whose address is not static into the graph's own
        memory, one small kernel each; buffers marked static (as the KV cache is) are read in
        place. They are made once per set of shapes, inside inference mode like every decode
        input, so compiled graphs never see the kind of tensor change. A buffer that already
        holds its source (see `_holds`) is not copied again: a decode loop's settings are copied
        once, and a step that continues the last one copies nothing.

        Args:
            sources: the step's inputs in the compiled function's order: tensors, and the
                position as a [B, 1] tensor or an int (every row at that position).
        Returns:
            (key, buffers): the buffers have the sources' shapes and dtypes (the position's:
            the token's shape, long), on this step's device, holding their values.
        """
        # an int position takes the buffer a [B, 1] position tensor would: one set of buffers
        # (and one CUDA graph) serves both
        shapes = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor)
                  else (tuple(sources[0].shape), torch.long) for t in sources]
        key = tuple(shapes)
        buffers = self._decode_inputs.get(key)
        if buffers is None:
            buffers = [torch.empty(shape, dtype=dtype, device=self.device)
                       for shape, dtype in shapes]
            for buffer in buffers:
                torch._dynamo.mark_static_address(buffer)
            self._decode_inputs[key] = buffers
        held = self._held.pop(key, [None] * len(sources))  # a failed step leaves none held
        copies = []
        for buffer, source, what in zip(buffers, sources, held):
            if _holds(what, source):
                continue
            if isinstance(source, int):
                buffer.fill_(source)
            else:
                copies.append((buffer, source))
        # One kernel per dtype: _foreach_copy_ fuses the copies only when all sources share one.
        for dtype in dict.fromkeys(t.dtype for _, t in copies):
            pairs = [(b, t) for b, t in copies if t.dtype == dtype]
            torch._foreach_copy_([b for b, _ in pairs], [t for _, t in pairs])
        self._held[key] = [_holding(t) for t in sources]
        return key, buffers

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Write a prompt into the cache and return the logits after its last token.

        Args:
            tokens: [B, T] ids, all rows the same length, placed at positions start_pos...
            start_pos: position of the first token.
        Returns:
            [B, vocab] float32 logits for the token after the prompt.
        """
        batch, length = tokens.shape
        end = start_pos + length
        if end > self.cache.max_seq_len:
            raise ValueError(f"prompt ends at position {end}, past the context length "
                             f"{self.cache.max_seq_len}; shorten it or raise --max-seq-len")
        padded = padded_length(length, self.cache.max_seq_len - start_pos)
        graph_length = (prefill_graph_length(length, start_pos, self.cache.max_seq_len)
                        if self.prefill_graphs else None)
        if graph_length is not None:
            padded = graph_length
        # Padding goes into cache slots past the prompt; they are masked until overwritten. The
        # pad (even by 0) also makes `tokens` an inference tensor like every other input here, so
        # compiled graphs see one kind of tensor and never recompile over it.
        tokens = torch.nn.functional.pad(tokens, (0, padded - length))
        logit_index = torch.full((batch,), length - 1, device=tokens.device)
        input_pos = torch.arange(start_pos, start_pos + padded, device=tokens.device).expand(batch, -1)
        if graph_length is not None:
            key = (batch, graph_length, start_pos == 0)
            graph = self._captured_prefills.get(key)
            if graph is None:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                graph = _PrefillGraph(self, tokens, input_pos, logit_index,
                                      graph_length if start_pos == 0 else None, self._graph_pool)
                self._captured_prefills[key] = graph
            return graph(tokens, input_pos, logit_index)
        if self.compile_prefill:
            return self._prefill_fn(tokens, input_pos, logit_index).clone()
        return self._prefill_fn(tokens, input_pos, logit_index, start_pos + padded,
                                fresh=start_pos == 0)

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, input_pos: torch.Tensor | int, settings: SamplingTensors,
               plan: SamplingPlan, seen: torch.Tensor | None = None, kv_limit: int | None = None,
               return_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step: feed `token` at `input_pos`, sample the next token.

        Args:
            token: [B, 1] ids; input_pos: [B, 1] positions, or an int (every row's). A
                compiled step fed the token the step before returned (or a view of it,
                unmodified) at the position after that step's int copies neither in.
            settings, plan, seen: sampling (see sampling.sample).
            kv_limit: exclusive bound on the positions in use; eager steps attend over that
                prefix of the cache only (compiled steps keep static shapes and ignore it).
            return_logits: also return the logits; without them a compiled step saves a copy.
        Returns:
            (next token [B], logits [B, vocab] or None); fresh tensors the caller may keep.
        """
        if plan.penalize and seen is None:
            raise ValueError("this sampling plan applies a repetition penalty: pass `seen`, the "
                             "[B, vocab] mask of tokens already in each row")
        fn = self._decode_fn(plan)
        if not self.compile_decode:
            if isinstance(input_pos, int):
                input_pos = torch.full(token.shape, input_pos, device=token.device)
            next_token, logits = fn(token, input_pos, settings, seen, kv_limit=kv_limit)
            return next_token, _float_copy(logits) if return_logits else None
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # `seen` only where the plan reads it, so no step copies a [B, vocab] mask for nothing.
        sources = [token, input_pos, *settings, *([seen] if plan.penalize else [])]
        key, buffers = self._static_inputs(sources)
        settings = SamplingTensors(*buffers[2:2 + len(settings)])
        try:
            next_token, logits = fn(buffers[0], buffers[1], settings,
                                    buffers[-1] if plan.penalize else None)
        except BaseException:
            del self._held[key]  # the step may have advanced its buffers: trust none of them
            raise
        # CUDA-graph outputs are overwritten by the next replay: hand out copies. The step left
        # the token it drew and the next position in the buffers: a step fed this copy (or a
        # view of it, unmodified) and that position copies neither in.
        next_token = next_token.clone()
        self._held[key][:2] = ([_holding(next_token), _holding(input_pos + 1)]
                               if isinstance(input_pos, int) else [None, None])
        return next_token, _float_copy(logits) if return_logits else None
