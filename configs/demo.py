"""The demo model: a small I2V-Adapter-style image-to-video model trained from scratch on moving_shapes, shipped in
assets/demo/model (runs offline on a CPU in well under a minute).

    python launch/sample.py --config=configs/demo.py                       (the bundled frame, its caption)
    python launch/sample.py --config=configs/demo.py --image=my_frame.png --prompt="a red square moving right"

What it is (the choices, and why):
- I2V-Adapter's design at toy size (configs/i2v_adapter_sd15.py:variant=tiny's UNet, 1.2M parameters, on the 8x8x8
  latents of its own factor-4 VAE): an AnimateDiff-v1 UNet3D with motion modules, first-frame attention in every
  spatial self-attention, and the input frame's VAE latent held clean at frame 0 through the whole DDIM loop, so
  frame 0 of the video is the input frame after the VAE's round trip. The IP-Adapter branch (tiny CLIP vision tower
  + Resampler, frozen at their random init) is kept so the demo runs through the real I2VAdapterPipeline unchanged;
  the UNet learns how much to use its tokens.
- Unlike the full-size recipe (adapter-only training on a frozen SD 1.5 + motion module), nothing pretrained exists
  at this size, so the whole UNet trains from scratch (train.trainable='.*') and the VAE is trained first
  (stage=vae: train.objective='autoencoder', vdjax/train/autoencoder.py). The text encoder is a tiny CLIP text tower
  with CLIP's real tokenizer, frozen at its random init: its token features still tell captions apart ("moving
  left" vs "right"), which the UNet's cross-attention learns to read.
- Data: moving_shapes clips (vdjax.data.moving_shapes, made on the fly, seed 0), 8 frames of 32x32. The bundled
  frame assets/demo/first_frame.png is clip 0 of seed 1, which training never sees; its caption is the default prompt.
- vae.scaling_factor is 1 / the trained VAE's latent standard deviation (`latent_std` in the VAE run's
  metrics.jsonl), so the UNet sees latents of unit scale.

How the shipped weights were made (the exact commands, in this order; CPU, see assets/demo/README.md for wall
times): the VAE; the UNet's 3000 steps of the config (cosine decay to 1e-4); 2000 more steps at that final rate,
resumed in the same workdir; then 8000 steps at batch 8 from those weights (cosine 4e-4 -> 4e-5). The last export
was copied to assets/demo/model, less Orbax's commit_success.txt markers (they name the run's absolute temporary
path; loading does not read them).

    python launch/train.py --config=configs/demo.py:stage=vae --workdir=runs/demo_vae --export=runs/demo_vae/model
    python launch/train.py --config=configs/demo.py --workdir=runs/demo_unet --checkpoint=runs/demo_vae/model \
        --export=runs/demo_unet/model
    python launch/train.py --config=configs/demo.py --workdir=runs/demo_unet --checkpoint=runs/demo_vae/model \
        --num_steps=5000 --export=runs/demo_unet/model_5000
    python launch/train.py --config=configs/demo.py --workdir=runs/demo_cont --checkpoint=runs/demo_unet/model_5000 \
        --config.train.batch_size=8 --config.train.learning_rate=4e-4 --config.train.warmup_steps=100 \
        --config.train.num_steps=8000 --config.train.sample_every=0 --export=runs/demo_cont/model

Variants tried, not shipped (assets/demo/README.md): `factor=2` (a VAE of two levels: 16x16 latents) and, on it,
`unet=wide` (48/96 channels, spatial attention at both levels; trained on the factor-2 VAE, and on the shipped
factor-4 one, with `launch/train.py --init=unet`, since those folders hold a tiny UNet), and training on the
Frame Similarity Prior's own path (`--config.train.frame_prior_path=True`: realistic motion, fewer shapes kept), and
`first_frame=concat` (the first frame's latent also concatenated to every frame's input channels,
`unet.first_frame_concat`; fine-tuned from the shipped weights: no better), the v-prediction loss
(`--config.train.loss_weighting=v`), a fine-tuned decoder (`stage=decoder`: 32 dB frames, fewer shapes kept),
motion the first frame decides (`motion=by_kind`, moving_shapes' squares right, circles down, triangles left) and
learned 2-D rotary positions in the first-frame attention (`first_frame=rotary`, `unet.first_frame_rotary`), and a
VAE trained 3000 steps instead of 800 under a UNet trained from scratch on it (flags only: sharp frames, 35.8 dB
frame 0, but the same motion/consistency curve).

What it shows (tests/test_demo.py; launch/measure_demo.py over 32 held-out clips and 5 seeds): frame 0 is the input
(26.2 dB PSNR on the bundled frame, 27.3 on average), the shapes move (8.3 px mean centroid shift over the clip; 4.5
on average) and keep their colour and count in 65% of the later frames on average, but not on the bundled frame,
whose small blue triangle and white circle merge from frame 1 (consistency 0.0), so that check is a strict xfail.
"""
import importlib.util
import pathlib

