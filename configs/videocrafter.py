"""VideoCrafter1 (T2V 1024x576 and 512x320, I2V 512x320) and VideoCrafter2 (T2V 512x320), full size and tiny.

    --config=configs/videocrafter.py:variant=t2v_512_v2
    --config=configs/videocrafter.py:variant=i2v_512_v1      (with --image=...)
    --config=configs/videocrafter.py:variant=tiny_i2v_512_v1

Every size and flag is the released config's (AILab-CVC/VideoCrafter configs/inference_*.yaml); sampling
defaults are its run scripts' (DDIM 50 steps, eta 1.0, guidance 12; fps 28 for T2V, 8 for I2V). `tiny_*`
variants keep every flag at test sizes.
"""
import ml_collections

from vdjax.convert.videocrafter import RELEASES, unet_config
from vdjax.models import openclip, resampler, vae

# unet_config.params of each released yaml: what differs between them (RELEASES), then the rest.
_COMMON = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
               channel_mult=[1, 2, 4, 4], num_head_channels=64, transformer_depth=1, context_dim=1024,
               use_linear=True, temporal_attention=True, temporal_selfatt_only=True, use_causal_attention=False,
               temporal_length=16, addition_attention=True)
_TINY = dict(model_channels=32, attention_resolutions=[1], num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8,
             context_dim=32)
# LatentDiffusion's latent scaling per timestep (use_scale, scale_b, fix_scale_bug) in each yaml.
_SCALE = {
    "t2v_1024_v1": dict(use_scale=True, scale_b=0.3, fix_scale_bug=True),
    "t2v_512_v1": dict(use_scale=False, scale_b=0.3, fix_scale_bug=False),
    "i2v_512_v1": dict(use_scale=True, scale_b=0.7, fix_scale_bug=False),
    "t2v_512_v2": dict(use_scale=True, scale_b=0.7, fix_scale_bug=False),
}
VARIANTS = tuple(RELEASES) + tuple("tiny_" + v for v in RELEASES)


def get_config(arg: str = "variant=t2v_512_v2") -> ml_collections.ConfigDict:
    args = dict(part.rpartition("=")[::2] for part in filter(None, (arg or "").split(",")))
    variant = args.get("variant", args.get("", "t2v_512_v2"))
    if variant not in VARIANTS:
        raise ValueError(f"unknown VideoCrafter variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    tiny = variant.startswith("tiny_")
    name = variant[len("tiny_"):] if tiny else variant
    i2v = name.startswith("i2v")
    config = ml_collections.ConfigDict()
    config.family = "videocrafter"
    config.variant = variant
    config.unet = unet_config({**_COMMON, **RELEASES[name], **(_TINY if tiny else {})})
    config.vae = vae.tiny_config() if tiny else vae.base_config()
    config.text_encoder_kind = "openclip"  # FrozenOpenCLIPEmbedder, layer 'penultimate'
    config.text_encoder = openclip.text_config("tiny" if tiny else "vit_h14")
    if i2v:  # FrozenOpenCLIPImageEmbedderV2 (all 257 tokens of the last block) -> Resampler -> 16 image tokens
        config.image_encoder = openclip.vision_config("tiny" if tiny else "vit_h14")
        config.image_proj = resampler.resampler_config(
            "tiny" if tiny else "videocrafter_i2v",
            **(dict(embedding_dim=config.image_encoder.width, output_dim=32) if tiny else {}))
    config.schedule = ml_collections.ConfigDict(dict(
        beta_schedule="scaled_linear",  # LDM's 'linear': linspace over sqrt(beta), squared
        beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, prediction_type="epsilon",
        timestep_spacing="videocrafter", steps_offset=0, set_alpha_to_one=False, rescale_betas_zero_snr=False,
        **_SCALE[name]))
    height, width = (576, 1024) if name == "t2v_1024_v1" else (320, 512)
    config.sample = ml_collections.ConfigDict(dict(
        steps=50, guidance_scale=12.0, guidance_rescale=0.0, eta=1.0, negative_prompt="", num_frames=16,
        height=height, width=width, fps=8 if i2v else 28, save_fps=10, clip_skip=0, vae_chunk_size=1, seed=123))
    if tiny:
        config.sample.update(steps=4, num_frames=4, height=32, width=48)
    config.train = ml_collections.ConfigDict(dict(
        trainable=("motion_modules", "init_attention", "temporal_convs"), learning_rate=6e-6, schedule="constant",
        warmup_steps=100, num_steps=100_000, batch_size=8, grad_clip=1.0, adam_b1=0.9, adam_b2=0.999,
        weight_decay=1e-2, grad_accum_steps=1, ema_decay=0.9999, remat="full", seed=0, log_every=10,
        checkpoint_every=1000, keep_checkpoints=3, caption_dropout=0.1, mesh=dict(data=-1, fsdp=1, tensor=1),
        subject_loss_weight=0.0, loss_weighting="epsilon", sample_every=0,
        sample_prompt="a red circle and a blue square moving right"))
    config.data = ml_collections.ConfigDict(dict(source="moving_shapes", folder="", tfds_dir="", num_examples=10_000,
                                                 num_frames=16, size=256, frame_stride=1))
    return config
