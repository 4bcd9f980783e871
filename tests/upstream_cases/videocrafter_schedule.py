"""VideoCrafter's LatentDiffusion schedule buffers and DDIMSampler (make_schedule, p_sample_ddim, sample with CFG)
vs vdjax.diffusion: buffers, DDIM tables, single updates (eta 0 and 1) and a stub-model DDIM loop."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert import ldm, videocrafter
from vdjax.convert.keymap import load_params
from vdjax.diffusion import ddim, schedules
from vdjax.diffusion.sampler import ddim_loop
from vdjax.layers.primitives import InitKeys
from vdjax.models.unet3d import UNet3D


def _stub_eps(x, context, t):
    # meta notes: eps = 0.9 x + 0.2 mean(context over tokens and channels)[b] + 1e-4 float(t)[b]
    b = x.shape[0]
    return 0.9 * x + (0.2 * context.mean(axis=(1, 2)) + 1e-4 * jnp.float32(t)).reshape(b, *(1,) * (x.ndim - 1))


def run_unet_loop(case: Case) -> dict[str, float]:
    """The tiny t2v_1024-like UNet in the DDIM loop with guidance, fps and eta 1 (noise given per step)."""
    kw, io, loop = case.meta["constructor_kwargs"], case.io(), case.meta["loop"]
    ld = kw["latent_diffusion"]
    schedule = schedules.Schedule.create("scaled_linear", ld["linear_start"], ld["linear_end"], ld["timesteps"],
                                         use_scale=ld.get("use_scale", False), scale_b=ld.get("scale_b", 0.3),
                                         fix_scale_bug=ld.get("fix_scale_bug", False))
    unet = UNet3D(videocrafter.unet_config(kw["unet"]), rngs=InitKeys(0))
    load_params(unet, case.weights(), ldm.unet_key(unet.config), ignore=ldm.ignored, source=str(case.path))
    to_last = lambda x: jnp.asarray(x).transpose(0, 2, 3, 4, 1)  # (b, c, t, h, w) -> (b, t, h, w, c)
    ts = schedules.timesteps(schedule, loop["S"], "videocrafter")
    np.testing.assert_array_equal(ts[::-1], io["ddim_timesteps"])
    fps, context, uncond = jnp.asarray(io["fps"]), jnp.asarray(io["context"]), jnp.asarray(io["uc_context"])
    # vdjax's loop (guidance as one stacked batch), replaying upstream's noise at each step.
    x = ddim_loop(lambda x, t, c: unet(x, t, c, fps=jnp.concatenate([fps, fps])[:x.shape[0]]), to_last(io["x_T"]),
                  ts, schedule, context=context, uncond_context=uncond,
                  guidance_scale=loop["unconditional_guidance_scale"], eta=loop["eta"], set_alpha_to_one=False,
                  noises=jnp.stack([to_last(n) for n in io["noise"]]))
    ref = io["x0"]
    errors = {"x0": max_abs_error(np.asarray(x).transpose(0, 4, 1, 2, 3), ref)}
    assert errors["x0"] <= tolerance(ref), (errors, tolerance(ref))
    return errors


def run(case: Case) -> dict[str, float]:
    if case.meta["case"] == "ddim_loop_tiny_unet":
        return run_unet_loop(case)
    kw, io = case.meta["constructor_kwargs"], case.io()
    # Upstream's LatentDiffusion defaults: scale_b 0.3, fix_scale_bug False.
    schedule = schedules.Schedule.create("scaled_linear", kw["linear_start"], kw["linear_end"], kw["timesteps"],
                                         use_scale=kw.get("use_scale", False), scale_b=kw.get("scale_b", 0.3),
                                         fix_scale_bug=kw.get("fix_scale_bug", False))
    errors = {}

    # 1. Registered buffers (float64 math, float32 values): relative error.
    ours = schedules.ldm_buffers(schedules.make_betas("scaled_linear", kw["timesteps"], kw["linear_start"],
                                                      kw["linear_end"]))
    if schedule.scale_arr is not None:
        ours["scale_arr"] = schedule.scale_arr
    weights = case.weights()
    assert sorted(ours) == sorted(weights), (sorted(ours), sorted(weights))
    rel = lambda a, b: float(np.max(np.abs(a.astype(np.float64) - b) / np.maximum(np.abs(b), 1e-30)))
    errors["buffers_rel"] = max(rel(ours[k], weights[k]) for k in weights)
    errors["alphas_cumprod_rel"] = rel(schedule.alphas_cumprod, weights["alphas_cumprod"])
    assert errors["buffers_rel"] <= 1e-6 and errors["alphas_cumprod_rel"] <= 1e-6, errors

    # 2. DDIM tables for 50 and 25 steps, from the coefficients ddim_step itself uses.
    for s in (50, 25):
        ts = schedules.timesteps(schedule, s, "videocrafter")
        np.testing.assert_array_equal(ts[::-1], io[f"s{s}_ddim_timesteps"])
        asc, prev_asc = ts[::-1], schedules.previous_timesteps(ts)[::-1]
        for eta in (0, 1):
            c = ddim.coefficients(schedule, asc, prev_asc, eta)
            tables = {"ddim_alphas": c.alpha, "ddim_alphas_prev": c.alpha_prev, f"eta{eta}_ddim_sigmas": c.sigma,
                      "ddim_sqrt_one_minus_alphas": jnp.sqrt(1 - c.alpha)}
            if schedule.scale_arr is not None:
                tables.update(ddim_scale_arr=c.scale, ddim_scale_arr_prev=c.scale_prev)
            for name, value in tables.items():
                ref = io[f"s{s}_{name}"]
                errors[f"s{s}_tables"] = max(errors.get(f"s{s}_tables", 0.0), rel(np.asarray(value), ref))
        assert errors[f"s{s}_tables"] <= 1e-6, errors  # sigmas: float32 here, float64 upstream

        # 3. Single p_sample_ddim updates.
        idx = io[f"s{s}_pair_index"]
        np.testing.assert_array_equal(io[f"s{s}_pair_t"], asc[idx])
        for eta in (0, 1):
            for i, (t, t_prev) in enumerate(zip(io[f"s{s}_pair_t"], io[f"s{s}_pair_t_prev"])):
                x_prev, pred_x0 = ddim.ddim_step(schedule, io[f"s{s}_pair_eps"][i], t, t_prev,
                                                 io[f"s{s}_pair_x_t"][i], eta=float(eta),
                                                 noise=io[f"s{s}_pair_noise"][i])
                for name, value in (("x_prev", x_prev), ("pred_x0", pred_x0)):
                    key = f"s{s}_pair_eta{eta}_{name}"
                    ref = io[key][i]
                    errors[key] = max(errors.get(key, 0.0), max_abs_error(value, ref))
                    assert errors[key] <= tolerance(ref), (key, i, errors[key])

    # 4. The stub-model DDIM loop with classifier-free guidance (noise_like returns loop_noise[i] at step i).
    loop = case.meta["loop"]
    ts = schedules.timesteps(schedule, loop["S"], "videocrafter")
    np.testing.assert_array_equal(ts[::-1], io["loop_ddim_timesteps"])
    assert len(ts) == loop["n_steps"]
    for eta in loop["etas"]:
        x = jnp.asarray(io["loop_x_T"])
        for i, (t, t_prev) in enumerate(zip(ts, schedules.previous_timesteps(ts))):
            e = ddim.guidance(_stub_eps(x, io["loop_uc_context"], t), _stub_eps(x, io["loop_context"], t),
                              loop["unconditional_guidance_scale"])
            x, _ = ddim.ddim_step(schedule, e, t, t_prev, x, eta=eta, noise=io["loop_noise"][i])
        key, ref = f"loop_eta{eta:g}_x0", io[f"loop_eta{eta:g}_x0"]
        errors[key] = max_abs_error(x, ref)
        assert errors[key] <= tolerance(ref), (key, errors[key], tolerance(ref))
    return errors
