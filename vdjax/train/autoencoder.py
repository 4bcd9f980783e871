"""Training the VAE alone (`config.train.objective = 'autoencoder'`): the first stage of a model trained from scratch.

A family's pretrained VAE is normally loaded and frozen; a small model trained here from nothing (configs/demo.py)
needs its own. The loss is the per-pixel mean squared reconstruction error of the batch's frames (every frame of
every clip, decoded from a posterior sample) plus `train.kl_weight` times the KL divergence of the posterior from
N(0, I), averaged per latent element. The step has the trainer's contract (`init`, `step`, `graphdef`/`frozen`,
`compile_seconds`, `step_flops`), so `vdjax.train.loop.train` runs, logs, checkpoints and resumes it unchanged.
Only the parameters that `train.trainable` matches train: the decoder alone keeps the latent space (as Stability's
fine-tuned SD VAE decoders did), so a decoder can be improved under a trained diffusion model.
Besides the loss it logs `latent_std` (the standard deviation of the posterior means): the UNet stage's
`vae.scaling_factor` is its inverse, so that the diffusion model sees latents of unit scale.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vdjax import flops, parallel
from vdjax.models.vae import Posterior
from vdjax.train.state import TrainState, init_state, lr_schedule, make_optimizer, split_trainable


class AutoencoderTrainer:
    """The VAE's jitted, donated step; `nnx.merge(graphdef, state.ema, frozen)` is the trained VAE."""

    def __init__(self, config: Any, vae: nnx.Module, mesh: jax.sharding.Mesh | None = None):
        self.config, self.vae = config, vae
        # train.trainable: '.*' (the whole VAE, from scratch), or e.g. ('decoder', 'post_quant_conv'): a decoder
        # fine-tuned on a frozen encoder, so the latents, and a diffusion model trained on them, stay valid.
        self.graphdef, trainable, self.frozen = split_trainable(vae, tuple(config.train.get("trainable", (".*",))))
        self.tx = make_optimizer(config.train)
        self.lr = lr_schedule(config.train)
        self.mesh = mesh or parallel.make_mesh(dict(config.train.mesh))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())  # a small model: a copy on every device
        self._trainable = jax.device_put(trainable, self._replicated)
        self.frozen = jax.device_put(self.frozen, self._replicated)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        self._compiled = {}
        self.step_flops: float | None = None
        self.compile_seconds = 0.0

    @property
    def trainable_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self._trainable))

    @property
    def frozen_count(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.frozen))

    def init(self, seed: int) -> TrainState:
        return jax.device_put(init_state(self._trainable, self.tx, seed), self._replicated)

    def model(self, state: TrainState) -> nnx.Module:
        """The VAE with the state's EMA weights."""
        return nnx.merge(self.graphdef, state.ema, self.frozen)

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        size = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        video = batch["video"]
        if len(video) * jax.process_count() % size:
            raise ValueError(f"global batch size {len(video) * jax.process_count()} is not divisible by the mesh's "
                             f"data x fsdp = {size}; choose a multiple of {size}")
        video = jax.make_array_from_process_local_data(self.batch_sharding, video)
        if video.shape not in self._compiled:
            start = time.perf_counter()
            step = jax.jit(self._step_fn, donate_argnums=0,
                           out_shardings=(jax.tree.map(lambda x: x.sharding, state), self._replicated))
            self._compiled[video.shape] = step.lower(state, self.frozen, video).compile()
            self.compile_seconds += time.perf_counter() - start
            self.step_flops = flops.compiled_flops(self._compiled[video.shape])
        return self._compiled[video.shape](state, self.frozen, video)

    def _step_fn(self, state: TrainState, frozen, video):
        cfg = self.config.train
        rng = jax.random.wrap_key_data(state.rng)
        rng, key = jax.random.split(rng)
        frames = video.reshape(-1, *video.shape[2:])  # (B*F, H, W, 3) in [-1, 1]

        def loss_fn(trainable):
            vae = nnx.merge(self.graphdef, trainable, frozen)
            posterior = Posterior(vae.quant_conv(vae.encoder(frames)))
            recon = vae.decode(posterior.sample(key))
            mse = jnp.mean(jnp.square(recon - frames))
            kl = 0.5 * jnp.mean(jnp.square(posterior.mean) + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar)
            return mse + cfg.kl_weight * kl, (mse, kl, jnp.std(posterior.mean))

        (loss, (mse, kl, latent_std)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, state.ema, trainable)
        metrics = {"loss": loss, "mse": mse, "psnr": 10 * jnp.log10(4.0 / mse), "kl": kl, "latent_std": latent_std,
                   "grad_norm": optax.tree.norm(grads), "lr": self.lr(state.step)}
        return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema,
                          rng=jax.random.key_data(rng)), metrics
