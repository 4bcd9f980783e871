"""MagDiff generation: text + a subject (image ∘ mask) -> video.

    pipe = MagDiffPipeline.from_converted("runs/magdiff/model")
    video = pipe(["a dog running on grass"], image=read_image("dog.png"), mask=read_mask("dog_mask.png")).frames

The subject image is the image fitted to the frame size (centred crop, resize) with everything outside the mask
black (Subject-Driven Alignment; no mask: the whole image). It conditions the UNet twice: its OpenCLIP tokens
through the Resampler feed the APA cross-attention, and its VAE latents at the HFA pyramid's scales are fused and
concatenated with the noisy latent. Both are in the guided and the unguided half (upstream guides on text only).
Editing (vdjax/pipelines/edit.py) runs this same pipeline from the inverted latents of a source video.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdjax.io.image import fit_image
from vdjax.models.openclip import videocrafter_preprocess
from vdjax.models.subject import encode_pyramid
from vdjax.pipelines.t2v import T2VPipeline

log = logging.getLogger(__name__)


def subject_pixels(images: jax.Array, masks: jax.Array) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] and (B, H, W) masks -> the subject images: black (-1) outside the mask."""
    return jnp.where(masks[..., None] > 0.5, images, -1.0)


def _subject_conditions(encoder, proj, vae, subject, scales, scaling):
    return proj(encoder(videocrafter_preprocess(subject))), encode_pyramid(vae, subject, scales, scaling)


class MagDiffPipeline(T2VPipeline):
    PARTS = T2VPipeline.PARTS + ("image_encoder", "image_proj")

    def __init__(self, config, unet, vae, text_encoder, image_encoder, image_proj, tokenizer_folder: str | None = None):
        u = config.unet
        if u.image_cross_attention != "magdiff_apa" or not u.subject.channels:
            raise ValueError(f"{config.get('variant', 'this config')}: MagDiff needs the APA cross-attention and the "
                             "subject input in the UNet (configs/magdiff.py)")
        super().__init__(config, unet, vae, text_encoder, tokenizer_folder)
        self.image_encoder, self.image_proj = image_encoder, image_proj
        self._subject = nnx.jit(_subject_conditions, static_argnums=(4, 5))

    def subject_conditions(self, subject: jax.Array) -> tuple[jax.Array, tuple]:
        """(B, H, W, 3) subject images in [-1, 1] -> (image tokens (B, 16, D), the HFA pyramid latents)."""
        return self._subject(self.image_encoder, self.image_proj, self.vae, jnp.asarray(subject, jnp.float32),
                             tuple(self.config.unet.subject.scales), float(self.config.vae.scaling_factor))

    def subject_images(self, image, mask, batch: int, height: int, width: int) -> np.ndarray:
        """The subject image per prompt, (B, H, W, 3) in [-1, 1]: `image` fitted, black outside the fitted `mask`."""
        from vdjax.io.mask import fit_mask

        if image is None:
            raise ValueError("MagDiff needs a subject image: pass image= (uint8 (H, W, 3), or one per prompt) and "
                             "mask= (the subject's mask); see vdjax.io.image.read_image, vdjax.io.mask.read_mask")
        images = [image] if isinstance(image, np.ndarray) and image.ndim <= 3 else list(image)
        masks = [mask] if mask is None or (isinstance(mask, np.ndarray) and mask.ndim <= 2) else list(mask)
        images, masks = images * batch if len(images) == 1 else images, masks * batch if len(masks) == 1 else masks
        if len(images) != batch or len(masks) != batch:
            raise ValueError(f"{len(images)} images and {len(masks)} masks for {batch} prompts; give one, or one per "
                             "prompt")
        fitted = np.stack([fit_image(im, height, width) for im in images])
        if all(m is None for m in masks):
            log.warning("no subject mask given: the whole image is the subject")
            return fitted
        fitted_masks = np.stack([np.ones((height, width), bool) if m is None else fit_mask(m, height, width)
                                 for m in masks])
        return np.asarray(subject_pixels(jnp.asarray(fitted), jnp.asarray(fitted_masks)))

    def prepare(self, key, shape, prompts, negative, latents, *, steps: int, image=None, mask=None, **conditions):
        if conditions:
            raise TypeError(f"unexpected conditions {', '.join(conditions)}; MagDiff takes image= and mask=")
        b, _, h, w, _ = shape
        f = self.vae.downsampling_factor
        subject = self.subject_images(image, mask, b, h * f, w * f)
        tokens, pyramid = self.subject_conditions(subject)
        context = jnp.concatenate([self.encode_prompts(prompts), tokens], axis=1)
        uncond = jnp.concatenate([self.encode_prompts(negative), tokens], axis=1)
        x_T = jax.random.normal(key, shape, jnp.float32) if latents is None else jnp.asarray(latents, jnp.float32)
        if x_T.shape != shape:
            raise ValueError(f"latents must have shape {shape}; got {x_T.shape}")
        return x_T, context, uncond, 0, {"subject": pyramid}
