"""Train (or fine-tune parts of) a model with vdjax's one trainer.

    python launch/train.py --config=configs/animatediff_sd15.py:variant=tiny_v2 --workdir=runs/tiny
    python launch/train.py --config=configs/animatediff_sd15.py:variant=v2 --workdir=gs://... \
        --checkpoint=models/sd15_mm_v2 --config.train.batch_size=64
    python launch/train.py --config=configs/magdiff.py:variant=tiny --workdir=runs/magdiff --export=models/magdiff

Resumes from --workdir's checkpoints; SIGTERM (a preempted TPU VM) saves at the current step and exits. Metrics
(loss, grad norm, lr, steps/s, examples/s, MFU on known chips) go to the log, WORKDIR/metrics.jsonl and TensorBoard
(`tensorboard --logdir WORKDIR/tensorboard`); sample videos to WORKDIR/samples every config.train.sample_every steps.
Multi-host: every host runs this same command with --distributed (see launch/tpu/); by hand, e.g. two processes on
one machine: --distributed --coordinator=127.0.0.1:1234 --num_processes=2 --process_id=0 (and 1).
"""
from __future__ import annotations

import os

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from vdjax.data.moving_shapes import MovingShapes, make_clip
from vdjax.data.pipeline import make_dataset
from vdjax.data.video_folder import VideoFolder
from launch_helpers import model_differences, pipeline_class, quiet_library_logs
from vdjax.pipelines.t2v import T2VPipeline
from vdjax.train.feed import BatchStream, TokenizedBatches
from vdjax.train.loop import train
from vdjax.train.step import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model family config (path:arg).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the run's config go here.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Start from a converted model folder (launch/convert.py); "
                                  "default: random initialisation.")
_INIT = flags.DEFINE_list("init", [], "With --checkpoint: parts that start from random weights, as --config describes "
                         "them, instead of from the folder (e.g. --init=unet: a new UNet on a trained VAE).")
_STEPS = flags.DEFINE_integer("num_steps", None, "Stop after this many steps (default: config.train.num_steps).")
_EXPORT = flags.DEFINE_string("export", None, "At the end, write the EMA weights as a converted model folder here "
                              "(what launch/sample.py --checkpoint reads); a finished run only exports.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs). On "
                                  "TPU VMs and SLURM the processes find each other; elsewhere set the three flags "
                                  "below.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (with --distributed, off TPU/SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")


def make_batches(config, tokenize):
    """moving_shapes: made on the fly; video_folder: a user's videos; tfds: a dataset prepared with
    vdjax.data.tfds_builders (config.data.tfds_dir, the folder its CLI printed). The last two go through the grain
    pipeline. All resumable."""
    d, t = config.data, config.train
    with_mask = bool(config.unet.get("subject", {}).get("channels", 0))  # MagDiff: the subject masks too
    masks = dict(with_mask=with_mask, with_frame_masks=t.get("subject_loss_weight", 0.0) > 0)  # and per frame
    if d.source == "moving_shapes":
        source = MovingShapes(d.num_examples, num_frames=d.num_frames, size=d.size, seed=t.seed,
                              motion=d.get("motion", "random"))
        return BatchStream(source, global_batch=t.batch_size, seed=t.seed, caption_dropout=t.caption_dropout,
                           tokenize=tokenize, **masks)
    if d.source in ("video_folder", "tfds"):
        if t.batch_size % jax.process_count():
            raise ValueError(f"train.batch_size {t.batch_size} does not split over {jax.process_count()} hosts")
        if d.source == "tfds":
            from vdjax.data.tfds_builders import PreparedDataset  # needs tensorflow-datasets (the `data` extra)
            source = PreparedDataset(d.tfds_dir)
        else:
            source = VideoFolder(d.folder)
        dataset = make_dataset(source, batch_size=t.batch_size // jax.process_count(), num_frames=d.num_frames,
                               size=d.size, seed=t.seed, frame_stride=d.frame_stride,
                               caption_dropout=t.caption_dropout)
        return TokenizedBatches(iter(dataset), tokenize, **masks)
    raise ValueError(f"config.data.source={d.source!r}; choose 'moving_shapes', 'video_folder' or 'tfds'")


