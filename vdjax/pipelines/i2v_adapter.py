"""Image-to-video with I2V-Adapter (KwaiVGI/I2V-Adapter) on a frozen SD 1.5 + AnimateDiff model.

    pipe = I2VAdapterPipeline.from_files(get_config(), model="sd15.safetensors", motion_module=..., i2v_module=...,
                                         ip_adapter="ip-adapter-plus_sd15.bin", image_encoder="image_encoder/")
    video = pipe(["a girl hugging a cat"], image=read_image("girl.png")).frames

The input image, fitted to the frame size, is VAE-encoded and sits at frame 0 as a clean latent through the whole
loop (the UNet sees it at every step with the same timestep; the sampler never updates it); every spatial
self-attention also attends to it (first-frame attention). The IP-Adapter turns the image into tokens appended
to the text tokens (CLIP ViT-H/14 penultimate states -> Resampler for IP-Adapter-Plus; image embeds ->
ImageProjModel for the plain one). The later frames start from the Frame Similarity Prior, and the decoded frames'
colours can be matched to the first frame's (config.sample.frame_prior, config.sample.color_match).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdjax.diffusion import frame_prior
from vdjax.io.image import as_rgb, fit_image
from vdjax.models.clip import clip_preprocess
from vdjax.models.imaging import match_colors
from vdjax.pipelines.t2v import T2VPipeline


def _image_tokens(encoder, proj, pixels, plus: bool):
    out = encoder(pixels)
    return proj(out.penultimate_hidden_state if plus else out.image_embeds)


def _encode_first(vae, images, key, scaling):
    return vae.encode(images).sample(key) * scaling


class I2VAdapterPipeline(T2VPipeline):
    PARTS = T2VPipeline.PARTS + ("image_encoder", "image_proj")

    def __init__(self, config, unet, vae, text_encoder, image_encoder, image_proj, tokenizer_folder: str | None = None):
        u = config.unet
        if not u.first_frame_attention or u.image_cross_attention != "ip_adapter":
            raise ValueError(f"{config.get('variant', 'this config')}: I2V-Adapter needs first_frame_attention and "
                             "image_cross_attention='ip_adapter' in the UNet (configs/i2v_adapter_sd15.py)")
        super().__init__(config, unet, vae, text_encoder, tokenizer_folder)
        self.image_encoder, self.image_proj = image_encoder, image_proj
        self.plus = "clip_extra_context_tokens" not in config.image_proj  # Resampler over hidden states
        self._embed_image = nnx.jit(_image_tokens, static_argnums=3)
        self._encode_first = nnx.jit(_encode_first, static_argnums=3)

    def image_tokens(self, pixels: jax.Array) -> jax.Array:
        """(B, 224, 224, 3) CLIP-normalised pixels -> (B, image tokens, context_dim)."""
        return self._embed_image(self.image_encoder, self.image_proj, jnp.asarray(pixels, jnp.float32), self.plus)

    def prepare(self, key, shape, prompts, negative, latents, *, steps: int, image=None, **conditions):
        if image is None:
            raise ValueError("I2V-Adapter needs the first frame: pass image= (uint8 (H, W, 3), or one per prompt); "
                             "see vdjax.io.image.read_image")
        if conditions:
            raise TypeError(f"unexpected conditions {', '.join(conditions)}")
        if latents is not None:
            raise ValueError("I2V-Adapter builds its own starting latents from the image (frame prior)")
        b, frames, h, w, _ = shape
        f = self.vae.downsampling_factor
        images = [image] if isinstance(image, np.ndarray) and image.ndim <= 3 else list(image)
        images = images * b if len(images) == 1 else images
        if len(images) != b:
            raise ValueError(f"{len(images)} images for {b} prompts; give one image, or one per prompt")
        fitted = np.stack([fit_image(im, h * f, w * f) for im in images])
        # The encoder sees the image as CLIPImageProcessor gives it (shorter side resized, centre crop), as upstream.
        pixels = jnp.stack([clip_preprocess(as_rgb(im), self.config.image_encoder.image_size) for im in images])
        tokens = self.image_tokens(pixels)
        # Upstream's unconditional image tokens: IP-Adapter-Plus runs the encoder on an all-zeros normalised
        # input; the plain IP-Adapter projects all-zeros image embeds.
        if self.plus:
            blank = self.image_tokens(jnp.zeros_like(pixels[:1]))
        else:
            blank = self.image_proj(jnp.zeros((1, self.config.image_encoder.projection_dim), jnp.float32))
        context = jnp.concatenate([self.encode_prompts(prompts), tokens], axis=1)
        uncond = jnp.concatenate([self.encode_prompts(negative), jnp.broadcast_to(blank, tokens.shape)], axis=1)
        k_vae, k_prior = jax.random.split(key)
        first = self._encode_first(self.vae, jnp.asarray(fitted), k_vae, float(self.config.vae.scaling_factor))
        prior = self.config.sample.frame_prior
        t0 = frame_prior.start_timestep(self.timesteps(steps), prior.start_step)
        x_T = frame_prior.initial_latents(k_prior, first, frames, self.schedule, t0,
                                          enabled=prior.enabled, keep_prob=prior.keep_prob,
                                          kernel=prior.blur_kernel, sigma=prior.blur_sigma)
        return x_T, context, uncond, int(prior.start_step) if prior.enabled else 0, {}

    def postprocess(self, frames: np.ndarray) -> np.ndarray:
        if not self.config.sample.get("color_match", False):
            return frames
        return np.stack([np.concatenate([v[:1], match_colors(v[1:], v[0])]) for v in frames])
