"""The train state: which parameters train (regexes over parameter paths), the optimizer, EMA.

Only trainable parameters get optimizer state and EMA; frozen ones (e.g. the SD UNet under motion modules) are
kept apart and never updated. Everything is a plain pytree of arrays, so it shards, donates and checkpoints as is.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: nnx.State  # the trainable parameters (float32 master copy)
    opt_state: Any
    ema: nnx.State        # exponential moving average of `trainable`
    rng: jax.Array


def path_string(path) -> str:
    return ".".join(str(p) for p in path)


def split_trainable(model: nnx.Module, patterns: Sequence[str]) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen): a parameter trains when any regex in `patterns` matches its dotted path
    ('.*' trains everything)."""
    compiled = [re.compile(p) for p in patterns]
    if not compiled:
        raise ValueError("train.trainable is empty: give regexes over parameter paths (e.g. 'motion_modules')")
    is_trainable = lambda path, var: isinstance(var, nnx.Param) and any(c.search(path_string(path)) for c in compiled)
    graphdef, trainable, frozen = nnx.split(model, is_trainable, ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"no parameter matches train.trainable={list(patterns)}; paths look like "
                         f"'{path_string(next(iter(nnx.to_flat_state(nnx.state(model))))[0])}'")
    return graphdef, trainable, frozen


def lr_schedule(cfg):
    """Linear warm-up to `learning_rate`, then cosine decay to a tenth of it by `num_steps`, or constant."""
    warmup = max(cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.num_steps, warmup + 1),
                                                  cfg.learning_rate * 0.1)
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                     optax.constant_schedule(cfg.learning_rate)], [warmup])
    raise ValueError(f"train.schedule={cfg.schedule!r}; choose 'cosine' or 'constant'")


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, global-norm clipping, and gradient accumulation over `grad_accum_steps` steps."""
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(lr_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, weight_decay=cfg.weight_decay))
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx


def init_state(trainable: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    # Copies: the step donates the state, which must not free the model's own arrays.
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                      ema=jax.tree.map(jnp.copy, trainable), rng=jax.random.key_data(jax.random.key(seed)))
