"""MagDiff: subject-driven video generation and editing in one model (SDA, APA, HFA), full size and tiny.

    --config=configs/magdiff.py                        (variant=sd21: 16 x 320 x 512, OpenCLIP ViT-H)
    --config=configs/magdiff.py:variant=tiny           (test size)
    --config=configs/magdiff.py:variant=tiny,hfa=single
    --config=configs/magdiff.py:temporal=videoassembler  (the released code's UNet layout; also with variant=tiny)

No MagDiff weights are published: the model is trained with vdjax (launch/train.py), starting from VideoCrafter's
SD 2.1-base UNet with LVDM temporal layers (--checkpoint of a converted VideoCrafter I2V 512 model, or random init):
- Subject-Driven Alignment: the condition is the subject (image ∘ mask) — the first frame's mask in training
  (moving_shapes' subject masks, a video_folder mask column), a mask file when sampling or editing. Its tokens:
  OpenCLIP ViT-H's image tower (all 257 tokens) through the Resampler (16 tokens), as VideoCrafter I2V.
- Adaptive Prompts Alignment: cross-attention with a shared query, text and subject-image key/value, and learnable
  weights alpha1 (text) and alpha2 (image), starting at the released code's 1.0 and 1.5 (unet.apa_scales).
- High-Fidelity Alignment: the subject image at `hfa` scales — 'pyramid' (1, 1/2, 1/4: the paper's) or 'single'
  (the released code's full size only) — VAE-encoded without noise, fused by a 3x3 conv, concatenated with the noisy
  latent (conv_in widened by 4 zero-initialised channels).
The UNet's temporal layers: `temporal=lvdm` (VideoCrafter's temporal transformers, init_attn and fps conditioning,
the weights it starts from) or `temporal=videoassembler` (the released code's: a temporal self-attention inside
every spatial transformer block with a sinusoid over the frames, temporal convs, GroupNorm over the clip in the
resnets; vdjax.convert.magdiff.videoassembler_unet). Both convert from the same VideoCrafter file.
Training as the released code: zero-terminal-SNR DDPM with epsilon prediction, text dropped with probability 0.15,
the temporal layers, spatial self-attention, APA and conv_in (+ the fusion conv) trainable. Sampling uses the same
schedule with DDIM (leading spacing, so the first step is not the zero-SNR step that epsilon cannot take); guidance
applies to the text only (the subject tokens and latent are in both halves, as upstream). Editing inverts the
source video over the last 0.8 of the schedule (sample.edit_strength; see vdjax/pipelines/edit.py) and blends the
region outside the subject mask back onto the inversion (sample.edit_blend).
"""
import ml_collections

from vdjax.convert.magdiff import videoassembler_unet
from vdjax.convert.videocrafter import RELEASES, unet_config
from vdjax.models import openclip, resampler, vae

VARIANTS = ("sd21", "tiny")
HFA = {"pyramid": (1.0, 0.5, 0.25), "single": (1.0,)}
# VideoCrafter I2V 512's UNet (SD 2.1-base + LVDM temporal layers + the image cross-attention APA builds on).
_BASE = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
             channel_mult=[1, 2, 4, 4], num_head_channels=64, transformer_depth=1, context_dim=1024, use_linear=True,
             temporal_attention=True, temporal_selfatt_only=True, use_causal_attention=False, temporal_length=16,
             addition_attention=True, **RELEASES["i2v_512_v1"])
_TINY = dict(model_channels=32, attention_resolutions=[1], num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8,
             context_dim=32)
TRAINABLE = (r"motion_modules", r"init_attention", r"temporal_convs",  # temporal layers
             r"attentions\.\d+\.transformer_blocks\.\d+\.attn1\.",  # spatial self-attention
             r"attn2\.(to_k_ip|to_v_ip|text_cross_attention_scale|image_cross_attention_scale)",  # APA
             r"^conv_in\.", r"^subject_fusion\.")  # HFA
