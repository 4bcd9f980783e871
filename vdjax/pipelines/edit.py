"""Video editing with any pipeline (MagDiff's: a new prompt and subject over a source video).

    out = edit_video(pipe, read_video("dog.mp4"), "a cat running on grass", source_prompt="a dog running on grass",
                     image=subject_photo, mask=subject_mask, blend_mask=subject_mask)

The source frames are fitted to the frame size and VAE-encoded (posterior means); DDIM inversion with the source
prompt's conditional context (no guidance, as DDIM inversion does) takes them to noise along the sampler's
timesteps, keeping the latent at every timestep; the pipeline's own jitted sampler then regenerates from that noise
with the edited prompt and conditions. With `blend_mask`, the latents outside the mask are replaced after every
step by the inversion's latent at the same timestep, so the unchanged region follows the source (and ends on its
latents exactly). Generation and editing share the model and the sampler.

Plain DDIM inversion evaluates the model at the latent it leaves, the sampler at the latent it arrives at; the two
agree only for a model that changes slowly with its input. `inversion_iterations` solves each inversion step for the
latent whose own model output leads back (fixed-point iterations), which makes the eta-0 reconstruction exact where
they converge (tests/test_edit.py measures both).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdjax.diffusion.sampler import ddim_invert
from vdjax.io.image import fit_image
from vdjax.io.mask import fit_mask
from vdjax.io.video import to_uint8

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EditOutput:
    frames: np.ndarray          # uint8 (1, F, H, W, 3), the edited video
    latents: np.ndarray         # (1, F, h, w, C) its final latents
    source_latents: np.ndarray  # (1, F, h, w, C) the source video's latents
    trajectory: np.ndarray      # (n, 1, F, h, w, C) the inversion's latent at each of the n inverted (descending)
                                # timesteps


def source_frames(video: np.ndarray, num_frames: int, *, loop: bool = False) -> np.ndarray:
    """uint8 (F, H, W, 3) (vdjax.io.video.read_video) -> exactly `num_frames` frames, as `select_frames`."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] not in (1, 3, 4) or video.dtype != np.uint8:
        raise ValueError(f"the source video must be uint8 (frames, H, W, 3); got {video.dtype} {video.shape} "
                         "(see vdjax.io.video.read_video)")
    return select_frames(video, num_frames, loop=loop)


def select_frames(frames: np.ndarray, num_frames: int, *, loop: bool = False, what: str = "source video"):
    """(F, ...) -> exactly `num_frames` of them: the first ones of a longer video (with a log line); a shorter one
    is refused, or looped with `loop` (config.sample.loop_short_video, launch/sample.py --loop_short_video).
    Per-frame masks go through the same selection as their video."""
    frames = np.asarray(frames)
    n = len(frames)
    if n == 0:
        raise ValueError(f"the {what} has no frames")
    if n < num_frames:
        if not loop:
            raise ValueError(f"the {what} has {n} frames and the model makes {num_frames}; give a longer video, "
                             "fewer frames (--num_frames), or loop it (--loop_short_video, "
                             "config.sample.loop_short_video=True)")
        log.warning("%s of %d frames looped to %d", what, n, num_frames)
    elif n > num_frames:
        log.warning("%s of %d frames: its first %d are edited", what, n, num_frames)
    return frames[np.arange(num_frames) % n]


def is_per_frame(mask: np.ndarray) -> bool:
    """(F, H, W) rather than (H, W) or an (H, W, channels) image."""
    mask = np.asarray(mask)
    return mask.ndim == 3 and not (mask.shape[-1] in (1, 3, 4) and mask.shape[0] > 4)


