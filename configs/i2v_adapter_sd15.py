"""I2V-Adapter on SD 1.5 + AnimateDiff v1 motion modules + IP-Adapter-Plus (KwaiVGI/I2V-Adapter), full size and tiny.

    --config=configs/i2v_adapter_sd15.py                 (variant=sd15; with --image=...)
    --config=configs/i2v_adapter_sd15.py:variant=tiny

The UNet is AnimateDiff v1's (motion modules at every level, no mid-block module, 24 positions, ResNet GroupNorm
over the clip: upstream's use_inflated_groupnorm=False), with I2V-Adapter's first-frame attention in every spatial
self-attention and IP-Adapter's decoupled cross-attention (the last 16 context tokens are image tokens, scale 1).
Image tokens: the CLIP ViT-H/14 image encoder's penultimate hidden states through IP-Adapter-Plus's Resampler.
Sampling as upstream's inference script: DDIM 25 steps (diffusers' DDIMScheduler defaults: leading spacing,
set_alpha_to_one, clip_sample), guidance 7.5, eta 0, the Frame Similarity Prior on, LAB colour matching after.
"""
import importlib.util
import pathlib

import ml_collections

from vdjax.models import clip, resampler


def animatediff_config(arg: str) -> ml_collections.ConfigDict:
    """The AnimateDiff config next to this file (configs/ is not a package: absl loads configs by path)."""
    path = pathlib.Path(__file__).with_name("animatediff_sd15.py")
    spec = importlib.util.spec_from_file_location("animatediff_sd15", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)

VARIANTS = ("sd15", "tiny")


def get_config(arg: str = "variant=sd15") -> ml_collections.ConfigDict:
    args = dict(part.rpartition("=")[::2] for part in filter(None, (arg or "").split(",")))
    variant = args.get("variant", args.get("", "sd15"))
    if variant not in VARIANTS:
        raise ValueError(f"unknown I2V-Adapter variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    tiny = variant == "tiny"
    config = animatediff_config("variant=tiny_v1" if tiny else "variant=v1")  # original GroupNorm placement
    config.family = "i2v_adapter"
    config.variant = variant
    config.unet.update(first_frame_attention=True, image_cross_attention="ip_adapter", image_context_tokens=16,
                       image_attention_scale=1.0)
    config.image_encoder_kind = "clip"  # transformers' CLIPVisionModelWithProjection layout (IP-Adapter's encoder)
    config.image_encoder = clip.vision_config("tiny" if tiny else "vit_h14")
    config.image_proj = resampler.resampler_config(
        "tiny" if tiny else "ip_adapter_plus_sd15",
        **(dict(num_queries=16, embedding_dim=config.image_encoder.hidden_size,
                output_dim=config.unet.cross_attention_dim) if tiny else {}))
    config.image_proj.kind = "resampler"  # IP-Adapter-Plus (16 tokens); 'image_proj_model' for the plain one
    config.schedule.update(steps_offset=0, clip_sample=True)  # DDIMScheduler(beta_*) with its defaults
    config.sample.update(steps=25, guidance_scale=7.5, eta=0.0, num_frames=16, height=512, width=512, seed=42,
                         negative_prompt="worst quality, low quality, normal quality, lowres, bad anatomy, "
                                         "bad hands, watermark, moles")
    # Frame Similarity Prior: later frames start from the first frame's latent, degraded (keep each element with
    # probability keep_prob, else take its Gaussian blur (kernel, sigma), in latent space) and noised to the
    # timestep of step `start_step` of the schedule (0: the first, as the released code).
    config.sample.frame_prior = ml_collections.ConfigDict(dict(enabled=True, keep_prob=0.5, blur_kernel=9,
                                                               blur_sigma=18.0, start_step=0))
    config.sample.color_match = True  # LAB a/b histograms of every frame matched to frame 0 (upstream's post-step)
    if tiny:
        config.sample.update(steps=4, num_frames=4, height=32, width=32)
    # Training: the first-frame attention's new projections only (the paper's ~24M on SD 1.5).
    config.train.update(trainable=(r"attn1\.to_q_ff", r"attn1\.to_out_ff"), first_frame_clean=True)
    return config
