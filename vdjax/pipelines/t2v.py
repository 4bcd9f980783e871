"""Text-to-video: prompts -> tokens -> text encoder -> noise -> jitted DDIM loop -> chunked VAE decode -> frames.

    pipe = T2VPipeline.from_converted("models/sd15_mm_v2")          # or .from_files(config, model=..., ...)
    video = pipe(["a corgi running on the beach"], num_frames=16, steps=25, seed=0)   # uint8 (B, F, H, W, 3)

The family's config decides the details: the text encoder (CLIP, or OpenCLIP for VideoCrafter), the DDIM
timestep rule (diffusers' for AnimateDiff; VideoCrafter's, with its per-timestep latent scale), and fps
conditioning. Every size and setting is checked before any compute. The sampler compiles once per shape and
step count.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdjax.diffusion import schedules
from vdjax.diffusion.sampler import ddim_loop
from vdjax.io.video import to_uint8
from vdjax.models import clip_tokenizer


@dataclasses.dataclass
class T2VOutput:
    frames: np.ndarray   # uint8 (B, F, H, W, 3)
    latents: np.ndarray  # float32 (B, F, h, w, C), unscaled by the VAE's scaling factor (as the UNet sees them)


def make_schedule(cfg) -> schedules.Schedule:
    return schedules.Schedule.create(beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
                                     beta_end=cfg.beta_end, num_train_timesteps=cfg.num_train_timesteps,
                                     prediction_type=cfg.prediction_type,
                                     rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
                                     use_scale=cfg.get("use_scale", False), scale_b=cfg.get("scale_b", 0.3),
                                     fix_scale_bug=cfg.get("fix_scale_bug", False))


def sampling_timesteps(cfg, schedule: schedules.Schedule, steps: int) -> np.ndarray:
    """The sampler's timesteps for `steps` steps, as config.schedule spaces them (first = the noisiest)."""
    return schedules.timesteps(schedule, steps, spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset)


def build_part(part: str, config, rngs) -> nnx.Module:
    """A model part with fresh (random) weights, of the kind the config names."""
    from vdjax.models import clip, openclip, resampler, unet3d, vae

    builders = {
        "unet": lambda: unet3d.UNet3D(config.unet, rngs=rngs),
        "vae": lambda: vae.AutoencoderKL(config.vae, rngs=rngs),
        "text_encoder": lambda: (openclip.TextTower if config.get("text_encoder_kind", "clip") == "openclip"
                                 else clip.CLIPTextModel)(config.text_encoder, rngs=rngs),
        "image_encoder": lambda: (clip.CLIPVisionModelWithProjection if config.get("image_encoder_kind") == "clip"
                                  else openclip.VisionTower)(config.image_encoder, rngs=rngs),
        "image_proj": lambda: (resampler.ImageProjModel if "clip_extra_context_tokens" in config.image_proj
                               else resampler.Resampler)(config.image_proj, rngs=rngs),
    }
    return builders[part]()


def encode_text(model, ids, skip: int = 0):
    from vdjax.models.openclip import TextTower

    if isinstance(model, TextTower):  # OpenCLIP: the config's layer ('penultimate' for VideoCrafter), all tokens
        return model(ids)
    return model(ids, skip=skip).last_hidden_state


