"""Video editing with any pipeline (MagDiff's: a new prompt and subject over a source video).

    out = edit_video(pipe, read_video("dog.mp4"), "a cat running on grass", source_prompt="a dog running on grass",
                     image=subject_photo, mask=subject_mask, blend_mask=subject_mask)

The source frames are fitted to the frame size and VAE-encoded (posterior means); DDIM inversion with the source
prompt's conditional context (no guidance, as DDIM inversion does) takes them to noise along the sampler's
timesteps, keeping the latent at every timestep; the pipeline's own jitted sampler then regenerates from that noise
with the edited prompt and conditions. With `blend_mask`, the latents outside the mask are replaced after every
step by the inversion's latent at the same timestep, so the unchanged region follows the source (and ends on its
latents exactly). Generation and editing share the model and the sampler.
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
    """uint8 (F, H, W, 3) -> exactly `num_frames` frames: the first ones of a longer video (with a log line); a
    shorter one is refused, or looped with `loop` (config.sample.loop_short_video)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] not in (1, 3, 4) or video.dtype != np.uint8:
        raise ValueError(f"the source video must be uint8 (frames, H, W, 3); got {video.dtype} {video.shape} "
                         "(see vdjax.io.video.read_video)")
    n = len(video)
    if n < num_frames:
        if not loop:
            raise ValueError(f"the source video has {n} frames and the model makes {num_frames}; give a longer "
                             "video, fewer frames (--num_frames), or set config.sample.loop_short_video=True to "
                             "loop it")
        log.warning("source video of %d frames looped to %d", n, num_frames)
        video = np.concatenate([video] * -(-num_frames // n))
    elif n > num_frames:
        log.warning("source video of %d frames: its first %d are edited", n, num_frames)
    return video[:num_frames]


def latent_mask(mask: np.ndarray, frames: int, height: int, width: int, factor: int) -> np.ndarray:
    """A subject mask ((H, W) or (F, H, W), any size) -> bool (1, F, h, w, 1) at the latent size: fitted to the frame
    size, then a latent cell is subject when most of its pixels are."""
    fitted = fit_mask(mask, height, width)
    fitted = np.broadcast_to(fitted, (frames, height, width)) if fitted.ndim == 2 else fitted
    if len(fitted) != frames:
        raise ValueError(f"a mask per frame must have {frames} frames; got {len(fitted)}")
    cells = fitted.reshape(frames, height // factor, factor, width // factor, factor).mean(axis=(2, 4))
    return (cells > 0.5)[None, ..., None]


def _encode(vae, frames, scaling):
    return vae.encode(frames).mode() * scaling


def edit_video(pipe, video: np.ndarray, prompt: str, *, source_prompt: str | None = None,
               negative_prompt: str | Sequence[str] | None = None, blend_mask: np.ndarray | None = None,
               num_frames: int | None = None, height: int | None = None, width: int | None = None,
               steps: int | None = None, guidance_scale: float | None = None, eta: float = 0.0,
               strength: float | None = None, seed: int | None = None, loop: bool | None = None, progress=None,
               **conditions) -> EditOutput:
    """Invert `video` (uint8 (F, H, W, 3)) with `source_prompt` (default: `prompt`), regenerate with `prompt` and
    the pipeline's `conditions` (MagDiff: image=, mask=). `blend_mask` (True = subject): keep the rest.

    `strength` (default config.sample.edit_strength): the fraction of the `steps` timesteps inverted and
    regenerated, from the clean end. Near the last timesteps of a zero-terminal-SNR schedule, alpha is ~1e-4 and
    epsilon-prediction inversion divides by its root, so a full inversion does not retrace; MagDiff's configs
    invert 0.8 of the schedule."""
    s = pipe.config.sample
    num_frames, height, width = num_frames or s.num_frames, height or s.height, width or s.width
    steps = s.steps if steps is None else steps
    strength = s.get("edit_strength", 1.0) if strength is None else strength
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength}; give the inverted fraction of the schedule in (0, 1]")
    start = steps - max(1, round(steps * strength))  # the first sampling step run
    guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
    pipe.check(num_frames=num_frames, height=height, width=width, steps=steps, guidance_scale=guidance_scale, eta=eta)
    frames = source_frames(video, num_frames, loop=s.get("loop_short_video", False) if loop is None else loop)
    f = pipe.vae.downsampling_factor
    keep_where = None
    if blend_mask is not None:
        keep_where = jnp.asarray(~latent_mask(blend_mask, num_frames, height, width, f))
    fitted = np.stack([fit_image(frame, height, width) for frame in frames])
    compiled = pipe.__dict__.setdefault("_edit_jits", {})  # one compile per pipeline, shape and schedule
    encode = compiled.setdefault("encode", nnx.jit(_encode, static_argnums=2))
    z0 = encode(pipe.vae, jnp.asarray(fitted), float(pipe.config.vae.scaling_factor))[None]

    negative = s.negative_prompt if negative_prompt is None else negative_prompt
    negative = [negative] if isinstance(negative, str) else list(negative)
    key = jax.random.key(s.seed if seed is None else seed)
    prep_key, loop_key = jax.random.split(key)
    shape = z0.shape
    _, source_context, _, _, source_extras = pipe.prepare(prep_key, shape, [source_prompt or prompt], negative, None,
                                                          steps=steps, **conditions)
    _, context, uncond, _, extras = pipe.prepare(prep_key, shape, [prompt], negative, None, steps=steps,
                                                 **conditions)

    ts = pipe.timesteps(steps)[start:]
    cfg = pipe.config

    def invert(unet_state, z, ctx, extra):
        unet = nnx.merge(pipe._unet_graph, unet_state)
        fps = jnp.int32(s.fps) if cfg.unet.fps_conditioning else None
        return ddim_invert(pipe.denoiser(unet, fps, extra), z, ts, pipe.schedule, context=ctx,
                           set_alpha_to_one=cfg.schedule.set_alpha_to_one, return_trajectory=True)
    x_T, trajectory = compiled.setdefault(("invert", steps, start), jax.jit(invert))(
        pipe._unet_state, z0, source_context, source_extras)
    keep = None
    if keep_where is not None:  # step i lands on timestep i + 1 of the trajectory; the last on the source latents
        keep = (keep_where, jnp.concatenate([trajectory[1:], z0[None]]))
    z = pipe.sample_latents(x_T, context, uncond, steps=steps, guidance_scale=guidance_scale, eta=eta, key=loop_key,
                            progress=progress, extras=extras, keep=keep, start=start)
    out = pipe.postprocess(to_uint8(np.asarray(pipe.decode(z))))
    return EditOutput(out, np.asarray(z), np.asarray(z0), np.asarray(trajectory))
