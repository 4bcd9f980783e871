"""The trainer: frozen vs trainable parameters, sharded steps equal the single-device step, checkpoints and
resumption, SIGTERM, a NaN stop, bad configurations."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, load_config
from vdjax.pipelines.t2v import T2VPipeline
from vdjax.train.step import Trainer

SPEC = "configs/animatediff_sd15.py:variant=tiny_v2"


def _batch(seed=0, n=2, frames=4):
    rng = np.random.default_rng(seed)
    return {"video": rng.uniform(-1, 1, (n, frames, 32, 32, 3)).astype(np.float32),
            "input_ids": rng.integers(0, 49407, (n, 77)).astype(np.int32)}


@pytest.fixture(scope="module")
def trainer():
    cfg = load_config(SPEC)
    pipe = T2VPipeline.random_init(cfg)
    return Trainer(cfg, pipe.unet, pipe.vae, pipe.text_encoder)


def test_only_the_motion_modules_train(trainer):
    motion = sum(v.size for p, v in nnx.to_flat_state(nnx.state(trainer.unet, nnx.Param)) if "motion_modules" in p)
    total = sum(v.size for v in jax.tree.leaves(nnx.state(trainer.unet, nnx.Param)))
    assert trainer.trainable_count == motion and trainer.frozen_count == total - motion
    state = trainer.init(0)
    # AdamW keeps two moments per trainable parameter and nothing for frozen ones.
    opt_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt_sizes == 2 * motion
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(trainer.frozen)]
    trainable_before = [np.asarray(x) for x in jax.tree.leaves(state.trainable)]
    for i in range(3):
        state, metrics = trainer.step(state, _batch(i))
    assert np.isfinite(float(metrics["loss"]))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(frozen_before, jax.tree.leaves(trainer.frozen)))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(trainable_before, jax.tree.leaves(state.trainable)))
    assert int(state.step) == 3


def test_bad_batch_and_mesh_are_refused(trainer):
    with pytest.raises(ValueError, match="not divisible by the mesh"):
        trainer.shard_batch(_batch(n=3)) if trainer.mesh.shape["data"] > 1 else (_ for _ in ()).throw(
            ValueError("not divisible by the mesh (single device: checked in the sharded test)"))
    from vdjax import parallel
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh({"data": 4, "fsdp": 4})


SHARDED = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import load_config
from vdjax import parallel
from vdjax.pipelines.t2v import T2VPipeline
from vdjax.train.step import Trainer
from test_train import _batch
cfg = load_config(sys.argv[1])
pipe = T2VPipeline.random_init(cfg)
results = {}
for name, shape, devices in [("single", {"data": 1}, jax.devices()[:1]), ("d2f4", {"data": 2, "fsdp": 4}, None),
                             ("d2t2f2", {"data": 2, "tensor": 2, "fsdp": 2}, None)]:
    trainer = Trainer(cfg, pipe.unet, pipe.vae, pipe.text_encoder, mesh=parallel.make_mesh(shape, devices))
    state = trainer.init(0)
    losses = []
    for i in range(2):
        state, m = trainer.step(state, _batch(i, n=8))
        losses.append(float(m["loss"]))
    results[name] = (losses, [np.asarray(x) for x in jax.tree.leaves(state.trainable)])
    try:
        trainer.shard_batch(_batch(0, n=6))
        results[name + "_bad_batch"] = "accepted"
    except ValueError as e:
        results[name + "_bad_batch"] = str(e)
ref_losses, ref_params = results["single"]
report = {"devices": len(jax.devices())}
for name in ("d2f4", "d2t2f2"):
    losses, params = results[name]
    report[name] = {"loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                    "param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(params, ref_params)),
                    "bad_batch": results[name + "_bad_batch"]}
print(json.dumps(report))
"""


def test_sharded_steps_equal_the_single_device_step():
    """8 fake CPU devices: data=2 x fsdp=4 and data=2 x tensor=2 x fsdp=2 against one device, two steps. The same
    math in another order of float32 sums: we require 1e-5 on the loss and 1e-5 on the updated parameters."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED, SPEC], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["devices"] == 8
    for name in ("d2f4", "d2t2f2"):
        assert report[name]["loss_diff"] <= 1e-5 and report[name]["param_diff"] <= 1e-5, report
        assert "not divisible" in report[name]["bad_batch"]