TEMPORAL = ("lvdm", "videoassembler")
# The released code's trainable_modules ("temp_", "transformer_blocks\.\d+", "conv_in"): the temporal layers,
# every parameter of the spatial transformer blocks, conv_in (+ the fusion conv).
TRAINABLE_VIDEOASSEMBLER = (r"temporal_convs", r"transformer_blocks\.\d+\.", r"^conv_in\.", r"^subject_fusion\.")


def get_config(arg: str = "variant=sd21") -> ml_collections.ConfigDict:
    args = dict(part.rpartition("=")[::2] for part in filter(None, (arg or "").split(",")))
    variant = args.get("variant", args.get("", "sd21"))
    if variant not in VARIANTS:
        raise ValueError(f"unknown MagDiff variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    hfa = args.get("hfa", "pyramid")
    if hfa not in HFA:
        raise ValueError(f"hfa={hfa!r}; choose 'pyramid' (the paper's three scales) or 'single' (the released code's)")
    temporal = args.get("temporal", "lvdm")
    if temporal not in TEMPORAL:
        raise ValueError(f"temporal={temporal!r}; choose one of {', '.join(TEMPORAL)}")
    tiny = variant == "tiny"
    config = ml_collections.ConfigDict()
    config.family = "magdiff"
    config.variant = variant
    config.unet = unet_config({**_BASE, **(_TINY if tiny else {})})
    config.unet.update(image_cross_attention="magdiff_apa", apa_scales=(1.0, 1.5))
    config.unet.subject.update(channels=4, scales=HFA[hfa])
    if temporal == "videoassembler":
        config.unet = videoassembler_unet(config.unet)
    config.vae = vae.tiny_config() if tiny else vae.base_config()
    config.text_encoder_kind = "openclip"
    config.text_encoder = openclip.text_config("tiny" if tiny else "vit_h14")
    config.image_encoder = openclip.vision_config("tiny" if tiny else "vit_h14")
    config.image_proj = resampler.resampler_config(
        "tiny" if tiny else "videocrafter_i2v",
        **(dict(embedding_dim=config.image_encoder.width, output_dim=32) if tiny else {}))
    config.schedule = ml_collections.ConfigDict(dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
        prediction_type="epsilon", rescale_betas_zero_snr=True, timestep_spacing="leading", steps_offset=1,
        set_alpha_to_one=False, clip_sample=False))
    config.sample = ml_collections.ConfigDict(dict(
        steps=50, guidance_scale=7.5, guidance_rescale=0.0, eta=0.0, negative_prompt="watermark", num_frames=16,
        height=320, width=512, fps=8, save_fps=8, clip_skip=0, vae_chunk_size=1, seed=42,
        edit_blend=True, edit_strength=0.8, loop_short_video=False))
    config.train = ml_collections.ConfigDict(dict(
        trainable=TRAINABLE, learning_rate=1e-5, schedule="cosine", warmup_steps=100, num_steps=100_000,
        batch_size=8, grad_clip=1.0, adam_b1=0.9, adam_b2=0.999, weight_decay=1e-2, grad_accum_steps=1,
        ema_decay=0.9999, remat="full", seed=0, log_every=10, checkpoint_every=1000, keep_checkpoints=3,
        caption_dropout=0.15, mesh=dict(data=-1, fsdp=1, tensor=1), sample_every=0,
        subject_loss_weight=0.0, loss_weighting="epsilon", sample_prompt="a red circle and a blue square moving right"))
    if temporal == "videoassembler":
        config.train.trainable = TRAINABLE_VIDEOASSEMBLER
    config.data = ml_collections.ConfigDict(dict(source="moving_shapes", folder="", tfds_dir="", num_examples=10_000,
                                                 num_frames=16, size=256, frame_stride=1))
    if tiny:
        config.sample.update(steps=4, num_frames=4, height=32, width=32)
        config.train.update(learning_rate=1e-3, warmup_steps=10, num_steps=300, batch_size=4, ema_decay=0.99,
                            remat="none", log_every=25, checkpoint_every=100)
        config.data.update(num_examples=256, num_frames=4, size=32)
    return config
