"""Multi-head attention: one `attention` function with a selectable implementation, and the projection module."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdjax.layers.primitives import EMBED, HEADS, axis_names, dense


def _dot_product(implementation: str | None) -> Callable:
    def run(q, k, v, causal=False):
        # XLA's path computes logits and softmax in float32 for bfloat16 inputs.
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    return run


SPLASH_BLOCK = 512  # query and key rows per splash kernel block (at most; short sequences take one 128-row block)


def _splash(q, k, v, causal=False):
    """The Pallas TPU splash attention kernel (jax.experimental.pallas.ops.tpu.splash_attention), one call per batch
    element (vmap). The kernel wants (heads, tokens, head_dim) with the tokens a multiple of its block and a lane-wide
    head_dim: queries and keys are zero-padded to whole blocks (padded keys masked out, padded queries dropped) and
    head_dim to a multiple of 128 (zero columns change no logit and add only zero outputs). q is pre-scaled, since
    the kernel does not scale. Off TPU it runs in Pallas' interpreter: exact but slow, for tests.

    XLA cannot partition a kernel: under a mesh set as context (`jax.set_mesh`, as the Trainer does) it runs per
    device through shard_map, the batch split over the mesh's data axes and the heads over 'tensor' where they
    divide; without one, XLA gathers its inputs and runs it whole on each device."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    b, t, n, d = q.shape
    s = k.shape[1]

    def block(length):
        return min(SPLASH_BLOCK, -(-length // 128) * 128)

    bq, bkv = block(t), block(s)
    tp, sp, dp = -(-t // bq) * bq, -(-s // bkv) * bkv, -(-d // 128) * 128
    if sp == s and not causal:
        mask = mask_lib.FullMask((tp, sp))
    elif sp == s and tp == t:
        mask = mask_lib.CausalMask((tp, sp))
    else:
        allowed = np.zeros((tp, sp), bool)
        allowed[:, :s] = True
        if causal:
            allowed &= np.tri(tp, sp, dtype=bool)
        mask = mask_lib.NumpyMask(allowed)

    def kernel(heads):  # the splash kernel for this many heads (a device's share under shard_map)
        sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                      block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
        return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * heads), head_shards=1, q_seq_shards=1,
                                          block_sizes=sizes, interpret=jax.default_backend() != "tpu")

    def heads_first(x, length):  # (b, tokens, n, d) -> (b, n, length, dp)
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dp - d)))
        return x.transpose(0, 2, 1, 3)

    def local(q, k, v):  # this device's batch rows and heads
        scaled = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype)
        out = jax.vmap(kernel(q.shape[2]))(heads_first(scaled, tp), heads_first(k, sp), heads_first(v, sp))
        return out.transpose(0, 2, 1, 3)[:, :t, :, :d].astype(q.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v)
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    if b % int(np.prod([mesh.shape[a] for a in batch_axes])):
        batch_axes = ()
    heads_axis = "tensor" if mesh.shape.get("tensor", 1) > 1 and n % mesh.shape["tensor"] == 0 else None
    spec = jax.sharding.PartitionSpec(batch_axes or None, None, heads_axis, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


BLOCK_BYTES = 4 << 20  # float32 logits per block: a few MB stay in a CPU core's cache
# From this many keys on, the probabilities' row sums come out of the PV product (a column of ones in V) instead
# of a pass of their own over the (queries, keys) block: at 1024 keys, head width 8, one attention runs 1.3x faster
# (XLA's CPU dot also prefers 16 columns to 8); at 256 keys or fewer the wider product costs more than the pass.
SUMS_IN_PV_MIN_KEYS = 512


def _block_plan(t: int, s: int) -> tuple[int, int]:
    """(query rows per block, sequences per block) for t queries over s keys: all the queries, halved while one
    sequence's logits exceed BLOCK_BYTES; then as many sequences as fit."""
    q_rows = t
    while q_rows * s * 4 > BLOCK_BYTES and q_rows % 2 == 0:
        q_rows //= 2
    return q_rows, max(1, BLOCK_BYTES // (q_rows * s * 4))


def _per_sequence(fn, args: tuple, per_block: int):
    """fn over the leading (sequence) axis of every array in args, per_block sequences at a time: one vmap where they
    all fit, else a loop of vmaps (lax.map)."""
    if per_block >= args[0].shape[0]:
        return jax.vmap(fn)(*args)
    return jax.lax.map(lambda a: fn(*a), args, batch_size=per_block)


def _logits(q, k, rows, causal: bool):
    """(r, d) queries at positions `rows`, (s, d) keys -> (r, s) float32 scaled logits (-inf where causal hides)."""
    scaled = q.astype(jnp.float32) * q.shape[-1] ** -0.5  # r x d multiplies instead of r x s
    logits = jnp.einsum("qd,sd->qs", scaled, k, preferred_element_type=jnp.float32)
    if causal:
        logits = jnp.where(rows[:, None] >= jnp.arange(k.shape[0])[None, :], logits, -jnp.inf)
    return logits


def _sequence_forward(q, k, v, causal: bool):
    """One sequence: q (chunks, r, d), k (s, d), v (s, d) or (s, > d) with a column of ones at d (the row sums come
    out of the PV product, see _with_ones_column) -> out (chunks, r, d), logsumexp of the logits (chunks, r)."""
    r, d = q.shape[1], q.shape[-1]
    sums_in_pv = v.shape[-1] > d

    def chunk(args):
        c, qc = args
        logits = _logits(qc, k, c * r + jnp.arange(r), causal)
        top = logits.max(-1, keepdims=True)
        p = jnp.exp(logits - top)
        out = jnp.einsum("qs,sd->qd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        total = out[:, d:d + 1] if sums_in_pv else p.sum(-1, keepdims=True)
        return (out[:, :d] / total).astype(q.dtype), (top + jnp.log(total))[:, 0]  # normalised after PV

    return jax.lax.map(chunk, (jnp.arange(q.shape[0]), q))


def _transposed_product(a, b):
    """a (q, d), b (q, s) -> a^T b (d, s) in float32. XLA's CPU dot contracting both operands' leading axis is slow
    as "qs,qd->sd" (6x this layout at 256 tokens) and, for frames-long sequences, in any layout: there a broadcast
    product and sum runs 4-5x faster."""
    if a.shape[0] * b.shape[1] <= 256:
        return jnp.sum(a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[:, None, :], axis=0)
    return jnp.einsum("qd,qs->ds", a, b, preferred_element_type=jnp.float32)


def _sequence_backward(q, k, v, out, lse, g, causal: bool):
    """The gradients of one sequence, the logits recomputed per chunk from the saved logsumexp (flash attention's
    backward): nothing of size (queries, keys) outlives its chunk."""
    r, scale = q.shape[1], q.shape[-1] ** -0.5
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), -1)  # (chunks, r): rowsum(dO * O)

    def chunk(carry, args):
        dk, dv = carry
        c, qc, lc, gc, dc = args
        p = jnp.exp(_logits(qc, k, c * r + jnp.arange(r), causal) - lc[:, None])
        # dK and dV are accumulated transposed, (d, s): see _transposed_product.
        dv = dv + _transposed_product(gc, p.astype(gc.dtype))
        dp = jnp.einsum("qd,sd->qs", gc, v, preferred_element_type=jnp.float32)
        ds = p * (dp - dc[:, None]) * scale
        dq = jnp.einsum("qs,sd->qd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
        dk = dk + _transposed_product(qc, ds.astype(qc.dtype))
        return (dk, dv), dq.astype(q.dtype)

    zeros = jnp.zeros(k.shape[::-1], jnp.float32)
    (dk, dv), dq = jax.lax.scan(chunk, (zeros, zeros), (jnp.arange(q.shape[0]), q, lse, g, delta))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)  # dK, dV as (d, s)


def _heads_first(x, chunks: int | None):
    """(b, tokens, n, d) -> (b * n, chunks, tokens / chunks, d), or (b * n, tokens, d) with chunks=None."""
    b, tokens, n, d = x.shape
    x = x.transpose(0, 2, 1, 3)
    return x.reshape(b * n, tokens, d) if chunks is None else x.reshape(b * n, chunks, tokens // chunks, d)


def _tokens_first(x, b: int, n: int):
    """The inverse of _heads_first: (b * n, [chunks,] rows, d) -> (b, tokens, n, d)."""
    d = x.shape[-1]
    return x.reshape(b, n, -1, d).transpose(0, 2, 1, 3)


def _blocked_forward(q, k, v, causal: bool):
    b, t, n, _ = q.shape
    q_rows, per_block = _block_plan(t, k.shape[1])
    qh, kh, vh = _heads_first(q, t // q_rows), _heads_first(k, None), _heads_first(v, None)
    vp = _with_ones_column(vh) if kh.shape[1] >= SUMS_IN_PV_MIN_KEYS else vh
    out, lse = _per_sequence(lambda q, k, v: _sequence_forward(q, k, v, causal), (qh, kh, vp), per_block)
    return _tokens_first(out, b, n), (qh, kh, vh, out, lse)


def _with_ones_column(v):
    """(..., d) -> (..., 8m): v, a column of ones, zeros up to a multiple of 8 columns (padded once per call)."""
    d = v.shape[-1]
    pad = [(0, 0)] * (v.ndim - 1) + [(0, -(-(d + 1) // 8) * 8 - d)]
    return jnp.pad(v, pad).at[..., d].set(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(q, k, v, causal=False):
    """Attention a block of (batch x head) sequences at a time, each block's logits sized to stay in cache.

    XLA's CPU backend writes the whole (B, heads, T, S) logits to memory and reads them back for the softmax: at
    32x32 latents that is 1 GB per self-attention and 10x slower than torch's fused CPU kernel. Looping over
    cache-sized blocks (lax.map) keeps the softmax in cache. The backward pass goes block by block too, from the
    saved logsumexp (autodiff through the loops stored every block's probabilities: fwd + bwd 1.2-7x slower)."""
    return _blocked_forward(q, k, v, causal)[0]


def _blocked_bwd(causal, residuals, g):
    qh, kh, vh, out, lse = residuals
    b, n = g.shape[0], g.shape[2]
    _, per_block = _block_plan(g.shape[1], kh.shape[1])
    gh = _heads_first(g, qh.shape[1])
    dq, dk, dv = _per_sequence(lambda *a: _sequence_backward(*a, causal), (qh, kh, vh, out, lse, gh), per_block)
    dk, dv = (_tokens_first(x.swapaxes(1, 2), b, n) for x in (dk, dv))  # transposed here, outside the loops
    return _tokens_first(dq, b, n), dk, dv


_blocked.defvjp(_blocked_forward, _blocked_bwd)  # forward: (out, residuals)


def resolve(impl: str) -> str:
    """The implementation `impl` runs here: 'auto' is the fastest this backend has, cache-blocked on a CPU and XLA's
    path elsewhere (GPU runs that want cuDNN flash name 'cudnn', which takes 16-bit inputs only)."""
    if impl != "auto":
        return impl
    return "blocked" if jax.default_backend() == "cpu" else "xla"


def _auto(q, k, v, causal=False):
    return IMPLEMENTATIONS[resolve("auto")](q, k, v, causal)


# name -> fn(q, k, v, causal) over (batch, tokens, heads, head_dim). Register new kernels here.
IMPLEMENTATIONS: dict[str, Callable] = {
    "xla": _dot_product("xla"),      # jax.nn.dot_product_attention's XLA path, whole logits at once
    "blocked": _blocked,             # pure XLA, cache-sized blocks (fast on CPU)
    "cudnn": _dot_product("cudnn"),  # cuDNN flash attention: GPU with bfloat16/float16 inputs only
    "auto": _auto,                   # the default: blocked on CPU, xla elsewhere
    "splash": _splash,               # the Pallas splash kernel (TPU; interpreted elsewhere)
}


def attention_with_relative_positions(q: jax.Array, k: jax.Array, v: jax.Array, table_k: jax.Array,
                                      table_v: jax.Array, *, causal: bool = False) -> jax.Array:
    """Attention with learned relative positions (Shaw et al.; VideoCrafter's temporal attention).

    table_k, table_v: (2L + 1, head_dim), shared by the heads; entry L + clip(j - i, -L, L) is added to key j
    (in the logits) and to value j (in the output) as seen from query i. Written out in full, since the
    sequences are frames (short) and the output needs the probabilities themselves."""
    t, s, dim = q.shape[1], k.shape[1], q.shape[-1]
    span = (table_k.shape[0] - 1) // 2
    index = jnp.clip(jnp.arange(s)[None, :] - jnp.arange(t)[:, None], -span, span) + span
    rel_k, rel_v = table_k[index].astype(q.dtype), table_v[index].astype(q.dtype)  # (t, s, head_dim)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) + jnp.einsum("bthd,tsd->bhts", q, rel_k)
    logits = logits.astype(jnp.float32) * dim ** -0.5
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v) + jnp.einsum("bhts,tsd->bthd", probs, rel_v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, impl: str = "auto") -> jax.Array:
    """Scaled dot-product attention. q: (B, T, N, H); k, v: (B, S, N, H) -> (B, T, N, H).

    `causal`: token i attends to tokens 0..i only (CLIP's text towers)."""
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of "
                         f"{sorted(IMPLEMENTATIONS)}") from None
    return fn(q, k, v, causal)


class RelativePosition(nnx.Module):
    """A learned table of (2 * max_distance + 1) offsets x head_dim (upstream's `RelativePosition`)."""

    def __init__(self, max_distance: int, head_dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.xavier_uniform()
        self.embeddings_table = nnx.Param(init(rngs.params(), (2 * max_distance + 1, head_dim), jnp.float32),
                                          **axis_names((None, None)))


class Attention(nnx.Module):
    """q/k/v projections (no bias unless `qkv_bias`), heads, `attention`, output projection (with bias): diffusers'
    `Attention`. `relative_positions=L` adds VideoCrafter's learned relative-position tables (offsets up to L)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, *, context_dim: int | None = None,
                 qkv_bias: bool = False, relative_positions: int = 0, impl: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads, self.impl = heads, impl
        self.to_q = dense(query_dim, inner, (EMBED, HEADS), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = dense(context_dim, inner, (EMBED, HEADS), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = dense(context_dim, inner, (EMBED, HEADS), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_out = dense(inner, query_dim, (HEADS, EMBED), dtype=dtype, rngs=rngs)
        if relative_positions:
            self.relative_position_k = RelativePosition(relative_positions, head_dim, rngs=rngs)
            self.relative_position_v = RelativePosition(relative_positions, head_dim, rngs=rngs)
        self.relative_positions = relative_positions

    def _split(self, t: jax.Array) -> jax.Array:
        return t.reshape(*t.shape[:-1], self.heads, t.shape[-1] // self.heads)

    def _attend(self, q: jax.Array, context: jax.Array, to_k: nnx.Linear, to_v: nnx.Linear, causal: bool):
        k, v = self._split(to_k(context)), self._split(to_v(context))
        if self.relative_positions:
            return attention_with_relative_positions(q, k, v, self.relative_position_k.embeddings_table[...],
                                                     self.relative_position_v.embeddings_table[...], causal=causal)
        return attention(q, k, v, causal=causal, impl=self.impl)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, causal: bool = False) -> jax.Array:
        """x: (B, T, query_dim); context: (B, S, context_dim) or None for self-attention."""
        out = self._attend(self._split(self.to_q(x)), x if context is None else context, self.to_k, self.to_v, causal)
        return self.to_out(out.reshape(*out.shape[:-2], -1))


class DecoupledCrossAttention(Attention):
    """Cross-attention to text and image tokens with a shared query: text tokens go through to_k/to_v, image tokens
    through their own to_k_ip/to_v_ip; the two attentions (separate softmaxes) are summed, the image one times
    `image_scale`, before to_out. The split: the first `text_tokens` are text (VideoCrafter's I2V attention), or
    the last `image_tokens` are images (IP-Adapter's decoupled cross-attention, I2V-Adapter's)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, *, context_dim: int, text_tokens: int | None = None,
                 image_tokens: int | None = None, image_scale: float = 1.0, impl: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if (text_tokens is None) == (image_tokens is None):
            raise ValueError("decoupled cross-attention: give text_tokens (leading) or image_tokens (trailing)")
        super().__init__(query_dim, heads, head_dim, context_dim=context_dim, impl=impl, dtype=dtype, rngs=rngs)
        self.to_k_ip = dense(context_dim, heads * head_dim, (EMBED, HEADS), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_v_ip = dense(context_dim, heads * head_dim, (EMBED, HEADS), use_bias=False, dtype=dtype, rngs=rngs)
        self.text_tokens, self.image_tokens, self.image_scale = text_tokens, image_tokens, image_scale

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, causal: bool = False) -> jax.Array:
        split = self.text_tokens if self.text_tokens is not None else (
            None if context is None else context.shape[1] - self.image_tokens)
        if context is None or not 0 < split < context.shape[1]:
            what = (f"{self.text_tokens} text tokens followed by image tokens" if self.text_tokens is not None
                    else f"text tokens followed by {self.image_tokens} image tokens")
            raise ValueError(f"image cross-attention needs {what} as context; got context of shape "
                             f"{None if context is None else tuple(context.shape)}")
        q = self._split(self.to_q(x))
        text, image = context[:, :split], context[:, split:]
        out = (self._attend(q, text, self.to_k, self.to_v, causal)
               + self.image_scale * self._attend(q, image, self.to_k_ip, self.to_v_ip, causal))
        return self.to_out(out.reshape(*out.shape[:-2], -1))


def rotate_2d(x: jax.Array, frequencies: jax.Array, width: int) -> jax.Array:
    """Rotary positions on a grid: x (..., tokens, heads, head_dim), tokens in row-major order of rows `width` long;
    frequencies (2, heads, head_dim // 4): each head's angles per row and per column. The first half of each head's
    channel pairs turns by row * frequency, the second half by column * frequency, so that the logit of a rotated
    query and key depends on their offset (dy, dx), not on where they are."""
    tokens, heads, head_dim = x.shape[-3:]
    row, column = jnp.divmod(jnp.arange(tokens), width)
    angles = jnp.concatenate([row[:, None, None] * frequencies[0], column[:, None, None] * frequencies[1]], axis=-1)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)  # (tokens, heads, head_dim // 2)
    pairs = x.reshape(*x.shape[:-1], head_dim // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)


class FirstFrameAttention(Attention):
    """I2V-Adapter's spatial self-attention: the ordinary per-frame self-attention, plus a first-frame branch in
    which every frame's tokens query (own `to_q_ff`) the keys and values of its clip's first frame (the frozen
    to_k/to_v), projected by its own `to_out_ff` (zero at init, so an adapted model starts as the base) and added.

    `rotary=True` (not in I2V-Adapter): that branch's queries and keys also turn by learned 2-D rotary frequencies
    (`rotate_2d`), zero at init (no turn: the model starts as without them). Spatial attention has no positions
    otherwise, so the branch can find a shape in frame 0 by what it is but not by where it is relative to the
    query; with them a head can learn to look a given offset away, which is how a shape moves across frames."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, *, rotary: bool = False, impl: str = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(query_dim, heads, head_dim, impl=impl, dtype=dtype, rngs=rngs)
        inner = heads * head_dim
        self.to_q_ff = dense(query_dim, inner, (EMBED, HEADS), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_out_ff = dense(inner, query_dim, (HEADS, EMBED), zero_init=True, dtype=dtype, rngs=rngs)
        if rotary and head_dim % 4:
            raise ValueError(f"rotary first-frame attention needs heads whose width divides by 4 (a pair of "
                             f"channels per angle, rows and columns); got {head_dim}")
        self.rotary_frequencies = (nnx.Param(jnp.zeros((2, heads, head_dim // 4), jnp.float32),
                                             **axis_names((None, None, None))) if rotary else None)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, causal: bool = False,
                 clips: int | None = None, width: int | None = None) -> jax.Array:
        """x: (B*F, T, dim), the frames of each clip adjacent; `clips` = B; `width`: the tokens' rows (rotary)."""
        if context is not None or clips is None:
            raise ValueError("first-frame attention is a self-attention over (clips * frames, tokens, dim); pass clips")
        n, t, _ = x.shape
        k, v = self._split(self.to_k(x)), self._split(self.to_v(x))
        out = attention(self._split(self.to_q(x)), k, v, causal=causal, impl=self.impl)
        first = lambda a: a.reshape(clips, n // clips, *a.shape[1:])[:, 0]  # (B, T, heads, head_dim)
        q_ff, k_ff = self._split(self.to_q_ff(x)), first(k)
        if self.rotary_frequencies is not None:
            if width is None or t % width:
                raise ValueError(f"rotary first-frame attention needs the token grid's width (rows of {t} tokens)")
            frequencies = self.rotary_frequencies[...]
            q_ff, k_ff = rotate_2d(q_ff, frequencies, width), rotate_2d(k_ff, frequencies, width)
        q_ff = q_ff.reshape(clips, -1, self.heads, k.shape[-1])  # all frames' queries
        out_ff = attention(q_ff, k_ff, first(v), impl=self.impl).reshape(n, t, -1)
        return self.to_out(out.reshape(n, t, -1)) + self.to_out_ff(out_ff)


class AdaptivePromptsAttention(DecoupledCrossAttention):
    """MagDiff's Adaptive Prompts Alignment: the decoupled cross-attention (77 text tokens, then the subject's image
    tokens) with learnable weights: out = to_out(alpha1 * Attn(q, K_text, V_text) + alpha2 * Attn(q, K_img, V_img)).
    alpha1/alpha2 start at the released code's 1.0 and 1.5 unless given."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, *, context_dim: int, text_tokens: int = 77,
                 text_scale: float = 1.0, image_scale: float = 1.5, impl: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        super().__init__(query_dim, heads, head_dim, context_dim=context_dim, text_tokens=text_tokens, impl=impl,
                         dtype=dtype, rngs=rngs)
        self.text_cross_attention_scale = nnx.Param(jnp.full((1,), text_scale, jnp.float32), **axis_names((None,)))
        self.image_cross_attention_scale = nnx.Param(jnp.full((1,), image_scale, jnp.float32), **axis_names((None,)))

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, causal: bool = False) -> jax.Array:
        if context is None or not 0 < self.text_tokens < context.shape[1]:
            raise ValueError(f"adaptive prompts attention needs {self.text_tokens} text tokens followed by the "
                             f"subject's image tokens; got context of shape "
                             f"{None if context is None else tuple(context.shape)}")
        q = self._split(self.to_q(x))
        text, image = context[:, :self.text_tokens], context[:, self.text_tokens:]
        alpha1 = self.text_cross_attention_scale[...].astype(q.dtype)
        alpha2 = self.image_cross_attention_scale[...].astype(q.dtype)
        out = (alpha1 * self._attend(q, text, self.to_k, self.to_v, causal)
               + alpha2 * self._attend(q, image, self.to_k_ip, self.to_v_ip, causal))
        return self.to_out(out.reshape(*out.shape[:-2], -1))
