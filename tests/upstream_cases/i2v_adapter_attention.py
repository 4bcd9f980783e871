"""I2V-Adapter (KwaiVGI/I2V-Adapter): first-frame (mixed causal) self-attention, its IP-Adapter cross-attention
(last 16 context tokens are image tokens), the transformer block and the spatial transformer wired as its
inference config, vs vdjax's layers loaded from the released key names."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert.diffusers import UNET_RENAMES
from vdjax.convert.keymap import load_params, path_to_key, rename, torch_leaf
from vdjax.layers.attention import DecoupledCrossAttention, FirstFrameAttention
from vdjax.layers.primitives import InitKeys
from vdjax.layers.spatial_transformer import BasicTransformerBlock, SpatialTransformer

IMAGE_TOKENS = 16  # hard-coded upstream (end_pos = n - 16)


def key(path) -> str:
    return torch_leaf(rename("." + path_to_key(path), UNET_RENAMES))[1:]


def _block_args(kw):
    return dict(image_split={"image_tokens": IMAGE_TOKENS} if kw.get("unet_use_ipadapter") else None,
                first_frame=kw.get("unet_use_cross_frame_attention") == "mixed_cross", rngs=InitKeys(0))


def run(case: Case) -> dict[str, float]:
    kw, io, name = case.meta["constructor_kwargs"], case.io(), case.meta["case"]
    if name == "mixed_causal_attention":
        module = FirstFrameAttention(kw["query_dim"], kw["heads"], kw["dim_head"], rngs=InitKeys(0))
        frames = 4  # video_length in the call
        call = lambda m: m(jnp.asarray(io["hidden_states"]), clips=io["hidden_states"].shape[0] // frames)
    elif name == "ip_adapter_attention":
        module = DecoupledCrossAttention(kw["query_dim"], kw["heads"], kw["dim_head"],
                                         context_dim=kw["cross_attention_dim"], image_tokens=IMAGE_TOKENS,
                                         rngs=InitKeys(0))
        call = lambda m: m(jnp.asarray(io["hidden_states"]), jnp.asarray(io["encoder_hidden_states"]))
    elif name == "basic_transformer_block":
        module = BasicTransformerBlock(kw["dim"], kw["num_attention_heads"], kw["attention_head_dim"],
                                       kw["cross_attention_dim"], **_block_args(kw))
        # Here every frame has its own context row (in the UNet each clip's is repeated); video_length 4.
        call = lambda m: m(jnp.asarray(io["hidden_states"]), jnp.asarray(io["encoder_hidden_states"]), num_frames=4)
    elif name == "transformer3d":
        c = kw["in_channels"]
        module = SpatialTransformer(c, kw["num_attention_heads"], kw["cross_attention_dim"],
                                    num_layers=kw["num_layers"], groups=kw["norm_num_groups"],
                                    use_linear_projection=kw["use_linear_projection"], **_block_args(kw))
        x = io["hidden_states"]  # (b, c, f, h, w) -> frames folded into the batch, channels last
        b, _, f, h, w = x.shape
        folded = jnp.asarray(x.transpose(0, 2, 3, 4, 1).reshape(b * f, h, w, c))
        call = lambda m: np.asarray(m(folded, jnp.asarray(io["encoder_hidden_states"]))).reshape(
            b, f, h, w, c).transpose(0, 4, 1, 2, 3)
    else:
        raise ValueError(f"i2v_adapter_attention: unknown case {name!r}")
    load_params(module, case.weights(), key, source=str(case.path))
    errors = {"output": max_abs_error(call(module), io["output"])}
    assert errors["output"] <= tolerance(io["output"]), errors
    return errors
