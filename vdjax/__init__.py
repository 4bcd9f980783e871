"""vdjax: latent video diffusion in JAX/Flax NNX (AnimateDiff, VideoCrafter, I2V-Adapter, MagDiff)."""
import jax

# Same seed -> same numbers, whatever the sharding (see DESIGN.md, "Randomness").
jax.config.update("jax_threefry_partitionable", True)

__version__ = "0.1.0"
