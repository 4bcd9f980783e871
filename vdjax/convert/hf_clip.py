"""transformers layout: `CLIPTextModel` / `CLIPTextModelWithProjection` and `CLIPVisionModelWithProjection`.

vdjax's CLIP modules carry transformers' attribute names without the `text_model.` / `vision_model.` level, so
the map is that prefix plus the leaf names. Keys are those of the files on the Hub (SD 1.5's `text_encoder`,
IP-Adapter's `image_encoder`) and of transformers 4.x: `text_model.encoder.layers.0.self_attn.q_proj.weight`.
transformers 5.x's plain `CLIPTextModel` / `CLIPVisionModel` drop that prefix in their own state dicts and
files; `load_text` / `load_vision` accept those too (prefix added back when no key has it). Embedding tables are
(count, dim) in both frameworks; `load_params` transposes only kernels.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import nnx

from vdjax.convert.keymap import Path, load_params, path_to_key, torch_leaf
from vdjax.convert.readers import rewrite


def _leaf(key: str) -> str:
    return torch_leaf(re.sub(r"\.embedding$", ".weight", key))  # nnx.Embed's table is `embedding`


def text_key(path: Path) -> str:
    """vdjax CLIPTextModel path -> transformers key, e.g. `text_model.encoder.layers.0.self_attn.q_proj.weight`."""
    key = _leaf(path_to_key(path))
    return key if key.startswith("text_projection.") else "text_model." + key


def vision_key(path: Path) -> str:
    """vdjax CLIPVisionModelWithProjection path -> transformers key (`vision_model.pre_layrnorm.weight`, ...)."""
    key = _leaf(path_to_key(path))
    return key if key.startswith("visual_projection.") else "vision_model." + key


def ignored(key: str) -> bool:
    # Older checkpoints saved the `position_ids` buffers (arange); vdjax computes positions.
    return key.endswith(".position_ids")


def with_prefix(state_dict: Mapping[str, np.ndarray], prefix: str, head: str) -> Mapping[str, np.ndarray]:
    """Keys under `prefix`, added when no key has it (transformers 5.x); `head`, the projection, stays top-level."""
    if any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return rewrite(state_dict, lambda k, shape: None if k.startswith(head) else [(prefix + k, shape, None)])


def load_text(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, source: str = "CLIPTextModel",
              ignore=ignored) -> None:
    """Fill a vdjax `CLIPTextModel` from a transformers `CLIPTextModel(WithProjection)` state dict, strictly.

    For a full `CLIPModel` file pass e.g. `ignore=lambda k: not k.startswith("text_model.") or ignored(k)`.
    """
    state_dict = with_prefix(state_dict, "text_model.", "text_projection.")
    load_params(model, state_dict, text_key, ignore=ignore, source=source)


def load_vision(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *,
                source: str = "CLIPVisionModelWithProjection", ignore=ignored) -> None:
    """Fill a vdjax `CLIPVisionModelWithProjection` from a transformers `CLIPVisionModelWithProjection` state dict."""
    state_dict = with_prefix(state_dict, "vision_model.", "visual_projection.")
    load_params(model, state_dict, vision_key, ignore=ignore, source=source)
