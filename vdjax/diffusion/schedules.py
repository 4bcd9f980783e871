"""Noise schedules and inference timesteps, as diffusers' DDIMScheduler and VideoCrafter's LatentDiffusion build them.

Tables are computed in float64 numpy and stored as float32 (LDM/VideoCrafter register float32 buffers computed in
float64; diffusers computes in float32 torch, which differs by ~1e-6 relative). Step functions in `ddim.py` index
them with (possibly traced) integer timesteps.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

SPACINGS = ("leading", "trailing", "linspace", "videocrafter")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_betas(kind: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> np.ndarray:
    """float64 betas. Names are diffusers': `scaled_linear` is linear in sqrt(beta), which LDM, Stable Diffusion and
    VideoCrafter configs call "linear" (`linear_start`/`linear_end`); diffusers' `linear` is linear in beta (the one
    AnimateDiff's inference configs name)."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    raise ValueError(f"beta schedule {kind!r} is not supported; use 'linear' or 'scaled_linear'")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1 (diffusers' `rescale_zero_terminal_snr`): shift and scale sqrt(alphas_cumprod)
    so the last one is exactly 0 and the first is unchanged. alphas_cumprod[-1] becomes 0, so epsilon prediction
    cannot be used at the last timestep (pred_x0 divides by 0); it is meant for v_prediction with trailing spacing."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    ac = ((sqrt_ac - last) * (first / (first - last))) ** 2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def videocrafter_scale_arr(num_train_timesteps: int = 1000, scale_b: float = 0.3, scale_a: float = 1.0,
                           fix_scale_bug: bool = True) -> np.ndarray:
    """VideoCrafter's `use_scale` table: linspace(scale_a, scale_b, 400), then scale_b. Upstream without
    `fix_scale_bug` (its default) appends num_train_timesteps entries instead of num_train_timesteps - 400, so the
    table is 400 entries too long; only the first num_train_timesteps are ever indexed, so the values used agree."""
    tail = num_train_timesteps - 400 if fix_scale_bug else num_train_timesteps
    return np.concatenate([np.linspace(scale_a, scale_b, 400), np.full(tail, scale_b)]).astype(np.float32)


def ldm_buffers(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The buffers LDM's `register_schedule` stores in a checkpoint (v_posterior 0), float64 math, float32 values."""
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = dict(
        betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac), log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=post_var, posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
    return {k: v.astype(np.float32) for k, v in out.items()}


# A pytree (tables are leaves, the rest static) so a Schedule can be a jit argument as well as a closure constant.
# eq=False: identity hashing, since numpy fields make value equality ambiguous.
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    alphas_cumprod: np.ndarray                      # (num_train_timesteps,) float32
    scale_arr: np.ndarray | None = None             # VideoCrafter `use_scale` table (float32), None when off
    prediction_type: str = dataclasses.field(default="epsilon", metadata=dict(static=True))
    num_train_timesteps: int = dataclasses.field(default=1000, metadata=dict(static=True))

    @classmethod
    def create(cls, beta_schedule: str = "scaled_linear", beta_start: float = 0.00085, beta_end: float = 0.012,
               num_train_timesteps: int = 1000, prediction_type: str = "epsilon",
               rescale_betas_zero_snr: bool = False, use_scale: bool = False, scale_b: float = 0.3,
               fix_scale_bug: bool = True) -> "Schedule":
        """Defaults: SD/VideoCrafter's schedule. Note upstream VideoCrafter defaults `fix_scale_bug` to False (the
        1400-long table); the values indexed are the same either way."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}; use one of {PREDICTION_TYPES}")
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        scale = videocrafter_scale_arr(num_train_timesteps, scale_b, fix_scale_bug=fix_scale_bug) if use_scale else None
        return cls(np.cumprod(1.0 - betas).astype(np.float32), scale, prediction_type, num_train_timesteps)


def timesteps(schedule: Schedule, steps: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps for `steps` inference steps.

    leading/trailing/linspace: as diffusers' DDIMScheduler.set_timesteps (steps_offset applies to leading only, as
    there). videocrafter: `range(0, T, T // steps) + 1` (LDM's make_ddim_timesteps 'uniform'), which has more than
    `steps` entries when T // steps does not divide T (steps=7 -> 8 steps), as upstream runs it.
    """
    n = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n:
        raise ValueError(f"steps={steps!r}; the number of inference steps must be an integer from 1 to {n}")
    if spacing == "leading":
        ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "videocrafter":
        ts = (np.arange(0, n, n // steps) + 1)[::-1].astype(np.int64)
        if ts[0] >= n:  # e.g. steps=3: 0, 333, 666, 999 -> +1 = 1000 (upstream indexes past its tables and crashes)
            raise ValueError(f"steps={steps} with videocrafter spacing reaches timestep {ts[0]} >= {n}; "
                             f"choose a step count for which {n} // steps does not divide {n - 1}")
    else:
        raise ValueError(f"spacing={spacing!r}; use one of {SPACINGS}")
    if ts.max() >= n or ts.min() < 0:
        raise ValueError(f"steps={steps}, spacing={spacing!r}, steps_offset={steps_offset} give timesteps outside "
                         f"0..{n - 1}")
    return np.ascontiguousarray(ts)


def previous_timesteps(ts: np.ndarray, step_ratio: int | None = None) -> np.ndarray:
    """t_prev for each t of the descending `ts`: by default the next entry, and -1 (the final alpha) after the last;
    with `step_ratio` (num_train_timesteps // steps) diffusers' DDIMScheduler rule t - step_ratio, which for trailing
    or linspace spacing need not be the next entry (and may be negative: final alpha)."""
    ts = np.asarray(ts, np.int64)
    if step_ratio is not None:
        return ts - step_ratio
    return np.append(ts[1:], -1)
