"""vdjax.diffusion schedules and DDIM vs diffusers' DDIMScheduler / DDIMInverseScheduler / rescale_noise_cfg."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from conftest import max_abs_error
from vdjax.diffusion import ddim, schedules

SHAPE = (2, 4, 3, 8, 8)  # (b, c, f, h, w): the update is elementwise, the layout does not matter


@functools.partial(jax.jit, static_argnames=("set_alpha_to_one", "clip"))
def _trajectory(schedule, x, outputs, noises, ts, prevs, eta, *, set_alpha_to_one, clip):
    """Our whole trajectory as the jitted sampler runs it: lax.scan over traced timesteps, schedule a pytree arg."""
    def body(x, inputs):
        out, noise, t, t_prev = inputs
        x, x0 = ddim.ddim_step(schedule, out, t, t_prev, x, eta=eta, noise=noise,
                               set_alpha_to_one=set_alpha_to_one, clip_sample=clip)
        return x, (x, x0)
    return jax.lax.scan(body, x, (outputs, noises, ts, prevs))[1]


CASES = {  # name: (scheduler config, steps, eta)
    "eps_leading_eta0": (dict(timestep_spacing="leading", steps_offset=1), 20, 0.0),
    "eps_leading_eta0.5_alpha0": (dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False), 15, 0.5),
    "v_trailing_eta0": (dict(prediction_type="v_prediction", timestep_spacing="trailing"), 20, 0.0),
    "v_trailing_zero_snr_eta0": (dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                      rescale_betas_zero_snr=True), 12, 0.0),
    "v_trailing_zero_snr_eta0.5": (dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                        rescale_betas_zero_snr=True, set_alpha_to_one=False), 15, 0.5),
    "eps_linspace_linear_eta0.5": (dict(timestep_spacing="linspace", beta_schedule="linear"), 10, 0.5),
    "sample_leading_eta0": (dict(prediction_type="sample", timestep_spacing="leading", steps_offset=1), 10, 0.0),
    "eps_leading_clip": (dict(timestep_spacing="leading", clip_sample=True, set_alpha_to_one=False), 10, 0.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ddim_trajectory_matches_diffusers(name):
    config, steps, eta = CASES[name]
    config = dict(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                       set_alpha_to_one=True, steps_offset=0), **config)
    ref = DDIMScheduler(**config)
    ref.set_timesteps(steps)
    ours = schedules.Schedule.create(config["beta_schedule"], config["beta_start"], config["beta_end"],
                                     prediction_type=config.get("prediction_type", "epsilon"),
                                     rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False))
    # float64 tables here, float32 cumprod in diffusers: ~1e-6 relative apart.
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-7)
    ts = schedules.timesteps(ours, steps, config["timestep_spacing"], config["steps_offset"])
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    prevs = schedules.previous_timesteps(ts, step_ratio=1000 // steps)  # diffusers' t_prev rule

    rng = np.random.default_rng(len(name))
    gen = torch.Generator().manual_seed(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    outputs = rng.standard_normal((len(ts),) + SHAPE).astype(np.float32)
    noises = torch.randn((len(ts),) + SHAPE, generator=gen)  # diffusers gets it as `variance_noise`
    xs, x0s = _trajectory(ours, jnp.asarray(x_T), jnp.asarray(outputs), jnp.asarray(noises.numpy()),
                          jnp.asarray(ts), jnp.asarray(prevs), jnp.float32(eta),
                          set_alpha_to_one=config["set_alpha_to_one"], clip=1.0 if config["clip_sample"] else None)
    x, worst = torch.from_numpy(x_T), 0.0
    for i, t in enumerate(ref.timesteps):
        out = ref.step(torch.from_numpy(outputs[i]), t, x, eta=eta, variance_noise=noises[i] if eta else None)
        x = out.prev_sample
        scale = max(1.0, float(x.std()), float(out.pred_original_sample.std()))
        err = max(max_abs_error(xs[i], x.numpy()), max_abs_error(x0s[i], out.pred_original_sample.numpy()))
        assert err <= 1e-4 * scale, (name, i, int(t), err)
        worst = max(worst, err)
    print(f"{name}: {len(ts)} steps, max abs error {worst:.2e}")


def test_videocrafter_timesteps():
    s = schedules.Schedule.create()
    np.testing.assert_array_equal(schedules.timesteps(s, 50, "videocrafter"), np.arange(981, 0, -20))
    np.testing.assert_array_equal(schedules.timesteps(s, 25, "videocrafter"),
                                  schedules.timesteps(s, 25, "leading", steps_offset=1))
    assert len(schedules.timesteps(s, 7, "videocrafter")) == 8  # range(0, 1000, 142): one step more, as upstream
    with pytest.raises(ValueError, match="reaches timestep 1000"):
        schedules.timesteps(s, 3, "videocrafter")  # 0, 333, 666, 999 -> +1: upstream indexes past its tables


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("steps", [0, -5, 1001, 2.5])
def test_bad_steps(spacing, steps):
    with pytest.raises(ValueError, match="from 1 to 1000"):
        schedules.timesteps(schedules.Schedule.create(), steps, spacing)


def test_bad_names():
    with pytest.raises(ValueError, match="scaled_linear"):
        schedules.make_betas("cosine")
    with pytest.raises(ValueError, match="v_prediction"):
        schedules.Schedule.create(prediction_type="flow")
    with pytest.raises(ValueError, match="spacing"):
        schedules.timesteps(schedules.Schedule.create(), 10, "karras")
    with pytest.raises(ValueError, match="leading"):  # 1000 steps + offset 1 would index timestep 1000
        schedules.timesteps(schedules.Schedule.create(), 1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="needs `noise`"):
        ddim.ddim_step(schedules.Schedule.create(), jnp.zeros(3), 981, 961, jnp.zeros(3), eta=1.0)


def test_per_sample_timesteps():
    """VideoCrafter passes t as a (b,) vector; the result is the scalar one's."""
    s = schedules.Schedule.create(use_scale=True)
    x, e, n = (jnp.asarray(np.random.default_rng(i).standard_normal(SHAPE), jnp.float32) for i in range(3))
    scalar = ddim.ddim_step(s, e, 501, 481, x, eta=1.0, noise=n)
    vector = ddim.ddim_step(s, e, jnp.full((2,), 501), jnp.full((2,), 481), x, eta=1.0, noise=n)
    for a, b in zip(scalar, vector):
        np.testing.assert_array_equal(a, b)


