"""SD 1.5 + AnimateDiff motion modules (v1, v2, v3), full size and tiny.

    --config=configs/animatediff_sd15.py:variant=v2
    --config=configs/animatediff_sd15.py:variant=tiny_v1,norms=diffusers

Variants: v1, v2, v3 (the released motion modules on SD 1.5), sd15 (the image UNet alone), and
tiny_v1, tiny_v2, tiny_v3, tiny_sd15 (small models for tests and demos).

`norms` picks where GroupNorm statistics are taken. `original` (default) is the AnimateDiff code the
motion modules were trained with: per frame in the motion modules, and in v1 over the whole clip in
the UNet's ResNets. `diffusers` is what diffusers' `UNetMotionModel` computes: per frame in the
ResNets, over the whole clip in the motion modules.
"""
import ml_collections

from vdjax.models import clip, vae
from vdjax.models.unet3d import base_config

# What distinguishes the released motion modules (AnimateDiff configs/inference/inference-v*.yaml).
_MOTION = {
    "v1": dict(max_positions=24, mid_block=False),
    "v2": dict(max_positions=32, mid_block=True),
    "v3": dict(max_positions=32, mid_block=False),
}
_TINY = dict(block_out_channels=(32, 64), attention_levels=(True, False), num_attention_heads=(2, 2),
             layers_per_block=1, cross_attention_dim=32, norm_num_groups=8)


def _parse(arg: str) -> dict:
    out = {}
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.rpartition("=")
        out[key or "variant"] = value
    return out


def unet_config(variant: str, norms: str = "original") -> ml_collections.ConfigDict:
    unet = base_config()
    name = variant
    if variant.startswith("tiny_"):
        unet.update(_TINY)
        unet.motion.num_attention_heads = 2
        name = variant[len("tiny_"):]
    if name not in (*_MOTION, "sd15"):
        raise ValueError(f"unknown variant {variant!r}; choose one of v1, v2, v3, sd15, or tiny_ before any of them")
    if norms not in ("original", "diffusers"):
        raise ValueError(f"norms={norms!r}; choose 'original' (AnimateDiff's code) or 'diffusers'")
    if name == "sd15":
        return unet
    unet.motion.update(kind="animatediff", **_MOTION[name])
    if norms == "diffusers":
        unet.motion.norm_scope = "clip"
    elif name == "v1":
        unet.resnet_norm_scope = "clip"  # v1 ran without AnimateDiff's per-frame ("inflated") GroupNorm
    return unet


def get_config(arg: str = "variant=v2") -> ml_collections.ConfigDict:
    args = _parse(arg)
    config = ml_collections.ConfigDict()
    config.family = "animatediff"
    config.variant = args.get("variant", "v2")
    config.unet = unet_config(config.variant, args.get("norms", "original"))
    tiny = config.variant.startswith("tiny_")
    config.vae = vae.tiny_config() if tiny else vae.base_config()
    config.text_encoder = clip.text_config("tiny" if tiny else "vit_l14")
    if tiny:  # CLIP's real tokenizer and 77 tokens, so tiny models run through the same pipeline
        config.text_encoder.update(vocab_size=49408, max_position_embeddings=77)
    # AnimateDiff's inference configs: diffusers' DDIMScheduler with these settings.
    config.schedule = ml_collections.ConfigDict(dict(
        beta_schedule="linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True,
        rescale_betas_zero_snr=False))
    config.sample = ml_collections.ConfigDict(dict(
        steps=25, guidance_scale=7.5, guidance_rescale=0.0, eta=0.0, negative_prompt="",
        num_frames=16, height=512, width=512, fps=8, clip_skip=0, vae_chunk_size=4, seed=0))
    if tiny:
        config.sample.update(steps=10, num_frames=8, height=32, width=32)
    # Training: the motion modules on a frozen SD 1.5 (AnimateDiff's recipe), through vdjax's one trainer.
    config.train = ml_collections.ConfigDict(dict(
        trainable=("motion_modules",), learning_rate=1e-4, schedule="constant", warmup_steps=100,
        num_steps=100_000, batch_size=8, grad_clip=1.0, adam_b1=0.9, adam_b2=0.999, weight_decay=1e-2,
        grad_accum_steps=1, ema_decay=0.9999, remat="none", seed=0, log_every=10, checkpoint_every=1000,
        keep_checkpoints=3, caption_dropout=0.1, mesh=dict(data=-1, fsdp=1, tensor=1),
        max_timestep=0,  # train on timesteps below this one only (0: all of them)
        frame_prior_path=False,  # I2V: train the path that config.sample's Frame Similarity Prior samples
        subject_loss_weight=0.0,  # > 0: the loss weighs latent blocks with a subject (frame masks) 1 + this
        loss_weighting="epsilon",  # or 'v': the squared error / alphas_cumprod[t] (Trainer.timestep_weights)
        # A sample video (EMA weights, config.sample's settings) every this many steps; 0: never.
        sample_every=5000, sample_prompt="a red circle and a blue square moving right"))
    # source: 'moving_shapes' (made on the fly) | 'video_folder' (folder) | 'tfds' (tfds_dir, a prepared dataset)
    config.data = ml_collections.ConfigDict(dict(source="moving_shapes", folder="", tfds_dir="", num_examples=10_000,
                                                 num_frames=16, size=256, frame_stride=1))
    if tiny:
        config.train.update(batch_size=2, warmup_steps=5, num_steps=200, ema_decay=0.99, log_every=5,
                            checkpoint_every=20, learning_rate=1e-3, sample_every=0)
        config.data.update(num_examples=64, num_frames=8, size=32)
    return config
