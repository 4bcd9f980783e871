"""Measure a demo model (configs/demo.py) on held-out moving_shapes clips: frame-0 PSNR, shape motion, shape
consistency and agreement with the true clip's directions (vdjax/data/shape_measures.py), per clip and on average.
assets/demo/README.md's numbers come from here.

    python launch/measure_demo.py                                   # the shipped weights, 16 clips of seed 1
    python launch/measure_demo.py --checkpoint=runs/demo_unet/model --clips=32
    python launch/measure_demo.py --start_step=0 --keep_prob=0.5    # other Frame Similarity Prior settings
    python launch/measure_demo.py --guidance_scale=5                # other classifier-free guidance
    python launch/measure_demo.py --steps=50 --start_step=16 --eta=1  # other DDIM settings
    python launch/measure_demo.py --clips=32 --captions=blank       # directions without the captions
    python launch/measure_demo.py --clips=32 --seeds=4              # each clip with 4 sampling seeds

One seed's mean over 32 clips moves by several hundredths of consistency and about a pixel of motion from seed to
seed (the shipped weights, seeds 0-4: consistency 0.60-0.70, motion 3.5-5.6 px), so compare models over several
seeds: `--seeds=N` samples every clip with config.sample.seed, +1, ..., +N-1, prints each clip's mean over them, and
the spread of the per-seed means.

Each clip's first frame and caption go through the same pipeline call as `launch/sample.py --config=configs/demo.py`
(config.sample: steps, guidance, seed, frame prior, colour matching); clip i of seed 1 was never seen in training
(seed 0).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from absl import app, flags

from launch_helpers import quiet_library_logs

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHECKPOINT = flags.DEFINE_string("checkpoint", os.path.join(_ROOT, "assets", "demo", "model"),
                                  "A converted demo model folder (launch/train.py --export).")
_CLIPS = flags.DEFINE_integer("clips", 16, "Held-out clips: make_clip(i, seed=1) for i < clips.")
_START = flags.DEFINE_integer("start_step", None, "Override config.sample.frame_prior.start_step.")
_KEEP = flags.DEFINE_float("keep_prob", None, "Override config.sample.frame_prior.keep_prob.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Override config.sample.guidance_scale.")
_STEPS = flags.DEFINE_integer("steps", None, "Override config.sample.steps (the frame prior's start_step counts in "
                              "these steps).")
_CAPTIONS = flags.DEFINE_enum("captions", "true", ["true", "blank"], "Sample with the clips' captions, or with empty "
                               "ones (how much of the motion's direction the model takes from the caption).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Sample every clip with this many seeds: config.sample.seed, +1, ...")
_ETA = flags.DEFINE_float("eta", None, "Override config.sample.eta (0: deterministic DDIM; 1: DDPM-like noise).")


def main(argv):
    del argv
    quiet_library_logs()
    from vdjax.data import shape_measures
    from vdjax.data.moving_shapes import make_clip
    from vdjax.pipelines.i2v_adapter import I2VAdapterPipeline

    if _CLIPS.value < 1:
        raise app.UsageError("--clips must be at least 1")
    if _SEEDS.value < 1:
        raise app.UsageError("--seeds must be at least 1")
    pipe = I2VAdapterPipeline.from_converted(_CHECKPOINT.value)
    s = pipe.config.sample
    if _START.value is not None:
        s.frame_prior.start_step = _START.value
    if _KEEP.value is not None:
        s.frame_prior.keep_prob = _KEEP.value
    if _GUIDANCE.value is not None:
        s.guidance_scale = _GUIDANCE.value
    if _STEPS.value is not None:
        s.steps = _STEPS.value
    if _ETA.value is not None:
        s.eta = _ETA.value
    dynamics = pipe.config.data.get("motion", "random")  # moving_shapes' motion that the model was trained on
    clips = [make_clip(i, num_frames=s.num_frames, size=s.height, seed=1, motion=dynamics)
             for i in range(_CLIPS.value)]
    captions = [c["caption"] if _CAPTIONS.value == "true" else "" for c in clips]
    per_seed = []  # (seeds, clips, 4): psnr, motion, consistency, direction
    for seed in range(s.seed, s.seed + _SEEDS.value):
        out = pipe(captions, negative_prompt=s.negative_prompt, seed=seed,
                   image=np.stack([c["first_frame"] for c in clips]), num_frames=s.num_frames, height=s.height,
                   width=s.width, steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
        per_seed.append([(shape_measures.psnr(video[0], clip["first_frame"]), shape_measures.displacement(video),
                          shape_measures.consistency(video), shape_measures.direction_agreement(video, clip["video"]))
                         for clip, video in zip(clips, out.frames)])
    per_seed = np.asarray(per_seed)
    with warnings.catch_warnings():  # a clip whose shapes never move has no direction (NaN): left out of means
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = np.nanmean(per_seed, axis=0)
        seed_means = np.nanmean(per_seed, axis=1)  # (seeds, 4)
        spread = np.nanmin(seed_means, axis=0), np.nanmax(seed_means, axis=0)
    for i, (clip, row) in enumerate(zip(clips, rows)):
        print(f"clip {i:3d}: psnr {row[0]:5.1f} dB  motion {row[1]:5.1f} px  consistency {row[2]:.2f}"
              f"  direction {row[3]:5.2f}  ({clip['caption']})")
    psnr, motion, consistency, direction = np.nanmean(rows, axis=0)
    seeds = f"{_SEEDS.value} seeds from {s.seed}" if _SEEDS.value > 1 else f"seed {s.seed}"
    print(f"mean over {len(rows)} clips: psnr {psnr:.1f} dB, motion {motion:.1f} px, consistency {consistency:.2f}, "
          f"direction {direction:.2f} (frame prior start_step {s.frame_prior.start_step}, keep_prob "
          f"{s.frame_prior.keep_prob}, guidance {s.guidance_scale}, {s.steps} steps, eta {s.eta}, {seeds}; "
          f"{dynamics} motion)")
    if _SEEDS.value > 1:
        for name, column, unit in (("motion", 1, " px"), ("consistency", 2, ""), ("direction", 3, "")):
            values = ", ".join(f"{v:.2f}" for v in seed_means[:, column])
            print(f"per seed, {name}{unit}: {values} (min-max {spread[0][column]:.2f}-"
                  f"{spread[1][column]:.2f})")


if __name__ == "__main__":
    app.run(main)
