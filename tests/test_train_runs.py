"""launch/train.py's runs on the tiny model: metrics, summaries and samples; a killed run resumes to the same
parameters; SIGTERM saves and exits; two processes equal one; --checkpoint builds the model --config describes;
the TPU launcher's dry run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, TRAIN_SPEC as SPEC, load_config
from vdjax.pipelines.t2v import T2VPipeline


def _train_cmd(workdir, tiny_folder, steps, *extra):
    return [sys.executable, "launch/train.py", f"--config={SPEC}", f"--workdir={workdir}", f"--checkpoint={tiny_folder}",
            f"--num_steps={steps}", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
            "--config.data.num_frames=4", *extra]


def _final_params(workdir, step=None):
    """The parameters of the last (or the given) checkpoint, restored onto this process's one device."""
    import orbax.checkpoint as ocp

    ckpt = os.path.join(workdir, "checkpoints")
    step = step or max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    path = os.path.join(ckpt, str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    return step, checkpointer.restore(path, target)


def _wait_for(predicate, proc, timeout=300):
    import time

    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def clean_run(tiny_folder, tmp_path_factory):
    """An uninterrupted 8-step run on one process, with a (short) sample video at step 8."""
    workdir = tmp_path_factory.mktemp("clean")
    clean = subprocess.run(_train_cmd(workdir, tiny_folder, 8, "--config.train.sample_every=8",
                                      "--config.sample.steps=2", "--config.sample.num_frames=4"),
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    return workdir


def test_a_run_writes_metrics_summaries_and_samples(clean_run):
    metrics = [json.loads(line) for line in (clean_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all({"loss", "grad_norm", "lr", "steps_per_s", "examples_per_s"} <= set(m) for m in metrics)
    events = list((clean_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from vdjax.io.video import read_video
    video = read_video(str(clean_run / "samples" / "step_0000008.gif"))
    assert video.shape == (4, 32, 32, 3)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_parameters(clean_run, tiny_folder, tmp_path):
    """SIGKILL after the step-4 checkpoint, restart: the final parameters equal an uninterrupted run's."""
    import signal

    steps = 8
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(workdir, tiny_folder, steps), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: (workdir / "checkpoints" / "4").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_train_cmd(workdir, tiny_folder, steps), cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    (step_a, a), (step_b, b) = _final_params(clean_run), _final_params(workdir)
    assert step_a == step_b == steps
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(clean_run, tiny_folder, tmp_path):
    """Two processes on 127.0.0.1 (jax.distributed, one CPU device each, data axis 2) train 4 steps, each host
    feeding only its half of every global batch of 2: the parameters equal the one-process run's (which feeds both
    rows) to 1e-5 — the same math with the batch mean summed across devices in another order. Had both hosts fed
    the same rows, the gradients, and so the parameters, would differ by far more."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "two_hosts"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(_train_cmd(workdir, tiny_folder, 4, "--distributed", f"--coordinator=127.0.0.1:{port}",
                                         "--num_processes=2", f"--process_id={i}"),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "devices: 2 on 2 host(s)" in outputs[0]
    (step_a, a), (step_b, b) = _final_params(clean_run, 4), _final_params(workdir)
    assert step_a == step_b == 4
    diff = max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)
    print(f"two processes vs one: max parameter difference {diff:.2e}")
    assert diff <= 1e-5


def test_sigterm_saves_at_the_current_step_and_exits_cleanly(tiny_folder, tmp_path):
    import signal

    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(_train_cmd(workdir, tiny_folder, 1000, "--config.train.checkpoint_every=1000"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    step, _ = _final_params(workdir)
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert step == last_logged and 3 <= step < 1000


def _params(model):
    return {path: np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_a_checkpoint_loads_into_the_model_the_config_describes(tiny_pipe, tiny_folder, tmp_path):
    """launch/train.py --checkpoint builds what --config says and loads the folder's weights into it (before, the
    folder's config.json silently won, and --export then wrote --config's next to weights of another shape). A
    UNet of other widths is refused, naming the parameters, before any training; --init=unet starts it from scratch
    while the other parts still load."""
    from vdjax.convert.converted import CheckpointError

    cfg = load_config(SPEC)
    cfg.unet.norm_eps = 1e-3  # the same parameters, another model
    loaded = T2VPipeline.from_converted(tiny_folder, config=cfg)
    assert loaded.unet.config.norm_eps == 1e-3 and loaded.config.unet.norm_eps == 1e-3
    assert all(np.array_equal(v, _params(tiny_pipe.unet)[k]) for k, v in _params(loaded.unet).items())

    cfg.unet.block_out_channels = tuple(2 * c for c in cfg.unet.block_out_channels)
    with pytest.raises(CheckpointError, match=r"the unet the config describes does not fit.*conv_in\.kernel"):
        T2VPipeline.from_converted(tiny_folder, config=cfg)
    fresh = T2VPipeline.from_converted(tiny_folder, config=cfg, init=("unet",))
    assert fresh.unet.conv_in.kernel.shape[-1] == cfg.unet.block_out_channels[0]
    assert all(np.array_equal(v, _params(tiny_pipe.vae)[k]) for k, v in _params(fresh.vae).items())
    added = load_config(SPEC)
    added.unet.first_frame_attention = True  # I2V-Adapter's new projections, which an AnimateDiff folder lacks
    with pytest.raises(CheckpointError, match=r"to_q_ff.*absent\).*adds parameters the folder lacks: convert"):
        T2VPipeline.from_converted(tiny_folder, config=added)
    with pytest.raises(ValueError, match="no part unte"):
        T2VPipeline.from_converted(tiny_folder, init=("unte",))

    wide = f"--config.unet.block_out_channels=({','.join(map(str, cfg.unet.block_out_channels))})"
    result = subprocess.run(_train_cmd(tmp_path / "wide", tiny_folder, 1, wide), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and "--init=PART" in result.stderr and "conv_in.kernel" in result.stderr
    assert not (tmp_path / "wide" / "checkpoints").exists()


def test_tpu_launcher_dry_run_prints_the_command():
    result = subprocess.run(["bash", "launch/tpu/run.sh", "--dry-run", "my-tpu", "us-central2-b", "--", "python",
                             "launch/train.py", "--distributed"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--worker=all" in result.stdout and "launch/train.py" in result.stdout
