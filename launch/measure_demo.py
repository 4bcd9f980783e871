"""Measure a demo model (configs/demo.py) on held-out moving_shapes clips: frame-0 PSNR, shape motion, shape
consistency and agreement with the true clip's directions (vdjax/data/shape_measures.py), per clip and on average.
assets/demo/README.md's numbers come from here.

    python launch/measure_demo.py                                   # the shipped weights, 16 clips of seed 1
    python launch/measure_demo.py --checkpoint=runs/demo_unet/model --clips=32
    python launch/measure_demo.py --start_step=0 --keep_prob=0.5    # other Frame Similarity Prior settings
    python launch/measure_demo.py --guidance_scale=5                # other classifier-free guidance
    python launch/measure_demo.py --steps=50 --start_step=16 --eta=1  # other DDIM settings
    python launch/measure_demo.py --clips=32 --captions=blank       # directions without the captions

Each clip's first frame and caption go through the same pipeline call as `launch/sample.py --config=configs/demo.py`
(config.sample: steps, guidance, seed, frame prior, colour matching); clip i of seed 1 was never seen in training
(seed 0).
"""
from __future__ import annotations

import os

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
_ETA = flags.DEFINE_float("eta", None, "Override config.sample.eta (0: deterministic DDIM; 1: DDPM-like noise).")


def main(argv):
    del argv
    quiet_library_logs()
    from vdjax.data import shape_measures
    from vdjax.data.moving_shapes import make_clip
    from vdjax.pipelines.i2v_adapter import I2VAdapterPipeline

    if _CLIPS.value < 1:
        raise app.UsageError("--clips must be at least 1")
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
    out = pipe(captions, negative_prompt=s.negative_prompt, seed=s.seed,
               image=np.stack([c["first_frame"] for c in clips]), num_frames=s.num_frames, height=s.height,
               width=s.width, steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
    rows = []
    for i, (clip, video) in enumerate(zip(clips, out.frames)):
        rows.append((shape_measures.psnr(video[0], clip["first_frame"]), shape_measures.displacement(video),
                     shape_measures.consistency(video), shape_measures.direction_agreement(video, clip["video"])))
        print(f"clip {i:3d}: psnr {rows[-1][0]:5.1f} dB  motion {rows[-1][1]:5.1f} px  consistency {rows[-1][2]:.2f}"
              f"  direction {rows[-1][3]:5.2f}  ({clip['caption']})")
    psnr, motion, consistency = np.mean([r[:3] for r in rows], axis=0)
    direction = np.nanmean([r[3] for r in rows])  # clips whose shapes do not move have no direction
    print(f"mean over {len(rows)} clips: psnr {psnr:.1f} dB, motion {motion:.1f} px, consistency {consistency:.2f}, "
          f"direction {direction:.2f} (frame prior start_step {s.frame_prior.start_step}, keep_prob "
          f"{s.frame_prior.keep_prob}, guidance {s.guidance_scale}, {s.steps} steps, eta {s.eta}; {dynamics} motion)")


if __name__ == "__main__":
    app.run(main)