import ml_collections

STAGES = ("unet", "vae", "decoder")  # decoder: the VAE's decoder fine-tuned under the trained UNet
FACTORS = ("4", "2")  # the VAE's downsampling: 4 (the shipped weights), 2 (16x16 latents: tried, not shipped)
UNETS = ("tiny", "wide")  # tiny: the tests' 32/64 channels, attention at 16x16 only; wide: 48/96, attention at both
# concat: frame 0's latent also as input channels of every frame (not shipped); rotary: learned 2-D rotary positions in
# the first-frame attention
FIRST_FRAME = ("attention", "concat", "rotary")
# assets/demo/first_frame.png = make_clip(0, num_frames=8, size=32, seed=1)["first_frame"]; its caption:
DEMO_PROMPT = "a white circle moving left and a blue triangle moving left"


def _i2v_adapter_config(arg: str) -> ml_collections.ConfigDict:
    """configs/i2v_adapter_sd15.py (configs/ is not a package: absl loads configs by path)."""
    path = pathlib.Path(__file__).with_name("i2v_adapter_sd15.py")
    spec = importlib.util.spec_from_file_location("i2v_adapter_sd15", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "stage=unet") -> ml_collections.ConfigDict:
    args = dict(part.rpartition("=")[::2] for part in filter(None, (arg or "").split(",")))
    stage = args.get("stage", args.get("", "unet"))
    if stage not in STAGES:
        raise ValueError(f"unknown demo stage {stage!r}; choose one of {', '.join(STAGES)} (vae: train the "
                         "autoencoder first; unet: the model itself, the default; decoder: fine-tune the VAE's "
                         "decoder of a trained model)")
    factor = args.get("factor", "4")
    if factor not in FACTORS:
        raise ValueError(f"unknown demo VAE factor {factor!r}; choose one of {', '.join(FACTORS)} (4: the shipped "
                         "weights' 8x8 latents; 2: 16x16 latents, see assets/demo/README.md)")
    unet = args.get("unet", "tiny")
    if unet not in UNETS:
        raise ValueError(f"unknown demo UNet {unet!r}; choose one of {', '.join(UNETS)} (tiny: the shipped weights' "
                         "32/64 channels; wide: 48/96 channels with spatial attention at both levels)")
    first_frame = args.get("first_frame", "attention")
    if first_frame not in FIRST_FRAME:
        raise ValueError(f"unknown demo first_frame {first_frame!r}; choose one of {', '.join(FIRST_FRAME)} "
                         "(attention: I2V-Adapter's first-frame attention only; concat: its latent also concatenated "
                         "to every frame's input channels; rotary: with 2-D rotary positions in that attention)")
    config = _i2v_adapter_config("variant=tiny")
    config.variant = "demo"
    # The tiny UNet of the tests (32, 64 channels), on 8 x 8 latents of 8 channels: a VAE with three levels
    # (factor 4) keeps the UNet's cost low enough to train on a CPU, and 8 latent channels keep the frames sharp.
    config.unet.update(in_channels=8, out_channels=8)
    config.vae.update(block_out_channels=(32, 64, 64), latent_channels=8)
    config.vae.scaling_factor = 1.0  # the VAE stage does not use it; the UNet stage's is 1 / the VAE run's last
    if stage != "vae":               # latent_std (runs/demo_vae/metrics.jsonl, step 800: 2.2096)
        config.vae.scaling_factor = 0.4526
        config.schedule.clip_sample = False  # latents of unit scale reach past [-1, 1]: predicted x0 not clipped
    if factor == "2":  # shapes 2-4 latent pixels wide instead of 1-2, where the factor-4 model merges near shapes;
        # 4 latent channels suffice at this size. UNet steps cost 4x (0.59 steps/s at batch 8 on 2 cores).
        config.unet.update(in_channels=4, out_channels=4)
        config.vae.update(block_out_channels=(32, 64), latent_channels=4)
        if stage != "vae":  # 1 / latent_std of `stage=vae,factor=2` (800 steps: 2.3664; PSNR 30.6 dB)
            config.vae.scaling_factor = 0.4226
    if unet == "wide":  # first-frame attention with heads of 24 (tiny: 16) channels, and at the 8x8 level too, where
        # a shape's whole neighbourhood is in view; 0.63 steps/s at batch 8 on 2 cores (tiny, factor 2: 1.1)
        config.unet.update(block_out_channels=(48, 96), attention_levels=(True, True))
    config.unet.first_frame_concat = first_frame == "concat"
    config.unet.first_frame_rotary = first_frame == "rotary"
    # Sampling: what `python launch/sample.py --config=configs/demo.py` does with no other flags. Relative paths are
    # taken from the repository's root.
    config.sample.update(num_frames=8, height=32, width=32, steps=25, guidance_scale=3.0, eta=0.0, seed=0,
                         negative_prompt="", save_fps=4)
    # Frame Similarity Prior: the later frames start from the input frame's latent, undegraded, noised to step 8 of
    # 25 (t = 640): the shapes keep their colours far more often (consistency 0.62 vs 0.28 from pure noise, 16
    # held-out clips) and still move 5.9 px (8.1); launch/measure_demo.py measures other settings.
    config.sample.frame_prior.update(start_step=8, keep_prob=1.0)
    config.sample.checkpoint = "assets/demo/model" if factor == "4" else "runs/demo_f2_unet/model"  # not shipped
    config.sample.image = "assets/demo/first_frame.png"
    config.sample.prompt = DEMO_PROMPT
    config.data.update(source="moving_shapes", num_examples=20_000, num_frames=8, size=32,
                       motion=args.get("motion", "random"))
    config.train.update(trainable=(".*",), learning_rate=1e-3, schedule="cosine", warmup_steps=200, num_steps=3000,
                        batch_size=4, ema_decay=0.995, log_every=50, checkpoint_every=500, keep_checkpoints=2,
                        caption_dropout=0.1, sample_every=1500, objective="diffusion", kl_weight=0.0,
                        sample_prompt="a green circle moving down and a red square moving left")  # clip 0
    if stage == "vae":
        config.train.update(objective="autoencoder", kl_weight=1e-6, num_steps=800, learning_rate=2e-3,
                            warmup_steps=50, ema_decay=0.99, sample_every=0, batch_size=8, checkpoint_every=200)
        config.data.num_frames = 2  # frames are images to the VAE: two per clip, more clips per step
    if stage == "decoder":  # the encoder (so the latents the UNet learned) frozen; the exported folder is the whole
        # model with the sampling settings above (--checkpoint=a demo model folder)
        config.train.update(objective="autoencoder", trainable=("decoder", "post_quant_conv"), kl_weight=0.0,
                            num_steps=3000, learning_rate=5e-4, warmup_steps=50, ema_decay=0.999, sample_every=0,
                            batch_size=8, checkpoint_every=500)
        config.data.update(num_frames=2, num_examples=1_000_000)  # fresh clips
    return config
