"""The whole DDIM denoising loop as one XLA program: model, classifier-free guidance and scheduler step.

`ddim_loop` runs `jax.lax.scan` over the timesteps; the host starts it and receives the final latents. Progress
reaches the host through `jax.debug.callback` from inside the loop (the device does not wait for the host).
The model is any pure function `denoise(x, t, context) -> model_output`, e.g. a UNet merged from its `nnx.split`
state inside the jitted function that calls this.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdjax.diffusion import ddim, schedules
from vdjax.diffusion.schedules import Schedule


def ddim_loop(denoise: Callable, x_T: jax.Array, timesteps: np.ndarray, schedule: Schedule, *, context: jax.Array,
              prev_timesteps: np.ndarray | None = None,
              uncond_context: jax.Array | None = None, guidance_scale: float | jax.Array = 1.0,
              guidance_rescale: float = 0.0, eta: float | jax.Array = 0.0, key: jax.Array | None = None,
              set_alpha_to_one: bool = True, progress: Callable[[int, int], None] | None = None,
              noises: jax.Array | None = None, clip_sample: float | None = None,
              fixed_first_frame: bool = False, keep: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Denoise `x_T` along the descending `timesteps` (a static numpy array). Guidance runs when `uncond_context`
    is given: the unconditional and conditional halves go through the model as one stacked batch.

    The noise of eta > 0 comes from `key`, or from `noises` (steps, *x_T.shape), e.g. to replay another run.
    `clip_sample`: clip the predicted x0 to [-c, c] (diffusers' DDIMScheduler clip_sample). `fixed_first_frame`:
    frame 0 of x_T (B, F, ...) is a clean latent the model sees at every step and the sampler never changes
    (I2V-Adapter). `keep` = (where (broadcastable to x_T, True = keep), latents (steps, *x_T.shape)): after step
    i, x takes latents[i] where `where` holds (editing: the region outside the subject follows the inversion
    trajectory, latents[i] being its latent at the timestep step i lands on).

    `prev_timesteps`: the timestep each step lands on (default: the next entry, -1 after the last — LDM's rule;
    diffusers' is `schedules.previous_timesteps(ts, step_ratio=1000 // steps)`)."""
    timesteps = np.asarray(timesteps)
    prev = schedules.previous_timesteps(timesteps) if prev_timesteps is None else np.asarray(prev_timesteps)
    keys = jax.random.split(key if key is not None else jax.random.key(0), len(timesteps))
    if noises is not None and tuple(noises.shape) != (len(timesteps), *x_T.shape):
        raise ValueError(f"noises must be (steps, *x_T.shape) = {(len(timesteps), *x_T.shape)}; got {noises.shape}")
    given = noises is not None
    noises = jnp.zeros((len(timesteps), 0)) if noises is None else jnp.asarray(noises, jnp.float32)
    if keep is not None and tuple(keep[1].shape) != (len(timesteps), *x_T.shape):
        raise ValueError(f"keep latents must be (steps, *x_T.shape) = {(len(timesteps), *x_T.shape)}; got "
                         f"{keep[1].shape}")
    kept = jnp.zeros((len(timesteps), 0)) if keep is None else jnp.asarray(keep[1], jnp.float32)
    batch = x_T.shape[0]

    def model(x, t):
        if uncond_context is None:
            return denoise(x, jnp.full((batch,), t), context)
        both = denoise(jnp.concatenate([x, x]), jnp.full((2 * batch,), t),
                       jnp.concatenate([uncond_context, context]))
        return ddim.guidance(both[:batch], both[batch:], guidance_scale, guidance_rescale)

    def step(x, inputs):
        i, t, t_prev, k, given_noise, target = inputs
        noise = given_noise if given else jax.random.normal(k, x.shape, jnp.float32)
        new, _ = ddim.ddim_step(schedule, model(x, t), t, t_prev, x, eta=eta, noise=noise,
                                set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample)
        x = new.at[:, 0].set(x[:, 0]) if fixed_first_frame else new
        if keep is not None:
            x = jnp.where(keep[0], target, x)
        if progress is not None:
            jax.debug.callback(progress, i + 1, len(timesteps))
        return x, None

    x, _ = jax.lax.scan(step, x_T.astype(jnp.float32),
                        (jnp.arange(len(timesteps)), jnp.asarray(timesteps), jnp.asarray(prev), keys, noises, kept))
    return x


def ddim_invert(denoise: Callable, x_0: jax.Array, timesteps: np.ndarray, schedule: Schedule, *, context: jax.Array,
                progress: Callable[[int, int], None] | None = None, set_alpha_to_one: bool = True,
                return_trajectory: bool = False, fixed_point_iterations: int | jax.Array = 0,
                fixed_first_frame: bool = False):
    """Clean latents -> noise along the same (descending) `timesteps`, deterministically (for editing).

    Each step evaluates the model at the next, noisier timestep on the current latents, as DDIM inversion does.
    `set_alpha_to_one`: the clean latents' alpha (as the sampler's final alpha, so that the two retrace each other).
    With `return_trajectory`: (noise, the latents at each timestep, (steps, *x_0.shape) in descending-timestep
    order: trajectory[i] is the latent at timesteps[i]).

    `fixed_point_iterations` = k > 0: each step is solved for the latent x_next whose own model output takes the
    sampler's step back to x (x_next = invert(x, model(x_next)): k fixed-point iterations from the plain step, as
    Pan et al. 2023's AIDI; k may be traced); where they converge the eta-0 sampler retraces the inversion exactly,
    whatever the model. `fixed_first_frame`: frame 0 of x_0 (B, F, ...) stays clean, as the sampler's (I2V-Adapter)."""
    ascending = np.asarray(timesteps)[::-1]
    current = np.concatenate([[-1], ascending[:-1]])  # -1: the clean latents (final alpha)
    batch = x_0.shape[0]

    def step(x, inputs):
        i, t_from, t_to = inputs
        t_model = jnp.full((batch,), t_to)

        def invert(x_eval):  # x -> the next latent, with the model evaluated at x_eval
            new = ddim.ddim_inversion_step(schedule, denoise(x_eval, t_model, context), t_from, t_to, x,
                                           set_alpha_to_one=set_alpha_to_one)
            return new.at[:, 0].set(x[:, 0]) if fixed_first_frame else new
        x = jax.lax.fori_loop(0, fixed_point_iterations, lambda _, x_next: invert(x_next), invert(x))
        if progress is not None:
            jax.debug.callback(progress, i + 1, len(ascending))
        return x, x if return_trajectory else None

    x, path = jax.lax.scan(step, x_0.astype(jnp.float32),
                           (jnp.arange(len(ascending)), jnp.asarray(current), jnp.asarray(ascending)))
    return (x, path[::-1]) if return_trajectory else x
