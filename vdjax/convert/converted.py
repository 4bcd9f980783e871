"""A converted model on disk: one Orbax checkpoint per part plus the config, written atomically.

    output/
      config.json        the family config (ml_collections, as JSON)
      unet/ vae/ text_encoder/   Orbax checkpoints of each part's parameters
      tokenizer/         when the source had one
      summary.json       parameters and bytes per part, sources, dtype

It is written to a temporary sibling folder and renamed into place at the end, so an interrupted conversion
leaves nothing half-written at `output`. Loading restores each parameter straight into its sharding.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vdjax.convert.readers import CheckpointError
from vdjax.convert.sources import PARTS, abstract_part
from vdjax.models.unet3d import ADDABLE, with_added_options


def part_summary(model: nnx.Module) -> dict:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {"parameters": int(sum(np.prod(x.shape) for x in leaves)),
            "bytes": int(sum(np.prod(x.shape) * x.dtype.itemsize for x in leaves)),
            "dtype": str(leaves[0].dtype) if leaves else None}


def save(output: str, config: ml_collections.ConfigDict, models: Mapping[str, object], *, sources: Mapping = None,
         overwrite: bool = False) -> dict:
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent}: the output's folder does not exist; create it first")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; choose another --output or pass --overwrite")
    tmp = f"{output}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    summary = {"sources": dict(sources or {}), "parts": {}, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        checkpointer = ocp.StandardCheckpointer()
        for part in PARTS:
            if part in models:
                checkpointer.save(os.path.join(tmp, part), nnx.to_pure_dict(nnx.state(models[part], nnx.Param)))
                summary["parts"][part] = part_summary(models[part])
        checkpointer.wait_until_finished()
        if models.get("tokenizer_folder"):
            shutil.copytree(models["tokenizer_folder"], os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def load_config(folder: str) -> ml_collections.ConfigDict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: not a converted vdjax model (no config.json); convert with launch/convert.py")
    config = ml_collections.ConfigDict(json.load(open(path)))
    if "unet" in config:  # a folder converted before a UNet option existed gets the option's default (off)
        from vdjax.models.unet3d import base_config

        unet = base_config()
        unet.update(config.unet)  # recursive: saved values over the defaults
        config.unet = unet
    return config


def load(folder: str, *, parts=None, shardings_for=None, config=None) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, {part: model}) with each parameter restored straight into `shardings_for(abstract)`'s sharding.

    The parts are built as the folder's config.json says, or as `config` says where one is given (a training run's
    --config, which may change what does not change a parameter's shape, or add unet.first_frame_concat or
    unet.first_frame_rotary: what they add starts at zero); a part whose parameters then differ from the folder's
    raises CheckpointError naming them."""
    saved_config = load_config(folder)
    _tuples(saved_config)
    if config is None:
        config = saved_config
    summary_path = os.path.join(folder, "summary.json")
    saved = json.load(open(summary_path))["parts"] if os.path.isfile(summary_path) else {}
    checkpointer = ocp.StandardCheckpointer()
    models = {}
    for part in PARTS if parts is None else parts:
        path = os.path.join(os.path.abspath(folder), part)
        if not os.path.isdir(path):
            continue
        # A UNet saved without first_frame_concat or first_frame_rotary loads into a config with them: restored as
        # saved, then given them (starting as it was)
        added = [key for key in ADDABLE if part == "unet" and config.unet.get(key, False)
                 and not saved_config.unet.get(key, False)]
        part_config = config
        if added:
            part_config = config.copy_and_resolve_references()
            part_config.unet.update({key: False for key in added})
        abstract = abstract_part(part, part_config)
        if config is not saved_config:
            _check_shapes(part, abstract, abstract_part(part, saved_config), folder)
        graphdef, state = nnx.split(abstract, nnx.Param)
        shardings = shardings_for(abstract) if shardings_for else {}
        flat = dict(nnx.to_flat_state(state))
        default = _replicated()
        dtype = saved.get(part, {}).get("dtype")  # parameters were stored in the dtype asked for at conversion
        for p, var in flat.items():
            var.set_value(jax.ShapeDtypeStruct(var.shape, dtype or var.dtype, sharding=shardings.get(p, default)))
        target = nnx.to_pure_dict(nnx.from_flat_state(flat))
        try:
            restored = checkpointer.restore(path, target)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot restore the {part} ({str(e).splitlines()[0][:300]}); the "
                                  "checkpoint is incomplete or was written for another config.") from e
        nnx.replace_by_pure_dict(state, restored)
        models[part] = nnx.merge(graphdef, state)
        if added:
            models[part] = with_added_options(models[part], config.unet)
    return config, models


def _check_shapes(part: str, wanted: nnx.Module, saved: nnx.Module, folder: str) -> None:
    def shapes(model):
        return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    wanted, saved = shapes(wanted), shapes(saved)
    keys = [k for k in sorted(set(wanted) | set(saved)) if wanted.get(k) != saved.get(k)]
    if not keys:
        return
    differ = [f"{k} {wanted.get(k, 'absent')} (folder: {saved.get(k, 'absent')})" for k in keys]
    more = "; ..." if len(differ) > 4 else ""
    if all(k not in saved for k in keys):  # e.g. an I2V-Adapter config over a plain AnimateDiff folder
        fix = (f"the config adds parameters the folder lacks: convert the source weights with this config "
               f"(launch/convert.py --config=...), which initialises them as upstream does, or start the {part} "
               "from scratch")
    else:
        fix = f"use the folder's config.json for the {part}, or start the {part} from scratch"
    raise CheckpointError(f"{folder}: the {part} the config describes does not fit the folder's {part} weights "
                          f"({len(differ)} parameters differ: {'; '.join(differ[:4])}{more}); {fix}")


def _replicated() -> jax.sharding.Sharding:
    """One device in a single process; with several processes (jax.distributed), a copy on every device, since
    each process can only place arrays on devices it addresses."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _tuples(config) -> None:
    """JSON turns tuples into lists; the models' configs are frozen (hashable), which needs tuples back."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            _tuples(value)
        elif isinstance(value, list):
            config[key] = tuple(value)
