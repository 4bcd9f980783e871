"""The DDIM update (Song et al. 2021, eqs. 12 and 16) as pure JAX functions of (possibly traced) timesteps.

`ddim_step` is diffusers' DDIMScheduler.step with the previous timestep given explicitly, and, when the schedule
carries VideoCrafter's `scale_arr`, VideoCrafter's `p_sample_ddim` with `use_scale`. Timesteps may be scalars or
per-sample (b,) vectors (VideoCrafter passes torch.full((b,), t)); everything is computed in float32.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vdjax.diffusion.schedules import Schedule


class Coefficients(NamedTuple):
    alpha: jax.Array        # alphas_cumprod[t]
    alpha_prev: jax.Array   # alphas_cumprod[t_prev], or the final alpha when t_prev < 0
    sigma: jax.Array        # eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    scale: jax.Array        # VideoCrafter scale_arr[t] (1 without use_scale)
    scale_prev: jax.Array   # scale_arr[t_prev], scale_arr[0] when t_prev < 0 (1 without use_scale)


def _take(table, t, fallback):
    """table[t] for t >= 0, else `fallback`: a gather with a clipped index, so it works on traced t."""
    t = jnp.asarray(t, jnp.int32)
    table = jnp.asarray(table, jnp.float32)
    return jnp.where(t >= 0, table[jnp.maximum(t, 0)], jnp.asarray(fallback, jnp.float32))


def coefficients(schedule: Schedule, t, t_prev, eta=0.0, *, set_alpha_to_one: bool = False) -> Coefficients:
    """The per-step scalars of the DDIM update. The final alpha is diffusers' `final_alpha_cumprod`: 1.0 with
    set_alpha_to_one, else alphas_cumprod[0] (what VideoCrafter's ddim_alphas_prev starts with)."""
    ac = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    a = _take(ac, t, 0.0)  # t >= 0 always; the fallback is never used
    a_prev = _take(ac, t_prev, 1.0 if set_alpha_to_one else ac[0])
    # 1 - a/a_prev written as (a_prev - a)/a_prev: the subtraction is exact in float32 for close alphas, which
    # keeps small sigmas (first steps) as accurate as upstream's float64 ones.
    sigma = jnp.asarray(eta, jnp.float32) * jnp.sqrt((1 - a_prev) / (1 - a) * ((a_prev - a) / a_prev))
    if schedule.scale_arr is None:
        one = jnp.ones_like(a)
        return Coefficients(a, a_prev, sigma, one, one)
    sa = jnp.asarray(schedule.scale_arr, jnp.float32)
    return Coefficients(a, a_prev, sigma, _take(sa, t, 1.0), _take(sa, t_prev, sa[0]))


def _bcast(c, x):
    """A scalar or per-sample (b,) coefficient shaped to broadcast against x (b, ...)."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def predict_x0_eps(prediction_type: str, model_output, x_t, alpha):
    """(pred_x0, pred_eps) from the model output, for the three parameterisations diffusers supports."""
    sa, sb = jnp.sqrt(alpha), jnp.sqrt(1 - alpha)
    if prediction_type == "epsilon":
        return (x_t - sb * model_output) / sa, model_output
    if prediction_type == "v_prediction":
        return sa * x_t - sb * model_output, sa * model_output + sb * x_t
    if prediction_type == "sample":
        return model_output, (x_t - sa * model_output) / sb
    raise ValueError(f"prediction_type={prediction_type!r}; use 'epsilon', 'v_prediction' or 'sample'")


def ddim_step(schedule: Schedule, model_output, t, t_prev, x_t, *, eta=0.0, noise=None,
              set_alpha_to_one: bool = False, clip_sample: float | None = None):
    """x_t -> (x_prev, pred_x0), from timestep t to t_prev (-1: the final alpha).

    As diffusers' DDIMScheduler.step with clip_sample=False (or `clip_sample` = its clip_sample_range) and the noise
    given as `variance_noise`; `noise` is required whenever eta may be non-zero (this function draws nothing).
    With `schedule.scale_arr` (VideoCrafter's use_scale) pred_x0 is divided by scale_arr[t] and re-multiplied by
    scale_arr[t_prev] in x_prev, as upstream's p_sample_ddim; the returned pred_x0 is the divided one.
    """
    x_t = jnp.asarray(x_t, jnp.float32)
    model_output = jnp.asarray(model_output, jnp.float32)
    c = coefficients(schedule, t, t_prev, eta, set_alpha_to_one=set_alpha_to_one)
    a, a_prev, sigma, scale, scale_prev = (_bcast(v, x_t) for v in c)
    pred_x0, pred_eps = predict_x0_eps(schedule.prediction_type, model_output, x_t, a)
    if clip_sample is not None:
        pred_x0 = jnp.clip(pred_x0, -clip_sample, clip_sample)
    pred_x0 = pred_x0 / scale
    # "direction pointing to x_t"; the sigma^2 taken out here is put back as fresh noise below. The clamp only
    # guards rounding below 0 (analytically 1 - a_prev - sigma^2 >= 0 for eta <= 1), where upstream gives NaN.
    direction = jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0)) * pred_eps
    x_prev = jnp.sqrt(a_prev) * scale_prev * pred_x0 + direction
    if noise is not None:
        x_prev = x_prev + sigma * jnp.asarray(noise, jnp.float32)
    elif not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError("ddim_step with eta != 0 (or a traced eta) needs `noise` (standard normal, x_t's shape)")
    return x_prev, pred_x0


def ddim_inversion_step(schedule: Schedule, model_output, t, t_next, x_t, *, set_alpha_to_one: bool = True):
    """Deterministic DDIM from t to the noisier t_next (t = -1: clean latents at the initial alpha, 1.0 with
    set_alpha_to_one as DDIMInverseScheduler's default): the eta-0 step run backwards, so pairing (t_prev, t) of a
    sampling trajectory retraces it. Returns x_next. With VideoCrafter's use_scale the clean-latent estimate is
    rescaled from scale_arr[t] (scale_arr[0] for t = -1, as the sampler's last step) to scale_arr[t_next]: the
    inverse of `ddim_step`'s rescaling, so a sampler step evaluated at the same model output undoes it exactly."""
    x_t = jnp.asarray(x_t, jnp.float32)
    ac = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    a = _bcast(_take(ac, t, 1.0 if set_alpha_to_one else ac[0]), x_t)
    a_next = _bcast(_take(ac, t_next, 0.0), x_t)
    pred_x0, pred_eps = predict_x0_eps(schedule.prediction_type, jnp.asarray(model_output, jnp.float32), x_t, a)
    if schedule.scale_arr is not None:
        sa = jnp.asarray(schedule.scale_arr, jnp.float32)
        pred_x0 = pred_x0 * _bcast(_take(sa, t_next, 1.0) / _take(sa, t, sa[0]), x_t)
    return jnp.sqrt(a_next) * pred_x0 + jnp.sqrt(1 - a_next) * pred_eps


def guidance(uncond, cond, scale, rescale=0.0):
    """Classifier-free guidance uncond + scale * (cond - uncond); with `rescale` > 0, diffusers' rescale_noise_cfg
    (Lin et al. 2023, 3.4): blend with the result rescaled to cond's std (unbiased, over all non-batch axes)."""
    out = uncond + scale * (cond - uncond)
    if isinstance(rescale, (int, float)) and rescale == 0:
        return out
    axes = tuple(range(1, out.ndim))
    ratio = jnp.std(cond, axis=axes, ddof=1, keepdims=True) / jnp.std(out, axis=axes, ddof=1, keepdims=True)
    return rescale * (out * ratio) + (1 - rescale) * out
