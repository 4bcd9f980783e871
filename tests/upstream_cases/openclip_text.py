"""VideoCrafter's FrozenOpenCLIPEmbedder (open_clip 2.22) vs vdjax's tokenizer and TextTower, released key names."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert.keymap import load_params
from vdjax.convert.openclip import TEXT_UNUSED, text_key, split_in_proj
from vdjax.models.openclip import TextTower, text_config
from vdjax.models.openclip_tokenizer import OpenCLIPTokenizer
from vdjax.layers.primitives import InitKeys


def run(case: Case) -> dict[str, float]:
    meta, io = case.meta, case.io()
    text = meta["model_config"]["text_cfg"]
    cfg = text_config("tiny")
    cfg.update(width=text["width"], heads=text["heads"], layers=text["layers"], vocab_size=text["vocab_size"],
               context_length=text["context_length"])
    tower = TextTower(cfg, rngs=InitKeys(0))
    prefix = meta.get("key_prefix", "cond_stage_model.model.")
    load_params(tower, split_in_proj(case.weights()), text_key(prefix), ignore=TEXT_UNUSED.search,
                source=str(case.path))
    errors = {}
    tokens = io["tokens"]
    if "prompts" in meta:
        ours = OpenCLIPTokenizer(context_length=cfg.context_length)(meta["prompts"])
        errors["token_mismatches"] = float(np.sum(ours != tokens))
        assert errors["token_mismatches"] == 0, (ours, tokens)
    # Newer cases name each output's layer in `layers`; held-out ones have one output `z` and `layer`.
    layers = meta.get("layers") or {"z": meta["layer"]}
    for output, layer in layers.items():
        z = np.asarray(tower(jnp.asarray(tokens), layer=layer))
        errors[output] = max_abs_error(z, io[output])
        assert errors[output] <= tolerance(io[output]), errors
    return errors
