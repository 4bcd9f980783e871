"""Train (or fine-tune parts of) a model with vdjax's one trainer.

    python launch/train.py --config=configs/animatediff_sd15.py:variant=tiny_v2 --workdir=runs/tiny
    python launch/train.py --config=configs/animatediff_sd15.py:variant=v2 --workdir=gs://... \
        --checkpoint=models/sd15_mm_v2 --config.train.batch_size=64

Resumes from --workdir's checkpoints; SIGTERM (a preempted TPU VM) saves at the current step and exits. Metrics
go to the log and to WORKDIR/metrics.jsonl. Multi-host: every host runs this same command (see launch/tpu/).
"""
from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from vdjax.data.moving_shapes import MovingShapes
from vdjax.data.pipeline import make_dataset
from vdjax.data.video_folder import VideoFolder
from vdjax.models import clip_tokenizer
from vdjax.pipelines.t2v import T2VPipeline
from vdjax.train.feed import BatchStream, TokenizedBatches
from vdjax.train.loop import train
from vdjax.train.step import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model family config (path:arg).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the run's config go here.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Start from a converted model folder (launch/convert.py); "
                                  "default: random initialisation.")
_STEPS = flags.DEFINE_integer("num_steps", None, "Stop after this many steps (default: config.train.num_steps).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")


def make_batches(config, tokenize):
    """moving_shapes: made on the fly; video_folder: a user's videos through the grain pipeline. Both resumable."""
    d, t = config.data, config.train
    if d.source == "moving_shapes":
        source = MovingShapes(d.num_examples, num_frames=d.num_frames, size=d.size, seed=t.seed)
        return BatchStream(source, global_batch=t.batch_size, seed=t.seed, caption_dropout=t.caption_dropout,
                           tokenize=tokenize)
    if d.source == "video_folder":
        if t.batch_size % jax.process_count():
            raise ValueError(f"train.batch_size {t.batch_size} does not split over {jax.process_count()} hosts")
        dataset = make_dataset(VideoFolder(d.folder), batch_size=t.batch_size // jax.process_count(),
                               num_frames=d.num_frames, size=d.size, seed=t.seed, frame_stride=d.frame_stride,
                               caption_dropout=t.caption_dropout)
        return TokenizedBatches(iter(dataset), tokenize)
    raise ValueError(f"config.data.source={d.source!r}; choose 'moving_shapes' or 'video_folder'")


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    config = _CONFIG.value
    os.makedirs(_WORKDIR.value, exist_ok=True)
    pipe = (T2VPipeline.from_converted(_CHECKPOINT.value) if _CHECKPOINT.value
            else T2VPipeline.random_init(config, seed=config.train.seed))
    trainer = Trainer(config, pipe.unet, pipe.vae, pipe.text_encoder)
    print(f"trainable parameters: {trainer.trainable_count:,} (of {trainer.trainable_count + trainer.frozen_count:,});"
          f" devices: {jax.device_count()} on {jax.process_count()} host(s); mesh {dict(trainer.mesh.shape)}")
    tokenizer = pipe.tokenizer
    stream = make_batches(config, lambda c: clip_tokenizer.tokenize(tokenizer, c,
                                                                    config.text_encoder.max_position_embeddings))
    train(trainer, _WORKDIR.value, stream, num_steps=_STEPS.value, data_state=stream.get_state,
          set_data_state=stream.set_state, log=lambda v: print(
              f"step {v['step']}: loss {v['loss']:.4f} grad_norm {v['grad_norm']:.3f} lr {v['lr']:.2e} "
              f"{v['steps_per_s']:.2f} steps/s {v['examples_per_s']:.1f} examples/s", flush=True))
    print(f"done: {_WORKDIR.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
