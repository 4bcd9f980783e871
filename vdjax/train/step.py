"""The train step: one pure function, jitted once with the state donated and every input placed on the mesh.

Noise-prediction loss on VAE latents of the batch's videos (frozen VAE and text encoder inside the step), epsilon
or v target per the family's schedule; gradients only for the trainable parameters; AdamW; EMA. Image-conditioned
families embed the clip's first frame (MagDiff: its subject, the first frame outside batch['mask'] black, also as
the HFA pyramid latents). With train.subject_loss_weight = w > 0 the squared error is a weighted mean, 1 + w on
the latent pixels that batch['frame_masks'] marks as subject (a shape anywhere in the VAE factor's block): small
subjects on a large, easy background get the model's capacity.

With train.frame_prior_path (I2V, first frame clean) the model learns the path that I2V-Adapter's Frame Similarity
Prior samples (config.sample's: keep_prob 1, from the timestep s of its start_step): the later frames' noise is
eps' = eps + sqrt(abar_s / (1 - abar_s)) * (z_0 - z_f) and t <= s, so x_s = sqrt(abar_s) z_0 + sqrt(1 - abar_s) eps
is exactly the sampler's start, and DDIM with an eps' predictor follows that path down to the later frames' data (as
for any coupling of data and noise on sqrt(abar_t) x + sqrt(1 - abar_t) n, the probability-flow ODE of the ideal
predictor keeps the path's marginals). Trained on plain noise, the model meets the prior's start off its training
distribution.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vdjax import flops, parallel
from vdjax.diffusion import frame_prior
from vdjax.models.subject import encode_pyramid
from vdjax.models.vae import Posterior
from vdjax.pipelines.magdiff import subject_pixels
from vdjax.train.state import TrainState, init_state, lr_schedule, make_optimizer, split_trainable

LOSS_WEIGHTINGS = ("epsilon", "v")  # train.loss_weighting: see Trainer.timestep_weights
REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass
class Trainer:
    """Holds the frozen parts and the compiled step; `state` is passed in and out (donated)."""
    config: Any
    unet: nnx.Module
    vae: nnx.Module
    text_encoder: nnx.Module
    mesh: jax.sharding.Mesh | None = None
    image_encoder: nnx.Module | None = None  # image-conditioned families: frozen, inside the step
    image_proj: nnx.Module | None = None

    def __post_init__(self):
        cfg = self.config
        from vdjax.pipelines.t2v import make_schedule  # the family's noise schedule

        schedule = make_schedule(cfg.schedule)
        self.alphas_cumprod = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
        self.graphdef, trainable, self.frozen = split_trainable(self.unet, cfg.train.trainable)
        self.vae_graph, self.vae_state = nnx.split(self.vae)
        self.text_graph, self.text_state = nnx.split(self.text_encoder)
        self.tx = make_optimizer(cfg.train)
        self.lr = lr_schedule(cfg.train)
        self._trainable_template = trainable
        # Timesteps are drawn from [0, max_timestep): for a sampler that never starts above some t (a Frame
        # Similarity Prior from a later step), training only where it samples. 0: the whole schedule.
        self.max_timestep = int(cfg.train.get("max_timestep", 0)) or len(self.alphas_cumprod)
        if not 0 < self.max_timestep <= len(self.alphas_cumprod):
            raise ValueError(f"train.max_timestep={cfg.train.max_timestep}; use 1 to {len(self.alphas_cumprod)} "
                             "(or 0 for the whole schedule)")
        self.frame_prior_timestep = self._frame_prior_start(schedule) if cfg.train.get("frame_prior_path") else 0
        if self.frame_prior_timestep:
            self.max_timestep = self.frame_prior_timestep + 1
        self.subject_loss_weight = float(cfg.train.get("subject_loss_weight", 0.0))
        self.loss_weighting = cfg.train.get("loss_weighting", "epsilon")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"train.loss_weighting={self.loss_weighting!r}; choose one of "
                             f"{', '.join(LOSS_WEIGHTINGS)} (epsilon: the plain squared error; v: that error / "
                             "alphas_cumprod[t], the v-prediction loss, which weighs the noisy timesteps that decide "
                             "layout and motion)")
        if self.loss_weighting == "v" and cfg.schedule.prediction_type != "epsilon":
            raise ValueError("train.loss_weighting='v' reweighs an epsilon model's loss; a "
                             f"{cfg.schedule.prediction_type} model's loss is already its own: use 'epsilon'")
        if self.subject_loss_weight < 0:
            raise ValueError(f"train.subject_loss_weight={self.subject_loss_weight}; use 0 (a plain mean) or more")
        if cfg.train.remat not in REMAT:
            raise ValueError(f"train.remat={cfg.train.remat!r}; choose one of {sorted(REMAT)}")
        self.mesh = self.mesh or parallel.make_mesh(dict(cfg.train.mesh))
        shardings = parallel.param_shardings(self.unet, self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def place(state):  # every parameter into the sharding its logical axes give
            flat = nnx.to_flat_state(state)
            for path, var in flat:
                var.set_value(jax.device_put(var.get_value(), shardings.get(path, replicated)))
            return nnx.from_flat_state(flat)
        self.frozen = place(self.frozen)
        self._trainable_template = place(trainable)
        self.vae_state = jax.device_put(self.vae_state, replicated)
        self.text_state = jax.device_put(self.text_state, replicated)
        self.image_graph, self.image_state = None, None
        if self.image_encoder is not None:  # one frozen module: encoder then projection
            self.image_graph, self.image_state = nnx.split(nnx.List([self.image_encoder, self.image_proj]))
            self.image_state = jax.device_put(self.image_state, replicated)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        self._replicated = replicated
        self._compiled = {}  # batch shapes -> the compiled step
        self.step_flops: float | None = None  # per device and step, from XLA's cost analysis
        self.compile_seconds = 0.0

    @property
    def trainable_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self._trainable_template))

    @property
    def frozen_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self.frozen, nnx.Param)))

    def init(self, seed: int) -> TrainState:
        """A fresh state, every leaf on the mesh (parameters and their moments as sharded, scalars replicated)."""
        on_mesh = lambda x: (x if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh
                             else jax.device_put(x, self._replicated))
        return jax.tree.map(on_mesh, init_state(self._trainable_template, self.tx, seed))

    def shard_batch(self, batch: dict) -> dict:
        """This host's rows of the global batch -> global arrays split over the mesh's data x fsdp devices."""
        size = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        n = len(batch["input_ids"]) * jax.process_count()
        if n % size:
            raise ValueError(f"global batch size {n} is not divisible by the mesh's data x fsdp = {size}; choose a "
                             f"multiple of {size}")
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        args = (state, self.frozen, self.vae_state, self.text_state, self.image_state, self.shard_batch(batch))
        shapes = tuple((k, v.shape) for k, v in sorted(args[-1].items()))
        if shapes not in self._compiled:  # compiled ahead of time once, so its FLOPs are known for the MFU estimate
            start = time.perf_counter()
            # The new state keeps the shardings of the one passed in (so the compiled step takes it back).
            state_shardings = jax.tree.map(lambda x: x.sharding, state)
            step = jax.jit(self._step_fn, donate_argnums=0, out_shardings=(state_shardings, self._replicated))
            with jax.set_mesh(self.mesh):  # the mesh as context: kernels that cannot be partitioned shard_map on it
                self._compiled[shapes] = step.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
            self.step_flops = flops.compiled_flops(self._compiled[shapes])
        return self._compiled[shapes](*args)

    def _image_tokens(self, image_state, first_frames):
        """The clip's first frame (B, H, W, 3) in [-1, 1] -> image tokens (I2V-Adapter's IP-Adapter, or
        VideoCrafter I2V's OpenCLIP + Resampler)."""
        from vdjax.models.clip import CLIP_MEAN, CLIP_STD

        from vdjax.models.openclip import videocrafter_preprocess

        encoder, proj = nnx.merge(self.image_graph, image_state)
        if self.config.get("image_encoder_kind") != "clip":  # VideoCrafter: OpenCLIP tokens -> Resampler
            return proj(encoder(videocrafter_preprocess(first_frames)))
        size = self.config.image_encoder.image_size
        x = jax.image.resize(first_frames, (first_frames.shape[0], size, size, 3), "bicubic", antialias=True)
        x = ((jnp.clip(x, -1, 1) + 1) / 2 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
        out = encoder(x)
        plus = "clip_extra_context_tokens" not in self.config.image_proj
        return proj(out.penultimate_hidden_state if plus else out.image_embeds)

    def _frame_prior_start(self, schedule) -> int:
        """train.frame_prior_path: the timestep that config.sample's Frame Similarity Prior starts from."""
        from vdjax.pipelines.t2v import sampling_timesteps

        cfg = self.config
        prior = cfg.sample.get("frame_prior")
        if not cfg.train.get("first_frame_clean", False) or prior is None or not prior.enabled:
            raise ValueError("train.frame_prior_path trains the path of the sampler's Frame Similarity Prior "
                             "(sample.frame_prior, I2V with train.first_frame_clean): this config has none; set "
                             "train.frame_prior_path=False")
        if prior.keep_prob != 1:
            raise ValueError(f"train.frame_prior_path: sample.frame_prior.keep_prob={prior.keep_prob}, but only the "
                             "undegraded prior's start lies on a path the model can learn; set it to 1")
        if cfg.train.get("max_timestep", 0):
            raise ValueError("train.frame_prior_path draws t up to the sampler's first timestep: leave "
                             "train.max_timestep at 0")
        return frame_prior.start_timestep(sampling_timesteps(cfg.schedule, schedule, cfg.sample.steps),
                                          prior.start_step)

    def draw_timesteps(self, key: jax.Array, batch: int) -> jax.Array:
        """Uniform training timesteps in [0, max_timestep)."""
        return jax.random.randint(key, (batch,), 0, self.max_timestep)

    def timestep_weights(self, t: jax.Array) -> jax.Array:
        """(B,) loss weights of timesteps t: 1 (epsilon), or 1 / alphas_cumprod[t] (v). An epsilon model's error
        on the clean latent is sqrt((1 - abar) / abar) times its noise error, so the plain loss hardly sees the
        noisy timesteps where a shape's place in the later frames is decided (at t = 640 of SD's schedule its
        noise error is a tenth of that at t = 50); the v-prediction loss, (noise error)^2 / abar, weighs them as a
        v-prediction model's training does, and the model still predicts the noise."""
        if self.loss_weighting == "v":
            return 1.0 / self.alphas_cumprod[t]
        return jnp.ones(t.shape, jnp.float32)

    def diffuse(self, z: jax.Array, noise: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Latents (B, F, h, w, C), standard normal noise and timesteps (B,) -> (the UNet's noisy input, its target).
        I2V (train.first_frame_clean): frame 0 enters clean; with train.frame_prior_path the noise is
        frame_prior.path_noise's (the module docstring says why)."""
        cfg = self.config
        if self.frame_prior_timestep:
            noise = frame_prior.path_noise(noise, z, self.alphas_cumprod[self.frame_prior_timestep])
        a = self.alphas_cumprod[t][:, None, None, None, None]
        noisy = jnp.sqrt(a) * z + jnp.sqrt(1 - a) * noise
        if cfg.train.get("first_frame_clean", False):  # I2V-Adapter: only the later frames are denoised
            noisy = noisy.at[:, 0].set(z[:, 0])
        if cfg.schedule.prediction_type == "v_prediction":
            return noisy, jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * z
        if cfg.schedule.prediction_type == "epsilon":
            return noisy, noise
        raise ValueError(f"training supports epsilon and v_prediction, not {cfg.schedule.prediction_type!r}")

    def _loss_weights(self, batch: dict, latent_shape) -> jax.Array | None:
        """(B, F, h, w, 1): 1 + subject_loss_weight where a block of the frame's subject mask has any subject."""
        if not self.subject_loss_weight:
            return None
        if "frame_masks" not in batch:
            raise ValueError("train.subject_loss_weight > 0 weighs the loss by the clips' subject masks: the batch "
                             "needs 'frame_masks' (B, F, H, W) — launch/train.py asks the data for them")
        masks = batch["frame_masks"]
        b, f, h, w = latent_shape[:4]
        factor = masks.shape[2] // h
        blocks = masks.reshape(b, f, h, factor, w, factor).max(axis=(3, 5))
        return (1.0 + self.subject_loss_weight * blocks)[..., None]

    def _step_fn(self, state, frozen, vae_state, text_state, image_state, batch):
        from vdjax.pipelines.t2v import encode_text
        cfg = self.config
        rng = jax.random.wrap_key_data(state.rng)
        rng, k_t, k_noise, k_z = jax.random.split(rng, 4)
        video = batch["video"]  # (B, F, H, W, 3) in [-1, 1]
        b, f = video.shape[:2]
        vae = nnx.merge(self.vae_graph, vae_state)
        moments = vae.quant_conv(vae.encoder(video.reshape(b * f, *video.shape[2:])))
        z = Posterior(moments).sample(k_z) * cfg.vae.scaling_factor
        z = jax.lax.stop_gradient(z.reshape(b, f, *z.shape[1:]))
        context = encode_text(nnx.merge(self.text_graph, text_state), batch["input_ids"])  # CLIP or OpenCLIP
        extras = {}
        if cfg.unet.subject.channels:  # MagDiff: the first frame's subject (SDA) as tokens (APA) and latents (HFA)
            if "mask" not in batch:
                raise ValueError("MagDiff trains on subject masks: the batch needs 'mask' (B, H, W) — moving_shapes "
                                 "and video_folder give them (launch/train.py asks for them)")
            first = subject_pixels(video[:, 0], batch["mask"])
            extras["subject"] = jax.lax.stop_gradient(
                encode_pyramid(vae, first, tuple(cfg.unet.subject.scales), cfg.vae.scaling_factor))
        else:
            first = video[:, 0]
        if image_state is not None:
            context = jnp.concatenate([context, self._image_tokens(image_state, first)], axis=1)
        context = jax.lax.stop_gradient(context)
        t = self.draw_timesteps(k_t, b)
        noisy, target = self.diffuse(z, jax.random.normal(k_noise, z.shape, jnp.float32), t)
        fps = jnp.int32(cfg.sample.fps) if cfg.unet.fps_conditioning else None  # the clips' frame rate
        weights = self._loss_weights(batch, z.shape)
        start = 1 if cfg.train.get("first_frame_clean", False) else 0  # a clean frame 0 is not denoised
        weights = None if weights is None else weights[:, start:]
        per_sample = self.timestep_weights(t)[:, None, None, None, None]

        def loss_fn(trainable):
            unet = nnx.merge(self.graphdef, trainable, frozen)
            pred = unet(noisy, t, context, fps=fps, remat=REMAT[cfg.train.remat], **extras)
            error = per_sample * jnp.square(pred[:, start:] - target[:, start:])
            if weights is None:
                return jnp.mean(error)
            return jnp.sum(weights * error) / (jnp.sum(weights) * error.shape[-1])

        loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        decay = cfg.train.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, trainable)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": self.lr(state.step)}
        new = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema,
                         rng=jax.random.key_data(rng))
        return new, metrics
