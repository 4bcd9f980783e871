"""Image-to-video, VideoCrafter1's way: the image's OpenCLIP ViT-H tokens (all 257 of the last block) through the
Resampler become 16 image tokens appended to the 77 text tokens, which the UNet's decoupled cross-attention reads.

    pipe = I2VPipeline.from_files(get_config("variant=i2v_512_v1"), model="i2v_512_v1/model.ckpt")
    video = pipe(["a cat walking"], image=read_image("cat.png")).frames      # uint8 (B, F, 320, 512, 3)

The image is fitted to the frame size (centred crop to the aspect ratio, resize), then embedded as upstream does
(kornia's antialiased bicubic to 224, CLIP normalisation). The unconditional context pairs the negative prompt
with the image tokens of an all-zeros image, as VideoCrafter's sampler builds it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdjax.io.image import fit_image
from vdjax.models.openclip import videocrafter_preprocess
from vdjax.pipelines.t2v import T2VPipeline


def _image_tokens(encoder, proj, images):
    return proj(encoder(videocrafter_preprocess(images)))


class I2VPipeline(T2VPipeline):
    PARTS = T2VPipeline.PARTS + ("image_encoder", "image_proj")

    def __init__(self, config, unet, vae, text_encoder, image_encoder, image_proj, tokenizer_folder: str | None = None):
        if config.unet.image_cross_attention != "lvdm_dual":
            raise ValueError(f"{config.get('variant', 'this config')}: the UNet has no image cross-attention; use an "
                             "image-to-video config (e.g. configs/videocrafter.py:variant=i2v_512_v1)")
        super().__init__(config, unet, vae, text_encoder, tokenizer_folder)
        self.image_encoder, self.image_proj = image_encoder, image_proj
        self._embed_image = nnx.jit(_image_tokens)

    def image_tokens(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) float in [-1, 1] -> (B, num_queries, context_dim) image tokens."""
        return self._embed_image(self.image_encoder, self.image_proj, jnp.asarray(images, jnp.float32))

    def conditioning(self, prompts, negative, *, height, width, image=None, **conditions):
        if image is None:
            raise ValueError("image-to-video needs an input image: pass image= (uint8 (H, W, 3), or one per prompt); "
                             "see vdjax.io.image.read_image")
        text, uncond_text = super().conditioning(prompts, negative, height=height, width=width, **conditions)
        # One image (H, W[, C]) for every prompt, or a list / (B, H, W, C) array of one per prompt.
        images = [image] if isinstance(image, np.ndarray) and image.ndim <= 3 else list(image)
        if len(images) == 1:
            images = images * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts; give one image, or one per prompt")
        fitted = np.stack([fit_image(im, height, width) for im in images])
        tokens = self.image_tokens(fitted)
        blank = self.image_tokens(jnp.zeros((1, 224, 224, 3)))  # upstream's unconditional image: all zeros
        return (jnp.concatenate([text, tokens], axis=1),
                jnp.concatenate([uncond_text, jnp.broadcast_to(blank, tokens.shape)], axis=1))
