"""MagDiff's Adaptive Prompts Alignment (gulucaptain/videoassembler): the entity cross-attention with learnable
text/image weights (non-default values in the fixture) vs vdjax's AdaptivePromptsAttention."""
from __future__ import annotations

import jax.numpy as jnp

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert.keymap import load_params, path_to_key, rename, torch_leaf
from vdjax.layers.attention import AdaptivePromptsAttention
from vdjax.layers.primitives import InitKeys


def run(case: Case) -> dict[str, float]:
    kw, io = case.meta["constructor_kwargs"], case.io()
    if case.meta["case"] != "entity_cross_attention":
        raise ValueError(f"magdiff_apa: unknown case {case.meta['case']!r}")
    module = AdaptivePromptsAttention(kw["query_dim"], kw["heads"], kw["dim_head"], context_dim=kw["context_dim"],
                                      rngs=InitKeys(0))
    key = lambda path: torch_leaf(rename(path_to_key(path), ((r"^to_out\.", "to_out.0."),)))
    load_params(module, case.weights(), key, source=str(case.path))
    errors = {"output": max_abs_error(module(jnp.asarray(io["x"]), jnp.asarray(io["context"])), io["output"])}
    assert errors["output"] <= tolerance(io["output"]), errors
    return errors
