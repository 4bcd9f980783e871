"""The trainer's step: frozen vs trainable parameters, rematerialisation, timestep bounds, the subject loss, the v
loss weighting, the VAE's step (whole or decoder only), sharded steps equal the single-device step, the batch
stream, the loop's in-flight step, a tiny model overfitting.
launch/train.py's runs (checkpoints, resumption, SIGTERM, several processes) are in tests/test_train_runs.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, TRAIN_SPEC, load_config, max_abs_error
from vdjax.train.step import Trainer

SPEC = TRAIN_SPEC


def _batch(seed=0, n=2, frames=4):
    rng = np.random.default_rng(seed)
    return {"video": rng.uniform(-1, 1, (n, frames, 32, 32, 3)).astype(np.float32),
            "input_ids": rng.integers(0, 49407, (n, 77)).astype(np.int32)}


@pytest.fixture(scope="module")
def trainer(tiny_pipe):
    return Trainer(tiny_pipe.config, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)


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


def test_rematerialised_steps_equal_the_plain_step(tiny_pipe, trainer):
    """train.remat=full (each UNet layer recomputed in the backward pass, frozen parameters included) gives the
    step that none gives. One policy is enough here: that the setting reaches the UNet; every policy's gradients
    are checked on the UNet in tests/test_unet_model.py."""
    state = trainer.init(0)
    expected, _ = trainer.step(state, _batch())
    for remat in ("full",):
        config = tiny_pipe.config.copy_and_resolve_references()
        config.train.remat = remat
        other = Trainer(config, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)
        got, _ = other.step(other.init(0), _batch())
        leaves = zip(jax.tree.leaves(got.trainable), jax.tree.leaves(expected.trainable))
        errors = [max_abs_error(a, b) for a, b in leaves]
        assert max(errors) <= 1e-6, (remat, max(errors))


def test_max_timestep_bounds_the_training_timesteps(tiny_pipe, trainer):
    key = jax.random.key(0)
    assert int(trainer.draw_timesteps(key, 4096).max()) >= 990  # the default: the whole schedule
    config = tiny_pipe.config.copy_and_resolve_references()
    config.train.max_timestep = 700
    t = np.asarray(Trainer(config, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder).draw_timesteps(key, 4096))
    assert t.min() >= 0 and 690 <= t.max() < 700
    config.train.max_timestep = 1001
    with pytest.raises(ValueError, match="max_timestep=1001; use 1 to 1000"):
        Trainer(config, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)


def test_subject_loss_weight_weighs_the_subject_blocks(tiny_pipe, trainer):
    """train.subject_loss_weight = w: the squared error is a weighted mean, 1 + w on latent pixels whose block of
    the frame's subject mask has any subject. Uniform masks (none, or all subject) give the plain mean's loss."""
    config = tiny_pipe.config.copy_and_resolve_references()
    config.train.subject_loss_weight = 4.0
    weighted = Trainer(config, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)
    masks = np.zeros((2, 4, 32, 32), np.float32)
    masks[1, 2, 9, 30] = 1.0  # one subject pixel: its latent block only
    factor = tiny_pipe.vae.downsampling_factor
    weights = np.asarray(weighted._loss_weights({"frame_masks": masks}, (2, 4, 32 // factor, 32 // factor, 4)))
    expected = np.ones((2, 4, 32 // factor, 32 // factor, 1), np.float32)
    expected[1, 2, 9 // factor, 30 // factor] = 5.0
    np.testing.assert_array_equal(weights, expected)

    def loss(t, batch):
        return float(t.step(t.init(0), batch)[1]["loss"])

    plain = loss(trainer, _batch(7))
    for uniform in (np.zeros_like(masks), np.ones_like(masks)):
        assert abs(loss(weighted, dict(_batch(7), frame_masks=uniform)) - plain) < 1e-6 * plain
    half = np.zeros_like(masks)
    half[..., :16] = 1.0
    assert abs(loss(weighted, dict(_batch(7), frame_masks=half)) - plain) > 1e-4 * plain
    with pytest.raises(ValueError, match="needs 'frame_masks'"):
        weighted.step(weighted.init(0), _batch(7))
    config.train.subject_loss_weight = -1.0
    with pytest.raises(ValueError, match="subject_loss_weight=-1.0"):
        Trainer(config, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)


def test_v_loss_weighting_divides_the_noise_error_by_alphas_cumprod(tiny_pipe, trainer):
    """train.loss_weighting='v': the step's loss is the plain one / alphas_cumprod[t] (one clip, so one t), which
    is the v-prediction loss of the epsilon model's prediction."""
    rng = np.random.default_rng(0)
    a, eps, eps_hat, z = rng.uniform(0.01, 0.99), *rng.normal(size=(3, 64))
    x_t = np.sqrt(a) * z + np.sqrt(1 - a) * eps
    z_hat = (x_t - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    v, v_hat = np.sqrt(a) * eps - np.sqrt(1 - a) * z, np.sqrt(a) * eps_hat - np.sqrt(1 - a) * z_hat
    np.testing.assert_allclose(np.mean((v_hat - v) ** 2), np.mean((eps_hat - eps) ** 2) / a, rtol=1e-10)

    config = tiny_pipe.config.copy_and_resolve_references()
    config.train.loss_weighting = "v"
    weighted = Trainer(config, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)
    batch = _batch(3, n=1)
    state = trainer.init(0)
    _, k_t, _, _ = jax.random.split(jax.random.wrap_key_data(state.rng), 4)  # as the step draws its t
    t = int(trainer.draw_timesteps(k_t, 1)[0])
    plain = float(trainer.step(state, batch)[1]["loss"])
    got = float(weighted.step(weighted.init(0), batch)[1]["loss"])
    assert abs(got - plain / float(trainer.alphas_cumprod[t])) <= 1e-5 * got, (t, got, plain)
    assert got > plain * 1.001  # a different loss, not the plain one
    config.train.loss_weighting = "x0"
    with pytest.raises(ValueError, match="loss_weighting='x0'; choose one of epsilon, v"):
        Trainer(config, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)
    config.train.loss_weighting = "v"
    config.schedule.prediction_type = "v_prediction"
    with pytest.raises(ValueError, match="already its own"):
        Trainer(config, tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)


def test_the_autoencoder_step_trains_what_train_trainable_names(tiny_pipe):
    """train.objective='autoencoder' with train.trainable = the decoder: its loss falls on a fixed batch, the
    decoder changes, the encoder (so the latents a diffusion model learned) does not; '.*' trains the whole VAE."""
    from vdjax.train.autoencoder import AutoencoderTrainer

    config = tiny_pipe.config.copy_and_resolve_references()
    config.train.update(objective="autoencoder", kl_weight=1e-6, trainable=("decoder", "post_quant_conv"),
                        learning_rate=1e-3, warmup_steps=1)
    params = dict(nnx.to_flat_state(nnx.state(tiny_pipe.vae, nnx.Param)))
    decoder = {p: v for p, v in params.items() if p[0] in ("decoder", "post_quant_conv")}
    trainer = AutoencoderTrainer(config, tiny_pipe.vae)
    assert trainer.trainable_count == sum(v.size for v in decoder.values()) > 0
    assert trainer.trainable_count + trainer.frozen_count == sum(v.size for v in params.values())
    state, batch, losses = trainer.init(0), {"video": _batch(5, frames=2)["video"]}, []
    for _ in range(4):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    trained = dict(nnx.to_flat_state(nnx.state(nnx.merge(trainer.graphdef, state.trainable, trainer.frozen),
                                                   nnx.Param)))
    changed = {p for p, v in params.items() if not np.array_equal(np.asarray(v.value), np.asarray(trained[p].value))}
    assert changed and changed <= set(decoder), sorted(changed - set(decoder))[:3]
    config.train.trainable = (".*",)
    whole = AutoencoderTrainer(config, tiny_pipe.vae)
    assert whole.frozen_count == 0 and whole.trainable_count == sum(v.size for v in params.values())


def test_the_stream_gives_every_frame_s_subject_mask_when_asked():
    from vdjax.data.moving_shapes import MovingShapes
    from vdjax.train.feed import BatchStream

    source = MovingShapes(4, num_frames=3, size=16)
    stream = BatchStream(source, global_batch=2, seed=0, tokenize=lambda c: np.zeros((len(c), 77)),
                         process_index=0, process_count=1, with_frame_masks=True)
    batch = next(stream)
    assert "mask" not in batch and batch["frame_masks"].shape == (2, 3, 16, 16)
    rows = stream._indices(0)
    np.testing.assert_array_equal(batch["frame_masks"], np.stack([source[int(i)]["mask"] for i in rows]))
    assert "frame_masks" not in next(BatchStream(source, global_batch=2, seed=0, tokenize=stream.tokenize))


def test_a_mesh_that_does_not_fit_the_devices_is_refused():
    # A batch that does not split over the mesh is checked on 8 devices in the sharded test below.
    from vdjax import parallel
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh({"data": 4, "fsdp": 4})
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        parallel.make_mesh({"data": -1, "fsdp": -1})


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
pipe = T2VPipeline.from_converted(sys.argv[2])
results = {}
for name, shape, devices in [("d2t2f2", {"data": 2, "tensor": 2, "fsdp": 2}, None)]:
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
report = {"devices": len(jax.devices())}
for name in ("d2t2f2",):
    losses, params = results[name]
    np.savez(sys.argv[3] + "/" + name + ".npz", *params)
    report[name] = {"losses": losses, "bad_batch": results[name + "_bad_batch"]}
print(json.dumps(report))
"""


def test_sharded_steps_equal_the_single_device_step(trainer, tiny_folder, tmp_path):
    """8 fake CPU devices: data=2 x tensor=2 x fsdp=2 (every mesh axis at once) against one device (this process), two
    steps. The same math in another order of float32 sums: we require 1e-5 on the loss and on the parameters."""
    state, ref_losses = trainer.init(0), []  # the module's trainer: tiny_folder's weights
    for i in range(2):
        state, m = trainer.step(state, _batch(i, n=8))
        ref_losses.append(float(m["loss"]))
    ref_params = [np.asarray(x) for x in jax.tree.leaves(state.trainable)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED, SPEC, tiny_folder, str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    for name in ("d2t2f2",):
        params = np.load(tmp_path / f"{name}.npz")
        loss_diff = max(abs(a - b) for a, b in zip(report[name]["losses"], ref_losses))
        param_diff = max(float(np.max(np.abs(params[f"arr_{i}"] - p))) for i, p in enumerate(ref_params))
        print(f"{name}: loss diff {loss_diff:.2e}, parameter diff {param_diff:.2e}")
        assert loss_diff <= 1e-5 and param_diff <= 1e-5
        assert "not divisible" in report[name]["bad_batch"]


def test_every_host_gets_its_own_rows_of_the_same_global_batch():
    from vdjax.train.feed import BatchStream

    source = [{"video": np.full((2, 4, 4, 3), i, np.uint8), "caption": f"clip {i}"} for i in range(10)]
    kw = dict(global_batch=4, seed=3, tokenize=lambda captions: [[len(c)] for c in captions], caption_dropout=0.5)
    one = BatchStream(source, process_index=0, process_count=1, **kw)
    hosts = [BatchStream(source, process_index=i, process_count=2, **kw) for i in range(2)]
    for _ in range(5):
        whole, parts = next(one), [next(h) for h in hosts]
        for key in ("video", "input_ids"):
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
        assert not np.array_equal(parts[0]["video"], parts[1]["video"])


def test_the_loop_keeps_one_step_in_flight_so_sigterm_is_seen_at_once(trainer, tmp_path, monkeypatch):
    """Steps dispatch asynchronously. A loop that ran ahead to its next log point would then wait in XLA (where
    Python runs no signal handler) for up to log_every steps, past a preempted VM's grace period: the SIGTERM of
    a 50-step log interval took 2 minutes to be seen in a demo run. The loop must have waited for step k-2 by the
    time it takes batch k."""
    from vdjax.train.loop import train

    losses, real_step = [], trainer.step

    def recording_step(state, batch):
        state, metrics = real_step(state, batch)
        losses.append(metrics["loss"])
        return state, metrics

    def batches():
        for k in range(100):
            if k >= 2:
                assert losses[k - 2].is_ready(), f"batch {k} taken before step {k - 2} finished"
            yield _batch(k % 2)

    monkeypatch.setattr(trainer, "step", recording_step)
    monkeypatch.setitem(trainer.config.train, "log_every", 1000)
    monkeypatch.setitem(trainer.config.train, "checkpoint_every", 1000)
    train(trainer, str(tmp_path), batches(), num_steps=12)
    assert len(losses) == 12


def test_a_workdir_of_another_config_is_refused(tmp_path):
    from vdjax.train.checkpoints import Checkpoints

    cfg = load_config(SPEC)
    Checkpoints(str(tmp_path), cfg)
    Checkpoints(str(tmp_path), cfg)  # the same config resumes
    cfg.schedule.beta_end = 0.02
    with pytest.raises(ValueError, match="another model config.*schedule"):
        Checkpoints(str(tmp_path), cfg)


def test_a_tiny_model_overfits_one_moving_shapes_clip(trainer):
    """Same clip and caption every step (timesteps and noise still random): the loss must fall by at least 1.5x
    within 60 steps — measured 1.8x (printed)."""
    from vdjax.data.moving_shapes import make_clip

    clip = make_clip(0, num_frames=4, size=32)
    video = np.repeat(clip["video"][None].astype(np.float32) / 127.5 - 1.0, 2, axis=0)
    batch = {"video": video, "input_ids": np.ones((2, 77), np.int32)}
    state = trainer.init(1)
    losses = []
    for _ in range(60):
        state, m = trainer.step(state, batch)
        losses.append(float(m["loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"overfit: loss {first:.3f} -> {last:.3f} ({first / last:.1f}x)")
    assert first / last >= 1.5
