"""Training checkpoints (Orbax): step, parameters, optimizer state, EMA, RNG and the data iterator's state.

Asynchronous saves, the last N kept. A checkpoint that fails to restore is named with the reason, and the run
falls back to the one before it. The run's config is kept beside the checkpoints: a workdir written by another
model config is refused instead of silently mixing.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import orbax.checkpoint as ocp

from vdjax.convert.readers import CheckpointError

# Config sections whose change makes old checkpoints meaningless for this run.
_MODEL_SECTIONS = ("unet", "vae", "text_encoder", "schedule")


_RUNTIME_KEYS = ("attention_impl",)  # how a layer computes, not what its weights are: free to change on resume


def _weights_only(section):
    if isinstance(section, dict):
        return {k: _weights_only(v) for k, v in section.items() if k not in _RUNTIME_KEYS}
    return section


class Checkpoints:
    def __init__(self, workdir: str, config, keep: int = 3):
        self.dir = os.path.join(os.path.abspath(workdir), "checkpoints")
        os.makedirs(self.dir, exist_ok=True)
        self._check_config(workdir, config)
        self.manager = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True))

    @staticmethod
    def _check_config(workdir: str, config) -> None:
        path = os.path.join(workdir, "config.json")
        current = {k: json.loads(config[k].to_json_best_effort()) for k in _MODEL_SECTIONS if k in config}
        if os.path.exists(path):
            saved = json.load(open(path))
            changed = sorted(k for k in current if _weights_only(saved.get(k)) != _weights_only(current[k]))
            if changed:
                raise ValueError(f"{workdir} holds checkpoints of another model config (different: "
                                 f"{', '.join(changed)}); use a new --workdir, or the config that wrote it")
        else:
            with open(path, "w") as f:
                json.dump(current, f, indent=2)

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> None:
        leaves = {str(i): x for i, x in enumerate(jax.tree.leaves(state))}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves),
                                                        data=ocp.args.JsonSave(data_state or {})), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    @property
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, template):
        """(state, data_state, step) from the newest checkpoint that restores, or None when there is none.
        `template`: a state of the right structure (its arrays' shardings are where restored arrays go)."""
        leaves, treedef = jax.tree.flatten(template)
        abstract = {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for i, x in enumerate(leaves)}
        failures = []
        for step in reversed(self.steps):
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                         data=ocp.args.JsonRestore()))
            except Exception as e:  # a truncated or foreign checkpoint: say which and go back one
                reason = str(e).splitlines()[0][:300]
                logging.warning("checkpoint %d in %s does not restore (%s); trying the previous one", step, self.dir,
                                reason)
                failures.append(f"step {step}: {reason}")
                continue
            state = jax.tree.unflatten(treedef, [got["state"][str(i)] for i in range(len(leaves))])
            return state, dict(got["data"] or {}), step
        if failures:
            raise CheckpointError(f"no checkpoint in {self.dir} restores: " + "; ".join(failures))
        return None
