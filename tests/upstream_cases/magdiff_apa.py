"""MagDiff's Adaptive Prompts Alignment (gulucaptain/videoassembler): the entity cross-attention with learnable
text/image weights (non-default values in the fixture) vs vdjax's AdaptivePromptsAttention, and the transformer
block hosting it in the released code (temporal self-attention between the cross-attention and the feed-forward)
vs vdjax's BasicTransformerBlock with `temporal=True`."""
from __future__ import annotations

import jax.numpy as jnp

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert.diffusers import UNET_RENAMES
from vdjax.convert.keymap import load_params, path_to_key, rename, torch_leaf
from vdjax.layers.attention import AdaptivePromptsAttention
from vdjax.layers.primitives import InitKeys
from vdjax.layers.spatial_transformer import BasicTransformerBlock

TEXT_TOKENS = 77  # the entity cross-attention's text/image split, hard-coded upstream


def run(case: Case) -> dict[str, float]:
    kw, io, name = case.meta["constructor_kwargs"], case.io(), case.meta["case"]
    if name == "entity_cross_attention":
        module = AdaptivePromptsAttention(kw["query_dim"], kw["heads"], kw["dim_head"], context_dim=kw["context_dim"],
                                          text_tokens=TEXT_TOKENS, rngs=InitKeys(0))
        call = lambda m: m(jnp.asarray(io["x"]), jnp.asarray(io["context"]))
    elif name == "basic_transformer_block":
        unsupported = {k: kw[k] for k in ("prepend_first_frame", "add_temp_ff", "only_cross_attention") if kw[k]}
        if unsupported or not kw["add_temp_attn"]:
            raise ValueError(f"magdiff_apa/basic_transformer_block: vdjax builds the released configuration "
                             f"(add_temp_attn only); this case sets {unsupported or {'add_temp_attn': False}}")
        module = BasicTransformerBlock(kw["dim"], kw["num_attention_heads"], kw["attention_head_dim"],
                                       kw["cross_attention_dim"], image_split={"text_tokens": TEXT_TOKENS,
                                                                               "adaptive": (1.0, 1.5)},
                                       temporal=True, frame_positions=kw["add_temp_embed"], rngs=InitKeys(0))
        # Every frame has its own context row here (the UNet repeats each clip's).
        call = lambda m: m(jnp.asarray(io["hidden_states"]), jnp.asarray(io["encoder_hidden_states"]),
                           num_frames=case.meta["video_length"])
    else:
        raise ValueError(f"magdiff_apa: unknown case {name!r}")
    key = lambda path: torch_leaf(rename("." + path_to_key(path), UNET_RENAMES))[1:]
    load_params(module, case.weights(), key, source=str(case.path))
    errors = {"output": max_abs_error(call(module), io["output"])}
    assert errors["output"] <= tolerance(io["output"]), errors
    return errors
