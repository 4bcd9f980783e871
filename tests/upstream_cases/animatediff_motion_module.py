"""AnimateDiff's VanillaTemporalModule (guoyww/AnimateDiff) vs vdjax's TemporalTransformer, released key names."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert.animatediff import POSITION_TABLE, motion_key
from vdjax.convert.keymap import load_params
from vdjax.layers.embeddings import position_table
from vdjax.layers.temporal import TemporalTransformer
from vdjax.layers.primitives import InitKeys


def run(case: Case) -> dict[str, float]:
    kw = case.meta["constructor_kwargs"]
    assert list(kw.get("attention_block_types", ["Temporal_Self"] * 2)) == ["Temporal_Self"] * 2, kw
    max_len = kw.get("temporal_position_encoding_max_len", 24) if kw.get("temporal_position_encoding") else 0
    heads = kw.get("num_attention_heads", 8)
    head_dim = kw["in_channels"] // heads // kw.get("temporal_attention_dim_div", 1)
    module = TemporalTransformer(kw["in_channels"], heads, head_dim=head_dim,
                                 num_layers=kw.get("num_transformer_block", 2), max_positions=max_len,
                                 groups=kw.get("norm_num_groups", 32), norm_scope="frame", rngs=InitKeys(0))
    weights = case.weights()
    load_params(module, weights, motion_key, ignore=POSITION_TABLE.search, source=str(case.path))
    errors = {}
    for key, table in weights.items():
        if POSITION_TABLE.search(key):
            errors["pe"] = max(errors.get("pe", 0.0), max_abs_error(position_table(table.shape[1], table.shape[2]), table))
    assert errors.get("pe", 0.0) <= 1e-6, errors

    io = case.io()
    x = io["input_tensor"]  # (b, c, f, h, w)
    b, c, f, h, w = x.shape
    y = module(jnp.asarray(x.transpose(0, 2, 3, 4, 1).reshape(b * f, h, w, c)), f)
    y = np.asarray(y).reshape(b, f, h, w, c).transpose(0, 4, 1, 2, 3)
    errors["output"] = max_abs_error(y, io["output"])
    assert errors["output"] <= tolerance(io["output"]), errors
    return errors