def latent_mask(mask: np.ndarray, frames: int, height: int, width: int, factor: int) -> np.ndarray:
    """A subject mask ((H, W) or (F, H, W), any size) -> bool (1, F, h, w, 1) at the latent size: fitted to the frame
    size (fit_mask: log line, threshold at 0.5, empty refused), then a latent cell is subject when any of its pixels
    is, so the region kept from the source holds no subject pixel."""
    fitted = fit_mask(mask, height, width)
    fitted = np.broadcast_to(fitted, (frames, height, width)) if fitted.ndim == 2 else fitted
    if len(fitted) != frames:
        raise ValueError(f"a mask per frame must have {frames} frames; got {len(fitted)}")
    cells = fitted.reshape(frames, height // factor, factor, width // factor, factor).any(axis=(2, 4))
    return cells[None, ..., None]


def fit_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (F, H, W, 3) -> float32 (F, height, width, 3) in [-1, 1], each frame as fit_image (one log line)."""
    h, w = frames.shape[1:3]
    if (h, w) != (height, width):
        log.warning("source video %dx%d fitted to the frame size %dx%d (centred crop to the aspect ratio, resize)", w,
                    h, width, height)
    image_log = logging.getLogger(fit_image.__module__)
    level = image_log.level
    image_log.setLevel(logging.ERROR)  # not once per frame
    try:
        return np.stack([fit_image(frame, height, width) for frame in frames])
    finally:
        image_log.setLevel(level)


def _encode(vae, frames, scaling):
    return vae.encode(frames).mode() * scaling


def edit_video(pipe, video: np.ndarray, prompt: str, *, source_prompt: str | None = None,
               negative_prompt: str | Sequence[str] | None = None, blend_mask: np.ndarray | None = None,
               num_frames: int | None = None, height: int | None = None, width: int | None = None,
               steps: int | None = None, guidance_scale: float | None = None, eta: float = 0.0,
               strength: float | None = None, inversion_iterations: int | None = None, seed: int | None = None,
               loop: bool | None = None, progress=None, inversion_progress=None, **conditions) -> EditOutput:
    """Invert `video` (uint8 (F, H, W, 3)) with `source_prompt` (default: `prompt`), regenerate with `prompt` and
    the pipeline's `conditions` (MagDiff: image=, mask=). `blend_mask` (True = subject): keep the rest.

    `strength` (default config.sample.edit_strength): the fraction of the `steps` timesteps inverted and
    regenerated, from the clean end. Near the last timesteps of a zero-terminal-SNR schedule, alpha is ~1e-4 and
    epsilon-prediction inversion divides by its root, so a full inversion does not retrace; MagDiff's configs
    invert 0.8 of the schedule. `inversion_iterations` (default config.sample.inversion_iterations, else 0):
    fixed-point iterations per inversion step (see ddim_invert), so that the sampler retraces the inversion even
    where the model changes fast with its input (0: plain DDIM inversion, one model call per step).
    `loop` (default config.sample.loop_short_video): loop a video shorter than `num_frames` instead of refusing it.
    `progress(i, n)` / `inversion_progress(i, n)`: called after each sampling / inversion step.
    VideoCrafter's use_scale schedules invert with their per-timestep latent scale (ddim_inversion_step).
    I2V-Adapter: frame 0 stays clean, the source's first frame in the inversion and the latent of `image` in the
    regeneration."""
    cfg = pipe.config
    s = cfg.sample
    num_frames, height, width = num_frames or s.num_frames, height or s.height, width or s.width
    steps = s.steps if steps is None else steps
    strength = s.get("edit_strength", 1.0) if strength is None else strength
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength}; give the inverted fraction of the schedule in (0, 1]")
    start = steps - max(1, round(steps * strength))  # the first sampling step run
    iterations = s.get("inversion_iterations", 0) if inversion_iterations is None else inversion_iterations
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"inversion_iterations={iterations!r}; give 0 (plain DDIM inversion) or more fixed-point "
                         "iterations per step")
    guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
    pipe.check(num_frames=num_frames, height=height, width=width, steps=steps, guidance_scale=guidance_scale, eta=eta)
    negative = s.negative_prompt if negative_prompt is None else negative_prompt
    negative = [negative] if isinstance(negative, str) else list(negative)
    if len(negative) != 1:
        raise ValueError(f"{len(negative)} negative prompts; an edit takes one")
    if cfg.schedule.get("clip_sample", False):
        log.warning("the sampler clips its predicted clean latents (schedule.clip_sample), which the inversion cannot "
                    "undo: the edit follows the source only approximately; --config.schedule.clip_sample=False "
                    "turns it off")
    loop = s.get("loop_short_video", False) if loop is None else loop
    frames = source_frames(video, num_frames, loop=loop)
    f = pipe.vae.downsampling_factor
    # Where the sampler keeps the trajectory's latents (nowhere without a mask: one compiled sampler for both).
    keep_where = np.zeros((1, num_frames, height // f, width // f, 1), bool)
    if blend_mask is not None:
        if is_per_frame(blend_mask):  # the same frames as the video's
            blend_mask = select_frames(blend_mask, num_frames, loop=loop, what="blend mask")
        keep_where = ~latent_mask(blend_mask, num_frames, height, width, f)
    fitted = fit_frames(frames, height, width)
    compiled = pipe._edit_jits  # one compile per pipeline, shape and schedule (a new schedule empties it)
    encode = compiled.setdefault("encode", nnx.jit(_encode, static_argnums=2))
    z0 = encode(pipe.vae, jnp.asarray(fitted), float(pipe.config.vae.scaling_factor))[None]

    key = jax.random.key(s.seed if seed is None else seed)
    prep_key, loop_key = jax.random.split(key)
    shape = z0.shape
    _, source_context, _, _, source_extras = pipe.prepare(prep_key, shape, [source_prompt or prompt], negative, None,
                                                          steps=steps, **conditions)
    prepared, context, uncond, _, extras = pipe.prepare(prep_key, shape, [prompt], negative, None, steps=steps,
                                                        **conditions)

    ts = pipe.timesteps(steps)
    if not np.array_equal(pipe.previous_timesteps(ts, steps)[start:-1], ts[start + 1:]):
        log.warning("this schedule's sampler steps do not land on its next timesteps (%s spacing); the inversion "
                    "runs along the timesteps, so editing retraces the source only approximately",
                    pipe.config.schedule.timestep_spacing)
    ts = ts[start:]
    first_frame = bool(cfg.unet.get("first_frame_attention", False))

    listener = compiled.setdefault("inversion_progress", [None])  # read by the compiled loop's callback
    listener[0] = inversion_progress

    def report(i, n):
        if listener[0] is not None:
            listener[0](int(i), int(n))

    def invert(unet_state, z, ctx, extra, iterations):
        unet = nnx.merge(pipe._unet_graph, unet_state)
        fps = jnp.int32(s.fps) if cfg.unet.fps_conditioning else None
        return ddim_invert(pipe.denoiser(unet, fps, extra), z, ts, pipe.schedule, context=ctx, progress=report,
                           set_alpha_to_one=cfg.schedule.set_alpha_to_one, return_trajectory=True,
                           fixed_point_iterations=iterations, fixed_first_frame=first_frame)
    x_T, trajectory = compiled.setdefault(("invert", steps, start), jax.jit(invert))(
        pipe._unet_state, z0, source_context, source_extras, jnp.int32(iterations))
    if first_frame:  # I2V-Adapter: the clean first frame the sampler keeps is the conditioning image's latent
        x_T = x_T.at[:, 0].set(prepared[:, 0])
    # Step i lands on timestep i + 1 of the trajectory; the last one on the source latents.
    keep = (jnp.asarray(keep_where), jnp.concatenate([trajectory[1:], z0[None]]))
    z = pipe.sample_latents(x_T, context, uncond, steps=steps, guidance_scale=guidance_scale, eta=eta, key=loop_key,
                            progress=progress, extras=extras, keep=keep, start=start)
    out = pipe.postprocess(to_uint8(np.asarray(pipe.decode(z))))
    return EditOutput(out, np.asarray(z), np.asarray(z0), np.asarray(trajectory))
