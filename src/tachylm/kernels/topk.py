"""Top-k sampling of 16-bit logits in three small kernels (CUDA), in place of a radix top-k.

Decode samples the 8B shape's 128256 logits with top-k 200 every token. Through torch that is
`topk` (a multi-pass radix select, a dozen kernels), a gather, a softmax, a random draw and an
argmax: about 60 us a token with their gaps on an H100, against about 15 us for these kernels
(BENCHMARKS.md). Here each row is split into chunks of `_CHUNK` logits, a program each, and
each logit gets an order-preserving 16-bit key:

1. every chunk histograms the high bytes of its keys into the row's histogram (atomics);
2. every chunk finds the high byte h of the row's k-th largest key from it, and histograms the
   low bytes of its keys whose high byte is h;
3. every chunk finds the k-th largest key t the same way and runs the exponential race over its
   keys >= t (argmax of logit / T + Gumbel noise, a draw from the softmax over those logits);
   the last program of the row to arrive picks the best of the chunks' winners, resets the
   row's histograms for the next call and, with a feed, writes the token into the next step's
   token buffer and advances its position.

The candidates are every logit >= the k-th largest, as transformers' top-k keeps them: more
than k where logits tie at the k-th place. Rows with temperature 0 take the largest logit (the
lowest id among equals, as argmax). The keys order the logits' bit patterns as floats (-0 ranks
just below +0).

What the kernels keep between calls lives in per-device buffers (`persistent_zeros`), so the
launches need no zeroing or seeding kernel of their own and are safe in CUDA graphs: the
histograms (left at zero by every call) and the noise's seed, which the last program of a call
advances by one. `seed_sampling` sets that seed, from torch's default generator unless given one
(`torch.manual_seed` then reproduces the draws); a graph replay draws afresh. The buffers are
shared by every call on the device, so calls must not run concurrently on two streams.

`topk_sample_ref` is the same draw in PyTorch (given the noise), the oracle of the tests.
"""

import contextlib

import torch

from tachylm.kernels.quant_matmul import HAS_TRITON, pdl_launch, persistent_zeros

if HAS_TRITON:
    import triton
    import triton.language as tl

    from tachylm.kernels.quant_matmul import pdl_release, pdl_start

_CHUNK = 1024  # logits a program takes (126 programs a row for a 128256-token vocabulary)
_BINS = 256  # one byte of a 16-bit key
_ROW_SLOTS = 2 * _BINS + 1  # a row's counts: high bytes' histogram, low bytes', arrivals
SAMPLE_DTYPES = (torch.bfloat16, torch.float16)


def keys_ref(logits: torch.Tensor) -> torch.Tensor:
    """Order-preserving integer keys (int32 in 0..65535) of 16-bit floats' bit patterns."""
    bits = logits.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.where(bits >= 0x8000, 0xFFFF - bits, bits | 0x8000)


