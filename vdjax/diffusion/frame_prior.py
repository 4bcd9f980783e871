"""I2V-Adapter's Frame Similarity Prior: the later frames start from the first frame's latent, degraded and noised.

D(x) = M * x + (1 - M) * GaussianBlur(x), with M a random binary mask keeping each element with probability p
(the blur in latent space, kernel 9 and sigma 18 as the released code), then forward-diffused to the starting
timestep t0. Frame 0 stays the clean first-frame latent: I2V-Adapter never noises it.

`path_noise` is the training side (train.frame_prior_path, vdjax/train/step.py): the noise under which the
forward process passes through the prior's start (keep_prob 1) at t0, so that the model learns where the sampler
goes from there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vdjax.diffusion.schedules import Schedule


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """torchvision's 1-D Gaussian kernel: exp(-x^2 / (2 sigma^2)) at x = -(size-1)/2 .. (size-1)/2, normalised."""
    x = np.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=np.float32)
    k = np.exp(-0.5 * (x / np.float32(sigma)) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(x: jax.Array, size: int, sigma: float) -> jax.Array:
    """(N, H, W, C) blurred over H and W with reflect padding (torchvision's GaussianBlur), separably."""
    k = jnp.asarray(gaussian_kernel(size, sigma))
    pad = size // 2
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = x.shape[1] - 2 * pad, x.shape[2] - 2 * pad
    x = sum(k[i] * x[:, i:i + h] for i in range(size))
    return sum(k[i] * x[:, :, i:i + w] for i in range(size))


def degrade(key: jax.Array, first: jax.Array, num_frames: int, *, keep_prob: float = 0.5, kernel: int = 9,
            sigma: float = 18.0) -> jax.Array:
    """first (B, h, w, C) clean first-frame latents -> (B, F, h, w, C): D(first) for frames 1.., first at frame 0."""
    repeated = jnp.broadcast_to(first[:, None], (first.shape[0], num_frames, *first.shape[1:]))
    keep = jax.random.uniform(key, repeated.shape) < keep_prob
    blurred = gaussian_blur(first, kernel, sigma)[:, None]  # every frame is the same image: blur it once
    out = jnp.where(keep, repeated, blurred)
    return out.at[:, 0].set(first)


def initial_latents(key: jax.Array, first: jax.Array, num_frames: int, schedule: Schedule, t0: int, *,
                    enabled: bool = True, keep_prob: float = 0.5, kernel: int = 9, sigma: float = 18.0) -> jax.Array:
    """The sampler's start (B, F, h, w, C): frame 0 the clean `first` latent; the others D(first) diffused to `t0`
    (Frame Similarity Prior), or pure noise when `enabled` is False."""
    k_mask, k_noise = jax.random.split(key)
    noise = jax.random.normal(k_noise, (first.shape[0], num_frames, *first.shape[1:]), jnp.float32)
    if enabled:
        a = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t0]
        x = jnp.sqrt(a) * degrade(k_mask, first, num_frames, keep_prob=keep_prob, kernel=kernel, sigma=sigma)
        x = x + jnp.sqrt(1 - a) * noise
    else:
        x = noise
    return x.at[:, 0].set(first)


def start_timestep(timesteps, start_step: int) -> int:
    """The timestep the prior starts from: the sampler's `start_step`-th (timesteps: its steps, noisiest first)."""
    if not 0 <= start_step < len(timesteps):
        raise ValueError(f"sample.frame_prior.start_step={start_step}; use 0 to {len(timesteps) - 1} for "
                         f"{len(timesteps)} steps")
    return int(timesteps[start_step])


def path_noise(noise: jax.Array, latents: jax.Array, alpha_t0) -> jax.Array:
    """eps' = eps + sqrt(abar_t0 / (1 - abar_t0)) * (z_0 - z_f) for latents z (B, F, h, w, C): then
    sqrt(abar_t0) z_f + sqrt(1 - abar_t0) eps' = sqrt(abar_t0) z_0 + sqrt(1 - abar_t0) eps, the prior's start, and
    deterministic DDIM from there with an eps' predictor stays on sqrt(abar_t) z_f + sqrt(1 - abar_t) eps'."""
    return noise + jnp.sqrt(alpha_t0 / (1 - alpha_t0)) * (latents[:, :1] - latents)


def off_path_note(model_config, sample, timesteps) -> str | None:
    """A model trained with train.frame_prior_path (`model_config`: its own config, sample section included) learnt
    the path through its sampler's prior start; sampled with `sample` (a config.sample) it starts on that path only
    from the same timestep with the prior undegraded. None when it does, or when the model was not trained so;
    else what to set. timesteps(steps): the sampler's timesteps (the pipeline's `timesteps`)."""
    if not model_config.get("train", {}).get("frame_prior_path", False):
        return None
    trained = model_config.sample
    t0 = start_timestep(timesteps(trained.steps), trained.frame_prior.start_step)
    prior = sample.get("frame_prior")
    # An out-of-range start_step is left to the sampler's own argument check (a usage error, not a traceback here).
    if (prior is not None and prior.enabled and prior.keep_prob == 1 and 0 <= prior.start_step < sample.steps
            and start_timestep(timesteps(sample.steps), prior.start_step) == t0):
        return None
    return (f"this model was trained on the Frame Similarity Prior's path from t={t0} (train.frame_prior_path), "
            f"which this sampler does not start on; to sample on it: --config.sample.steps={trained.steps} "
            f"--config.sample.frame_prior.start_step={trained.frame_prior.start_step} "
            "--config.sample.frame_prior.keep_prob=1 --config.sample.frame_prior.enabled=True")