class T2VPipeline:
    def __init__(self, config, unet, vae, text_encoder, tokenizer_folder: str | None = None):
        self.config, self.unet, self.vae, self.text_encoder = config, unet, vae, text_encoder
        if config.get("text_encoder_kind", "clip") == "openclip":  # OpenCLIP's own BPE (pads with 0)
            from vdjax.models.openclip_tokenizer import OpenCLIPTokenizer

            self.tokenizer = OpenCLIPTokenizer(context_length=config.text_encoder.context_length)
        else:
            if tokenizer_folder is None:  # SD 1.x's tokenizer is CLIP's BPE, which vdjax bundles
                tokenizer_folder = clip_tokenizer.write_tokenizer_folder(tempfile.mkdtemp(prefix="vdjax_tokenizer_"))
            self.tokenizer = clip_tokenizer.load_tokenizer(tokenizer_folder)
        self._unet_graph, self._unet_state = nnx.split(unet)
        self.schedule = make_schedule(config.schedule)  # also builds the jitted sampler
        self._encode = nnx.jit(encode_text, static_argnums=2)
        self._decode = nnx.jit(lambda m, z, chunk: m.decode_video(z, chunk_size=chunk), static_argnums=2)

    @property
    def schedule(self) -> schedules.Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, value: schedules.Schedule) -> None:
        """The noise schedule is a constant of the compiled loops: setting a new one drops them (the sampler's and
        editing's, vdjax.pipelines.edit), so the next call compiles with it instead of sampling the old one."""
        self._schedule = value
        self._sample = jax.jit(self._sample_fn, static_argnames=("steps", "guided", "progress", "start"))
        self._edit_jits = {}  # vdjax.pipelines.edit's compiled loops for this pipeline

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_converted(cls, folder: str, *, init=(), seed: int = 0, **kw) -> "T2VPipeline":
        """kw: converted.load's (config= builds the parts as another config says); init: parts built with random
        weights (seed) instead of loaded, e.g. a new UNet on a trained VAE."""
        from vdjax.convert import converted
        from vdjax.layers.primitives import InitKeys

        unknown = sorted(set(init) - set(cls.PARTS))
        if unknown:
            raise ValueError(f"{cls.__name__} has no part {', '.join(unknown)}; its parts: {', '.join(cls.PARTS)}")
        config, models = converted.load(folder, parts=[p for p in cls.PARTS if p not in init], **kw)
        rngs = InitKeys(seed)
        models.update({part: build_part(part, config, rngs) for part in cls.PARTS if part in init})
        tokenizer = os.path.join(folder, "tokenizer")
        return cls(config, **cls._parts_of(models, folder),
                   tokenizer_folder=tokenizer if os.path.isdir(tokenizer) else None)

    @classmethod
    def from_files(cls, config, **files) -> "T2VPipeline":
        """PyTorch files / snapshot folders converted at load time (see vdjax.convert.sources.load_models)."""
        from vdjax.convert import sources

        models = sources.load_models(config, **files)
        return cls(config, **cls._parts_of(models, "the files given"), tokenizer_folder=models.get("tokenizer_folder"))

    @classmethod
    def _parts_of(cls, models: dict, source: str) -> dict:
        missing = [p for p in cls.PARTS if p not in models]
        if missing:
            raise ValueError(f"{source}: no weights for {', '.join(missing)}; pass a whole model (--model) or each "
                             f"part, for a config that has these parts")
        return {p: models[p] for p in cls.PARTS}

    @classmethod
    def random_init(cls, config, seed: int = 0) -> "T2VPipeline":
        """Random weights: for smoke tests and benchmarks (the video is noise)."""
        from vdjax.layers.primitives import InitKeys

        rngs = InitKeys(seed)  # nnx.Rngs would cost ~60x the time here (a Variable update per parameter)
        return cls(config, **{part: build_part(part, config, rngs) for part in cls.PARTS})

    PARTS = ("unet", "vae", "text_encoder")

    def set_unet(self, unet: nnx.Module) -> None:
        """Swap in other weights of the same UNet (e.g. a training run's EMA) without recompiling the sampler."""
        self.unet = unet
        self._unet_graph, self._unet_state = nnx.split(unet)

    # ---- checks ------------------------------------------------------------------------------------------------
    @property
    def pixel_factor(self) -> int:
        return self.vae.downsampling_factor * self.unet.downsampling_factor

    def check(self, *, num_frames: int, height: int, width: int, steps: int, guidance_scale: float, eta: float):
        f = self.pixel_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} for this model; got {height}x{width}"
                             f" (e.g. {max(f, height - height % f)}x{max(f, width - width % f)})")
        motion = self.config.unet.motion
        limited = motion.kind == "animatediff" and motion.max_positions
        if num_frames < 1 or (limited and num_frames > motion.max_positions):
            raise ValueError(f"num_frames={num_frames}; this model takes 1 to {motion.max_positions} frames")
        if steps < 1:
            raise ValueError(f"steps={steps}; use at least 1 sampling step")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale}; use 0 or more (1 = no guidance)")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta={eta}; DDIM's eta is in [0, 1] (0 = deterministic)")

    # ---- stages -----------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, 77) int token ids for the text encoder (CLIP's or OpenCLIP's tokenizer, as the config says)."""
        if self.config.get("text_encoder_kind", "clip") == "openclip":
            return np.asarray(self.tokenizer(list(prompts)))
        return clip_tokenizer.tokenize(self.tokenizer, list(prompts), self.config.text_encoder.max_position_embeddings)

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        ids = self.tokenize(prompts)
        return self._encode(self.text_encoder, jnp.asarray(ids), int(self.config.sample.clip_skip))

    def timesteps(self, steps: int) -> np.ndarray:
        return sampling_timesteps(self.config.schedule, self.schedule, steps)

    def previous_timesteps(self, ts: np.ndarray, steps: int) -> np.ndarray:
        if self.config.schedule.timestep_spacing == "videocrafter":  # VideoCrafter's DDIMSampler: the next entry
            return schedules.previous_timesteps(ts)
        # diffusers' DDIMScheduler steps from t to t - num_train_timesteps // steps (not always the next one)
        return schedules.previous_timesteps(ts, step_ratio=self.config.schedule.num_train_timesteps // steps)

    def denoiser(self, unet, fps=None, extras=None) -> Callable:
        """`(x, t, context) -> model output` for the sampler: the UNet with the fps and the pipeline's extra
        inputs (`extras`, e.g. MagDiff's subject latents: (B, ...) arrays, tiled to the guidance's doubled batch)."""
        extras = extras or {}

        def denoise(x, t, c):
            tiled = jax.tree.map(lambda v: jnp.concatenate([v] * (x.shape[0] // v.shape[0])), extras)
            return unet(x, t, c, fps=fps, **tiled)
        return denoise

    def _sample_fn(self, unet_state, x_T, context, uncond, guidance_scale, eta, key, fps, extras, keep, *, steps,
                   guided, progress, start=0):
        unet = nnx.merge(self._unet_graph, unet_state)
        ts = self.timesteps(steps)
        prev = self.previous_timesteps(ts, steps)[start:]
        ts = ts[start:]  # start > 0: from a partly noised x_T (I2V-Adapter's frame prior at a later t0)
        fps = fps if self.config.unet.fps_conditioning else None
        clip = self.config.schedule.get("clip_sample", False)
        return ddim_loop(self.denoiser(unet, fps, extras), x_T, ts, self.schedule, prev_timesteps=prev,
                         clip_sample=1.0 if clip is True else (clip or None),
                         fixed_first_frame=self.config.unet.first_frame_attention,
                         context=context, uncond_context=uncond if guided else None, guidance_scale=guidance_scale,
                         guidance_rescale=self.config.sample.guidance_rescale, eta=eta, key=key,
                         set_alpha_to_one=self.config.schedule.set_alpha_to_one, progress=progress, keep=keep)

    def sample_latents(self, x_T, context, uncond, *, steps: int, guidance_scale: float, eta: float, key,
                       progress: Callable | None = None, start: int = 0, extras: dict | None = None,
                       keep: tuple | None = None) -> jax.Array:
        """The jitted DDIM loop from x_T; `keep` as `ddim_loop`'s (editing's latent blending)."""
        guided = guidance_scale > 1.0  # as diffusers: no unconditional pass at scale <= 1
        fps = jnp.int32(self.config.sample.fps)  # the UNet's fps conditioning, if any (one for the whole batch)
        return self._sample(self._unet_state, x_T, context, uncond, jnp.float32(guidance_scale), jnp.float32(eta),
                            key, fps, extras or {}, keep, steps=steps, guided=guided, progress=progress, start=start)

    def decode(self, latents: jax.Array) -> jax.Array:
        return self._decode(self.vae, latents / self.config.vae.scaling_factor, int(self.config.sample.vae_chunk_size))

    def conditioning(self, prompts: list[str], negative: list[str], *, height: int, width: int,
                     **conditions) -> tuple[jax.Array, jax.Array]:
        """(context, unconditional context) for the UNet's cross-attention."""
        if conditions:
            raise TypeError(f"this text-to-video pipeline takes no {', '.join(conditions)}; for image-to-video use "
                            "a config with an image encoder (e.g. configs/videocrafter.py:variant=i2v_512_v1)")
        return self.encode_prompts(prompts), self.encode_prompts(negative)

    # ---- the whole thing --------------------------------------------------------------------------------------
    def __call__(self, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, eta: float | None = None,
                 seed: int | None = None, latents: jax.Array | None = None,
                 progress: Callable[[int, int], None] | None = None, **conditions) -> T2VOutput:
        """`conditions`: what else the pipeline conditions on (I2VPipeline: `image`)."""
        s = self.config.sample
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        num_frames, height, width = num_frames or s.num_frames, height or s.height, width or s.width
        steps = s.steps if steps is None else steps
        guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
        eta = s.eta if eta is None else eta
        self.check(num_frames=num_frames, height=height, width=width, steps=steps, guidance_scale=guidance_scale,
                   eta=eta)
        negative = negative_prompt if negative_prompt is not None else s.negative_prompt
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        key = jax.random.key(s.seed if seed is None else seed)
        noise_key, loop_key = jax.random.split(key)
        f = self.vae.downsampling_factor
        shape = (len(prompts), num_frames, height // f, width // f, self.config.unet.in_channels)
        x_T, context, uncond, start, extras = self.prepare(noise_key, shape, prompts, negative, latents,
                                                           steps=steps, **conditions)
        z = self.sample_latents(x_T, context, uncond, steps=steps, guidance_scale=guidance_scale, eta=eta,
                                key=loop_key, progress=progress, start=start, extras=extras)
        return T2VOutput(self.postprocess(to_uint8(np.asarray(self.decode(z)))), np.asarray(z))

    def prepare(self, key, shape, prompts, negative, latents, *, steps: int, **conditions):
        """(x_T, context, unconditional context, first step, extras): the sampler's start and its conditioning
        (`extras`: further UNet inputs, see `denoiser`)."""
        x_T = jax.random.normal(key, shape, jnp.float32) if latents is None else jnp.asarray(latents, jnp.float32)
        if x_T.shape != shape:
            raise ValueError(f"latents must have shape {shape}; got {x_T.shape}")
        context, uncond = self.conditioning(prompts, negative, height=shape[2] * self.vae.downsampling_factor,
                                            width=shape[3] * self.vae.downsampling_factor, **conditions)
        return x_T, context, uncond, 0, {}

    def postprocess(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (B, F, H, W, 3) decoded frames -> what the pipeline returns (here: unchanged)."""
        return frames