def candidates_ref(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[B, V] bool: each row's logits whose keys are >= its k-th largest key."""
    keys = keys_ref(logits)
    return keys >= keys.topk(k, dim=-1).values[:, -1:]


def gumbel_ref(seed: int, batch: int, vocab: int, device=None) -> torch.Tensor:
    """Not the kernel's noise (Triton's Philox): a stand-in with the same law, for references."""
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    u = torch.rand(batch, vocab, generator=gen, device=device).clamp_min(1e-20)
    return -torch.log(-torch.log(u))


def topk_sample_ref(logits: torch.Tensor, temperature: torch.Tensor, k: int,
                    noise: torch.Tensor) -> torch.Tensor:
    """The kernels' draw in PyTorch, given the Gumbel noise [B, V] (float32).

    Args:
        logits: [B, V] bfloat16 or float16.
        temperature: [B] float32; 0 = greedy.
        k: candidates a row (1..V).
        noise: [B, V] standard Gumbel samples.
    Returns:
        [B] int64 token ids.
    """
    candidates = candidates_ref(logits, k)
    values = logits.float()
    scores = values / temperature.clamp_min(1e-5)[:, None] + noise
    scores = torch.where(temperature[:, None] > 0, scores, values)
    scores = torch.where(candidates & ~scores.isnan(), scores, float("-inf"))
    return scores.argmax(dim=-1)  # the first of the best, as the kernels choose


if HAS_TRITON:

    @triton.jit
    def _keys(bits):
        """Keys of 16-bit floats given as int16 bit patterns (see keys_ref)."""
        u = bits.to(tl.int32) & 0xFFFF
        return tl.where(u >= 0x8000, 0xFFFF - u, u | 0x8000)

    @triton.jit
    def _kth_bin(hist_ptr, k, BINS: tl.constexpr):
        """The bin of the k-th largest key in a histogram, and how many keys lie above it."""
        bins = tl.arange(0, BINS)
        hist = tl.load(hist_ptr + bins, cache_modifier=".cg")
        at_or_above = tl.cumsum(hist, 0, reverse=True)
        kth = tl.max(tl.where(at_or_above >= k, bins, -1), 0)
        return kth, tl.sum(tl.where(bins == kth, at_or_above - hist, 0), 0)

    _SLOTS = tl.constexpr(_ROW_SLOTS)

    @triton.jit
    def _row_counts(counts_ptr, row):
        """A row's counts in the histograms buffer (`histograms`): the high bytes' histogram,
        then the low bytes' (_BINS each), then the row's arrivals."""
        return counts_ptr + row * _SLOTS

    @triton.jit
    def _chunk(bits_ptr, row, stride, V, CHUNK: tl.constexpr):
        """This program's logits (as int16 bits; 0 past V), their ids and the mask of real ones.

        The second and third kernels load them before they wait for the kernel before them
        (programmatic dependent launch): that kernel (the first or second) writes no logits,
        and it was launched only once every program of the first had passed its own wait, so
        the kernel that wrote the logits has finished. The first kernel loads them after its
        wait: the kernel before it may be the one writing them."""
        offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < V
        return tl.load(bits_ptr + row * stride + offs, mask=mask, other=0), offs, mask

    @triton.jit
    def _high_byte_kernel(bits_ptr, counts_ptr, V, stride, CHUNK: tl.constexpr,
                          BINS: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0)
        pdl_start(PDL)
        bits, _, mask = _chunk(bits_ptr, row, stride, V, CHUNK)  # after the wait: see _chunk
        pdl_release(PDL)
        hist = tl.histogram(_keys(bits) >> 8, BINS, mask=mask)
        bins = tl.arange(0, BINS)
        tl.atomic_add(_row_counts(counts_ptr, row) + bins, hist, mask=hist > 0,
                      sem="relaxed")

    @triton.jit
    def _low_byte_kernel(bits_ptr, counts_ptr, V, stride, k, CHUNK: tl.constexpr,
                         BINS: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0)
        bits, _, mask = _chunk(bits_ptr, row, stride, V, CHUNK)
        pdl_start(PDL)
        pdl_release(PDL)
        counts_ptr = _row_counts(counts_ptr, row)
        high, _ = _kth_bin(counts_ptr, k, BINS)
        keys = _keys(bits)
        hist = tl.histogram(keys & 0xFF, BINS, mask=mask & ((keys >> 8) == high))
        bins = tl.arange(0, BINS)
        tl.atomic_add(counts_ptr + BINS + bins, hist, mask=hist > 0, sem="relaxed")

    @triton.jit
    def _race_kernel(bits_ptr, temp_ptr, seed_ptr, counts_ptr, best_ptr, index_ptr, out_ptr,
                     tok_ptr, pos_ptr, V, stride, k, NCHUNK, ROWS, stride_tok, stride_pos,
                     NCHUNK_P2: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr,
                     DTYPE: tl.constexpr, FEED: tl.constexpr, PDL: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        rows_done_ptr = _row_counts(counts_ptr, ROWS)  # rows finished (the last slot)
        bits, offs, mask = _chunk(bits_ptr, row, stride, V, CHUNK)
        pdl_start(PDL)
        pdl_release(PDL)
        counts_ptr = _row_counts(counts_ptr, row)
        high, above = _kth_bin(counts_ptr, k, BINS)
        low, _ = _kth_bin(counts_ptr + BINS, k - above, BINS)
        chosen = mask & (_keys(bits) >= high * BINS + low)  # the k-th largest key and above
        best_s, best_i = float("-inf"), 2147483647
        if tl.max(chosen.to(tl.int32), 0) > 0:
            temperature = tl.load(temp_ptr + row)
            values = bits.to(DTYPE, bitcast=True).to(tl.float32)
            u = tl.rand(tl.load(seed_ptr), row * V + offs)
            noisy = values / tl.maximum(temperature, 1e-5) - tl.log(-tl.log(u))
            scores = tl.where(temperature > 0, noisy, values)
            scores = tl.where(chosen & (scores == scores), scores, float("-inf"))  # NaN: -inf
            best_s = tl.max(scores, 0)
            best_i = tl.min(tl.where(chosen & (scores == best_s), offs, 2147483647), 0)
        tl.store(best_ptr + row * NCHUNK + chunk, best_s)
        tl.store(index_ptr + row * NCHUNK + chunk, best_i)
        # The last program of the row to arrive picks the best of the chunks' bests.
        arrived = tl.atomic_add(counts_ptr + 2 * BINS, 1, sem="acq_rel", scope="gpu")
        if arrived == NCHUNK - 1:
            chunks = tl.arange(0, NCHUNK_P2)
            valid = chunks < NCHUNK
            scores = tl.load(best_ptr + row * NCHUNK + chunks, mask=valid, other=float("-inf"),
                             cache_modifier=".cg")
            index = tl.load(index_ptr + row * NCHUNK + chunks, mask=valid, other=2147483647,
                            cache_modifier=".cg")
            top = tl.max(scores, 0)
            token = tl.minimum(tl.min(tl.where(scores == top, index, 2147483647), 0), V - 1)
            tl.store(out_ptr + row, token.to(tl.int64))
            # The bookkeeping below is off the token's path: stores and relaxed atomics whose
            # results are not waited for, so they overlap (one memory round trip, not several).
            if FEED:  # the next step's inputs: this token at the next position
                tl.store(tok_ptr + row * stride_tok, token.to(tl.int64))
                tl.atomic_add(pos_ptr + row * stride_pos, 1, sem="relaxed", scope="gpu")
            # Every program of the row has read the histograms and arrived (its atomic has
            # been performed): zero them and the arrivals for the next call.
            zeros = tl.arange(0, 4 * BINS)
            tl.store(counts_ptr + zeros, tl.zeros((4 * BINS,), tl.int32),
                     mask=zeros < _SLOTS)
            # The last row to finish advances the seed: every program of the call has read it
            # (before it arrived), so the next call draws with the next one.
            if ROWS == 1:
                tl.atomic_add(seed_ptr, 1, sem="relaxed", scope="gpu")
            elif tl.atomic_add(rows_done_ptr, 1, sem="acq_rel", scope="gpu") == ROWS - 1:
                tl.atomic_add(seed_ptr, 1, sem="relaxed", scope="gpu")
                tl.atomic_xchg(rows_done_ptr, 0, sem="relaxed", scope="gpu")


def _layout_fits(logits: torch.Tensor) -> bool:
    """[B, V] 16-bit logits with unit stride along V: what the kernels read."""
    return logits.dim() == 2 and logits.dtype in SAMPLE_DTYPES and logits.stride(-1) == 1


def _check(logits: torch.Tensor, temperature: torch.Tensor, k: int) -> None:
    if not _layout_fits(logits):
        raise ValueError(f"topk_sample: logits must be [B, V] bfloat16 or float16 with unit "
                         f"stride along V, got {tuple(logits.shape)} {logits.dtype} "
                         f"strides {logits.stride()}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"topk_sample: k must be in 1..{logits.shape[1]} (the vocabulary), "
                         f"got {k}")
    if temperature.shape != (logits.shape[0],) or temperature.dtype != torch.float32:
        raise ValueError(f"topk_sample: temperature must be [B] float32, got "
                         f"{tuple(temperature.shape)} {temperature.dtype}")


def _seed_buffer(device: torch.device) -> torch.Tensor:
    return persistent_zeros("top-k seed", device, 1, torch.int64)


def histograms(device: torch.device, batch: int) -> torch.Tensor:
    """The kernels' counts for `batch` rows: per row the high bytes' histogram, the low bytes'
    (of the k-th key's high byte) and the row's arrivals; then the rows finished. Every call
    leaves them at zero."""
    return persistent_zeros("top-k histograms", device, batch * _ROW_SLOTS + 1)


def _seed_state(device: torch.device) -> torch.Tensor:
    """The device's noise seed ([1] int64), which every call advances by one; seeded from torch's
    default generator when first made."""
    state = _seed_buffer(device)
    if _SEEDED.get(device) is not state:
        seed_sampling(device)
    return state


_SEEDED: dict = {}  # device -> the seed buffer that seed_sampling last set


def seed_sampling(device, seed: int | None = None) -> None:
    """Set the kernels' noise seed on `device`: `seed`, or one drawn from torch's default (CPU)
    generator, so `torch.manual_seed` followed by this call reproduces the draws that follow.
    A stream-ordered fill: safe between CUDA-graph replays, not inside a capture."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if seed is None:
        seed = int(torch.randint(2**62, (1,)))
    state = _seed_buffer(device)
    state.fill_(seed)
    _SEEDED[device] = state


def _check_feed(feed, batch: int) -> None:
    for name, t in zip(("token", "position"), feed):
        if t.shape != (batch, 1) or t.dtype != torch.int64:
            raise ValueError(f"topk_sample: the feed's {name} buffer must be [{batch}, 1] int64, "
                             f"got {tuple(t.shape)} {t.dtype}")


def topk_sample_triton(logits: torch.Tensor, temperature: torch.Tensor, k: int,
                       seed: torch.Tensor | None = None, feed: tuple | None = None
                       ) -> torch.Tensor:
    """The kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    Args:
        logits: [B, V] bfloat16 or float16, unit stride along V.
        temperature: [B] float32; 0 = greedy (the largest logit).
        k: candidates a row, 1..V.
        seed: [1] int64, the noise's seed, advanced by one by the call; None: the device's own
            (`seed_sampling`).
        feed: optional (token [B, 1], position [B, 1]) int64 buffers: the call writes each row's
            token into the first and adds one to the second.
    Returns:
        [B] int64 token ids.
    """
    _check(logits, temperature, k)
    batch, vocab = logits.shape
    if feed is not None:
        _check_feed(feed, batch)
    chunks = -(-vocab // _CHUNK)
    device = logits.device
    if seed is None:
        seed = _seed_state(device)
    counts = histograms(device, batch)
    best = torch.empty((batch, chunks), dtype=torch.float32, device=device)
    index = torch.empty((batch, chunks), dtype=torch.int32, device=device)
    out = torch.empty((batch,), dtype=torch.int64, device=device)
    token, position = (out, out) if feed is None else feed  # without a feed: never written
    bits = logits.view(torch.int16)
    launch = dict(CHUNK=_CHUNK, BINS=_BINS, num_warps=4, **pdl_launch(device))
    dtype = tl.bfloat16 if logits.dtype == torch.bfloat16 else tl.float16
    stride = logits.stride(0)
    with torch.cuda.device(device) if logits.is_cuda else contextlib.nullcontext():
        _high_byte_kernel[(batch, chunks)](bits, counts, vocab, stride, **launch)
        _low_byte_kernel[(batch, chunks)](bits, counts, vocab, stride, k, **launch)
        _race_kernel[(batch, chunks)](bits, temperature, seed, counts, best, index, out, token,
                                      position, vocab, stride, k, chunks, batch, token.stride(0),
                                      position.stride(0),
                                      NCHUNK_P2=triton.next_power_of_2(chunks), DTYPE=dtype,
                                      FEED=feed is not None, **launch)
    return out


@torch.library.custom_op("tachylm::topk_sample", mutates_args=(),
                         schema="(Tensor logits, Tensor temperature, SymInt k) -> Tensor")
def _topk_sample_op(logits, temperature, k):
    return topk_sample_triton(logits, temperature, k)


@_topk_sample_op.register_fake
def _topk_sample_fake(logits, temperature, k):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@torch.library.custom_op("tachylm::topk_sample_feed", mutates_args=("token", "position"),
                         schema="(Tensor logits, Tensor temperature, SymInt k, Tensor(a!) token, "
                                "Tensor(b!) position) -> Tensor")
def _topk_sample_feed_op(logits, temperature, k, token, position):
    return topk_sample_triton(logits, temperature, k, feed=(token, position))


@_topk_sample_feed_op.register_fake
def _topk_sample_feed_fake(logits, temperature, k, token, position):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def topk_sample_applies(logits: torch.Tensor) -> bool:
    """The kernels take these logits: 16-bit, [B, V] with unit stride along V, on CUDA."""
    return HAS_TRITON and logits.is_cuda and _layout_fits(logits)


def topk_sample(logits: torch.Tensor, temperature: torch.Tensor, k: int,
                feed: tuple | None = None) -> torch.Tensor:
    """Draw one token a row from the softmax of logits / temperature over the row's logits >=
    its k-th largest (k of them, more where logits tie at the k-th place); the largest logit
    (its lowest id) where temperature is 0. CUDA (see `topk_sample_applies`); a custom op, so
    it runs inside compiled steps and CUDA graphs, with fresh noise every call (`seed_sampling`).

    Args:
        logits: [B, V] bfloat16 or float16.
        temperature: [B] float32.
        k: candidates a row, 1..V.
        feed: optional (token [B, 1], position [B, 1]) int64: the next step's input buffers;
            the kernels write the drawn tokens into the first and add one to the second.
    Returns:
        [B] int64 token ids.
    """
    _check(logits, temperature, k)
    if feed is None:
        return _topk_sample_op(logits, temperature, k)
    _check_feed(feed, logits.shape[0])
    return _topk_sample_feed_op(logits, temperature, k, *feed)
