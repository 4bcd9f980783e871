"""Multi-head attention: one `attention` function with a selectable implementation, and the projection module."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vdjax.layers.primitives import EMBED, HEADS, dense


def _dot_product(implementation: str | None) -> Callable:
    def run(q, k, v, causal=False):
        # XLA's path computes logits and softmax in float32 for bfloat16 inputs.
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    return run


def _splash(q, k, v, causal=False):
    raise NotImplementedError(
        "attention implementation 'splash' (the Pallas TPU splash kernel) is not built yet; it arrives with "
        "issue #7 (benchmarks and speed). Use attention_impl='xla' on TPU for now.")


# name -> fn(q, k, v, causal) over (batch, tokens, heads, head_dim). Register new kernels here.
IMPLEMENTATIONS: dict[str, Callable] = {
    "xla": _dot_product("xla"),
    "cudnn": _dot_product("cudnn"),  # cuDNN flash attention: GPU with bfloat16/float16 inputs only
    "auto": _dot_product(None),      # let JAX pick (cuDNN where it can, XLA otherwise)
    "splash": _splash,
}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, impl: str = "xla") -> jax.Array:
    """Scaled dot-product attention. q: (B, T, N, H); k, v: (B, S, N, H) -> (B, T, N, H).

    `causal`: token i attends to tokens 0..i only (CLIP's text towers)."""
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {sorted(IMPLEMENTATIONS)}") from None
    return fn(q, k, v, causal)


class Attention(nnx.Module):
    """q/k/v projections (no bias unless `qkv_bias`), heads, `attention`, output projection (with bias): diffusers' `Attention`."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, *, context_dim: int | None = None,
                 qkv_bias: bool = False, impl: str = "xla", dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads, self.impl = heads, impl
        self.to_q = dense(query_dim, inner, (EMBED, HEADS), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = dense(context_dim, inner, (EMBED, HEADS), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = dense(context_dim, inner, (EMBED, HEADS), use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_out = dense(inner, query_dim, (HEADS, EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, causal: bool = False) -> jax.Array:
        """x: (B, T, query_dim); context: (B, S, context_dim) or None for self-attention."""
        context = x if context is None else context
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, t.shape[-1] // self.heads)
        out = attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)), causal=causal,
                        impl=self.impl)
        return self.to_out(out.reshape(*out.shape[:-2], -1))