def _invert_then_sample(steps, model, x0, check_against_diffusers=False):
    s = schedules.Schedule.create()
    ts = schedules.timesteps(s, steps, "leading", steps_offset=1)
    if check_against_diffusers:
        ref = DDIMInverseScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False, set_alpha_to_one=True, steps_offset=1)
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(ref.timesteps.numpy(), ts[::-1])
        x_ref = torch.tensor(np.asarray(x0))
    x = x0
    for t_from, t_to in zip(np.append(-1, ts[::-1][:-1]), ts[::-1]):  # -1: clean latents (alpha 1)
        if check_against_diffusers:  # diffusers is given the target step; the model runs there, as in its pipelines
            out = torch.tensor(np.asarray(model(jnp.asarray(x_ref.numpy()), t_to)))
            x_ref = ref.step(out, int(t_to), x_ref).prev_sample
        x = ddim.ddim_inversion_step(s, model(x, t_to), t_from, t_to, x)
    if check_against_diffusers:
        assert max_abs_error(x, x_ref.numpy()) <= 1e-4 * max(1.0, float(x_ref.std()))
    for t, t_prev in zip(ts, schedules.previous_timesteps(ts)):
        x, _ = ddim.ddim_step(s, model(x, t), t, t_prev, x, set_alpha_to_one=True)
    return max_abs_error(x, x0)


def test_inversion_then_sampling_returns_to_start():
    """DDIM inversion followed by DDIM sampling (eta 0) along the same timesteps with a fixed linear "model".

    The round trip is not exact: each direction evaluates the model at the other end of a step, a first-order
    error. Measured max abs error (x0 ~ N(0, 1), max |x0| 3.9): 0.154 at 50 steps, 0.079 at 100."""
    model = lambda x, t: 0.3 * x + 0.05 * jnp.sin(jnp.float32(t) / 100.0)
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE), jnp.float32)
    err50 = _invert_then_sample(50, model, x0, check_against_diffusers=True)
    err100 = _invert_then_sample(100, model, x0)
    print(f"inversion + sampling: max abs error {err50:.3f} (50 steps), {err100:.3f} (100 steps)")
    assert err50 <= 0.2 and err100 <= 0.6 * err50, (err50, err100)  # small, and shrinking ~1/steps


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_matches_diffusers(rescale):
    rng = np.random.default_rng(1)
    uncond, cond = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    ref = torch.from_numpy(uncond) + 7.5 * (torch.from_numpy(cond) - torch.from_numpy(uncond))
    if rescale:
        ref = rescale_noise_cfg(ref, torch.from_numpy(cond), guidance_rescale=rescale)
    ours = jax.jit(ddim.guidance)(jnp.asarray(uncond), jnp.asarray(cond), 7.5, rescale)  # traced scale and rescale
    assert max_abs_error(ours, ref.numpy()) <= 1e-5 * float(ref.abs().max())