def load_pipeline(kind, config) -> T2VPipeline:
    """--config's model: random, or --checkpoint's weights (less --init's parts) in the parts --config describes, so
    that what trains, and what --export writes, is what --config says; a part that no longer fits the folder's
    weights is refused before any training."""
    if not _CHECKPOINT.value:
        if _INIT.value:
            raise app.UsageError("--init names parts to start from scratch instead of from --checkpoint; without "
                                 "--checkpoint every part starts from scratch")
        return kind.random_init(config, seed=config.train.seed)
    from vdjax.convert import converted

    try:
        pipe = kind.from_converted(_CHECKPOINT.value, config=config, init=_INIT.value, seed=config.train.seed)
    except (converted.CheckpointError, ValueError) as e:
        raise app.UsageError(f"--checkpoint / --init: {e} (--init=PART starts that part from scratch)") from None
    differ = model_differences(config, converted.load_config(_CHECKPOINT.value),
                               [part for part in kind.PARTS if part not in _INIT.value])
    if differ:
        print(f"building the model as --config says; {_CHECKPOINT.value}/config.json differs in {', '.join(differ)}")
    return pipe


def make_sampler(pipe: T2VPipeline, trainer: Trainer, config):
    """state -> a uint8 sample video made with the run's EMA weights and config.sample's settings."""
    def sample(state):
        pipe.set_unet(nnx.merge(trainer.graphdef, state.ema, trainer.frozen))
        s = config.sample  # this run's settings (a converted model folder carries its own config)
        image = {}
        if "image_encoder" in config:  # image-to-video: the first frame of the first training clip
            clip = make_clip(0, num_frames=1, size=max(s.height, s.width))
            image["image"] = clip["first_frame"]
            if config.family == "magdiff":  # and its subject mask
                image["mask"] = clip["mask"][0]
        return pipe([config.train.sample_prompt], num_frames=s.num_frames, height=s.height, width=s.width,
                    steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, seed=config.train.seed,
                    **image).frames
    return sample


def _print_metrics(v: dict) -> None:
    mfu = f" MFU {v['mfu']:.1%}" if "mfu" in v else ""
    print(f"step {v['step']}: loss {v['loss']:.4f} grad_norm {v['grad_norm']:.3f} lr {v['lr']:.2e} "
          f"{v['steps_per_s']:.2f} steps/s {v['examples_per_s']:.1f} examples/s{mfu}", flush=True)


def main(argv):
    del argv
    quiet_library_logs()
    if _DISTRIBUTED.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    os.makedirs(_WORKDIR.value, exist_ok=True)
    kind = pipeline_class(config)
    pipe = load_pipeline(kind, config)
    autoencoder = config.train.get("objective", "diffusion") == "autoencoder"  # the VAE alone (configs/demo.py)
    if autoencoder:
        from vdjax.train.autoencoder import AutoencoderTrainer
        trainer = AutoencoderTrainer(config, pipe.vae)
    else:
        trainer = Trainer(config, pipe.unet, pipe.vae, pipe.text_encoder, image_encoder=getattr(pipe, "image_encoder",
                          None), image_proj=getattr(pipe, "image_proj", None))
    print(f"trainable parameters: {trainer.trainable_count:,} (of {trainer.trainable_count + trainer.frozen_count:,});"
          f" devices: {jax.device_count()} on {jax.process_count()} host(s); mesh {dict(trainer.mesh.shape)}")
    stream = make_batches(config, pipe.tokenize)
    if _EXPORT.value and os.path.exists(_EXPORT.value):  # checked before any training, so nothing is lost
        raise app.UsageError(f"--export={_EXPORT.value} exists; give a new folder")
    state = train(trainer, _WORKDIR.value, stream, num_steps=_STEPS.value, data_state=stream.get_state,
                  set_data_state=stream.set_state, log=_print_metrics,
                  sample=None if autoencoder else make_sampler(pipe, trainer, config))
    print(f"done: {_WORKDIR.value}")
    if _EXPORT.value and jax.process_index() == 0:
        from vdjax.convert import converted

        if autoencoder:  # the trained VAE with the other parts as they came (random, or --checkpoint's)
            pipe.vae = trainer.model(state)
        else:
            pipe.set_unet(nnx.merge(trainer.graphdef, state.ema, trainer.frozen))
        converted.save(_EXPORT.value, config, {part: getattr(pipe, part) for part in pipe.PARTS},
                       sources={"workdir": os.path.abspath(_WORKDIR.value), "weights": "EMA"})
        print(f"exported the EMA weights to {_EXPORT.value} (launch/sample.py --checkpoint={_EXPORT.value})")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
