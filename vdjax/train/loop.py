"""The training loop: batches in, steps, logs, checkpoints; clean stop on SIGTERM, hard stop on a NaN loss.

Host 0 writes the metrics (WORKDIR/metrics.jsonl and TensorBoard summaries in WORKDIR/tensorboard) and the sample
videos (WORKDIR/samples/step_N.gif, every `train.sample_every` steps); every host steps, saves and samples, since
each holds part of the arrays.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Callable, Iterator

import jax
import numpy as np

from vdjax import flops
from vdjax.io.video import write_video
from vdjax.train.checkpoints import Checkpoints
from vdjax.train.state import TrainState
from vdjax.train.step import Trainer


class _StopRequested:
    """SIGTERM (a preempted TPU VM, a scheduler's stop) sets a flag; the loop saves at the current step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the current step, then stopping")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(trainer: Trainer, workdir: str, batches: Iterator[dict], *, num_steps: int | None = None,
          data_state: Callable[[], dict] | None = None, set_data_state: Callable[[dict], None] | None = None,
          log: Callable[[dict], None] | None = None, sample: Callable[[TrainState], np.ndarray] | None = None):
    """Run until `num_steps` (default: config.train.num_steps); resume from `workdir` if it has checkpoints.

    `batches` yields {'video': (B, F, H, W, 3) float32 in [-1, 1], 'input_ids': (B, 77) int}; `data_state` /
    `set_data_state` save and restore the iterator's position with each checkpoint; `sample(state)` returns a
    uint8 video (B, F, H, W, 3) made with the state's weights, called every `train.sample_every` steps (0: never).
    Returns the final state."""
    cfg = trainer.config.train
    num_steps = cfg.num_steps if num_steps is None else num_steps
    checkpoints = Checkpoints(workdir, trainer.config, keep=cfg.keep_checkpoints)
    state = trainer.init(cfg.seed)
    restored = checkpoints.restore_latest(state)
    start = 0
    if restored is not None:
        state, saved_data, start = restored
        if saved_data and set_data_state:
            set_data_state(saved_data)
        logging.info("resumed from step %d in %s", start, workdir)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    chief = jax.process_index() == 0
    summaries = _summary_writer(os.path.join(workdir, "tensorboard")) if chief else None
    sample_every = cfg.get("sample_every", 0)
    stop = _StopRequested()
    last_good = start if restored is not None else None
    tick, examples, logged, compile_seconds = time.perf_counter(), 0, start, trainer.compile_seconds
    in_flight = None
    try:
        for step in range(start, num_steps):
            batch = next(batches)
            state, metrics = trainer.step(state, batch)
            # Steps dispatch asynchronously: wait for the previous one, so one step stays queued behind the running
            # one, but Python never runs ahead to the next log point and then blocks in XLA for log_every steps,
            # where it cannot run the SIGTERM handler (a preempted VM's grace period would run out first).
            if in_flight is not None:
                jax.block_until_ready(in_flight)
            in_flight = metrics["loss"]
            examples += len(batch["input_ids"]) * jax.process_count()  # this host's rows of the global batch
            done = step + 1
            if done % cfg.log_every == 0 or done == num_steps or stop.requested:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"loss is {values['loss']} at step {done}; stopping. The last good checkpoint is "
                        f"{'step %d' % last_good if last_good is not None else 'none (no checkpoint yet)'} in "
                        f"{checkpoints.dir}. Lower train.learning_rate or check the data.")
                # Compiling is not training: its time is left out of the rates.
                elapsed = time.perf_counter() - tick - (trainer.compile_seconds - compile_seconds)
                compile_seconds = trainer.compile_seconds
                steps_per_s = (done - logged) / elapsed if elapsed else 0.0
                values.update(step=done, steps_per_s=steps_per_s, examples_per_s=examples / elapsed if elapsed else 0.0)
                utilisation = flops.mfu(trainer.step_flops, steps_per_s)
                if utilisation is not None:
                    values["mfu"] = utilisation
                tick, examples, logged = time.perf_counter(), 0, done
                if chief:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(values) + "\n")
                    for name, value in values.items():
                        if name != "step":
                            summaries.add_scalar(f"train/{name}", value, done)
                    summaries.flush()
                (log or (lambda v: logging.info("%s", v)))(values)
            if sample is not None and sample_every and done % sample_every == 0:
                _write_sample(sample(state), workdir, done, summaries)
                tick = time.perf_counter()  # sampling time is not training time
            if done % cfg.checkpoint_every == 0 or done == num_steps or stop.requested:
                checkpoints.save(done, state, data_state() if data_state else None, force=stop.requested)
                last_good = done
            if stop.requested:
                break
    finally:
        checkpoints.wait()
        stop.restore()
        if summaries is not None:
            summaries.close()
    return state


def _summary_writer(logdir: str):
    from tensorboardX import SummaryWriter  # TensorBoard event files without TensorFlow

    return SummaryWriter(logdir)


def _write_sample(video: np.ndarray, workdir: str, step: int, summaries) -> None:
    """The first sample as WORKDIR/samples/step_N.gif, and as a strip of frames in TensorBoard."""
    if summaries is None:  # not host 0
        return
    path = os.path.join(workdir, "samples", f"step_{step:07d}.gif")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(video[0], path)
    summaries.add_image("samples/frames", np.concatenate(list(video[0]), axis=1), step, dataformats="HWC")
    logging.info("sample at step %d: %s", step, path)
