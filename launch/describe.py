"""Describe a model config: parameters per part (abstract, no memory), and optionally a timed forward pass.

    python launch/describe.py --config=configs/animatediff_sd15.py:variant=v2
    python launch/describe.py --config=configs/animatediff_sd15.py:variant=tiny_v2 --forward --frames=8
"""
from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from vdjax.models.unet3d import UNet3D, abstract_unet
from vdjax.layers.primitives import InitKeys

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file (path:arg).", lock_config=True)
_FORWARD = flags.DEFINE_bool("forward", False, "Also build the model with random weights and time a jitted forward.")
_FRAMES = flags.DEFINE_integer("frames", 8, "Frames of the forward pass.")
_SIZE = flags.DEFINE_integer("latent_size", 32, "Latent height and width of the forward pass.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch of the forward pass.")


def describe(cfg) -> None:
    model = abstract_unet(cfg)
    parts = collections.Counter()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        part = ".".join(str(p) for p in path[:2]) if path[0] in ("down_blocks", "up_blocks") else str(path[0])
        kind = "motion" if "motion_modules" in path else "spatial"
        parts[(part, kind)] += int(np.prod(var.shape))
    total = sum(parts.values())
    print(f"{'part':<20}{'kind':<10}{'parameters':>15}")
    for (part, kind), n in parts.items():
        print(f"{part:<20}{kind:<10}{n:>15,}")
    motion = sum(n for (_, kind), n in parts.items() if kind == "motion")
    print(f"{'total':<30}{total:>15,}  (motion modules {motion:,}; {total * 4 / 2**30:.2f} GiB in float32)")


def forward(cfg) -> None:
    model = UNet3D(cfg, rngs=InitKeys(0))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    rng = np.random.default_rng(0)
    b, f, n = _BATCH.value, _FRAMES.value, _SIZE.value
    x = jnp.asarray(rng.standard_normal((b, f, n, n, cfg.in_channels)), jnp.float32)
    t = jnp.full((b,), 500)
    c = jnp.asarray(rng.standard_normal((b, 77, cfg.cross_attention_dim)), jnp.float32)
    start = time.perf_counter()
    compiled = run.lower(state, x, t, c).compile()
    print(f"compiled in {time.perf_counter() - start:.1f} s")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = compiled(state, x, t, c).block_until_ready()
        times.append(time.perf_counter() - start)
    print(f"forward {tuple(x.shape)} -> {tuple(out.shape)}: median {sorted(times)[1] * 1e3:.1f} ms "
          f"on {jax.devices()[0].device_kind}; output std {float(jnp.std(out)):.3f}")


def main(argv):
    del argv
    cfg = _CONFIG.value
    print(f"{cfg.family} {cfg.variant}")
    describe(cfg.unet)
    if _FORWARD.value:
        forward(cfg.unet)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
