"""The training loop: batches in, steps, logs, checkpoints; clean stop on SIGTERM, hard stop on a NaN loss."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Callable, Iterator

import jax
import numpy as np

from vdjax.train.checkpoints import Checkpoints
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
          log: Callable[[dict], None] | None = None):
    """Run until `num_steps` (default: config.train.num_steps); resume from `workdir` if it has checkpoints.

    `batches` yields {'video': (B, F, H, W, 3) float32 in [-1, 1], 'input_ids': (B, 77) int}; `data_state` /
    `set_data_state` save and restore the iterator's position with each checkpoint. Returns the final state."""
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
    stop = _StopRequested()
    last_good = start if restored is not None else None
    tick, examples = time.perf_counter(), 0
    try:
        for step in range(start, num_steps):
            batch = next(batches)
            state, metrics = trainer.step(state, batch)
            examples += len(batch["input_ids"])
            done = step + 1
            if done % cfg.log_every == 0 or done == num_steps or stop.requested:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"loss is {values['loss']} at step {done}; stopping. The last good checkpoint is "
                        f"{'step %d' % last_good if last_good is not None else 'none (no checkpoint yet)'} in "
                        f"{checkpoints.dir}. Lower train.learning_rate or check the data.")
                elapsed = time.perf_counter() - tick
                values.update(step=done, steps_per_s=cfg.log_every / elapsed if elapsed else 0.0,
                              examples_per_s=examples / elapsed if elapsed else 0.0)
                tick, examples = time.perf_counter(), 0
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(values) + "\n")
                (log or (lambda v: logging.info("%s", v)))(values)
            if done % cfg.checkpoint_every == 0 or done == num_steps or stop.requested:
                checkpoints.save(done, state, data_state() if data_state else None, force=stop.requested)
                last_good = done
            if stop.requested:
                break
    finally:
        checkpoints.wait()
        stop.restore()
    return state
