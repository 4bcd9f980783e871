"""VideoCrafter through vdjax's pipelines: the T2V sampler's wiring (VideoCrafter's timestep rule, final alpha,
latent scale and fps) against a hand-written DDIM loop on the upstream-checked UNet, and I2V end to end."""
from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, load_config, max_abs_error
from upstream_cases import case as case_lib
from vdjax.convert import ldm
from vdjax.convert.keymap import load_params
from vdjax.diffusion import ddim, schedules
from vdjax.pipelines.i2v import I2VPipeline
from vdjax.pipelines.t2v import T2VPipeline

FIXTURES = ROOT / "tests" / "fixtures" / "upstream"


def test_t2v_sampler_equals_a_hand_written_videocrafter_loop():
    """tiny_t2v_1024_v1 has the sizes of the upstream t2v_1024_like case, whose weights (checked against upstream
    in test_upstream_fixtures) drive both loops; eta 0, guidance 3, 4 steps, float32: 1e-4 (O(1) latents)."""
    pipe = T2VPipeline.random_init(load_config("configs/videocrafter.py:variant=tiny_t2v_1024_v1"))
    case = case_lib.load(FIXTURES / "videocrafter_unet" / "t2v_1024_like", FIXTURES)
    load_params(pipe.unet, case.weights(), ldm.unet_key(pipe.unet.config), source=str(case.path))
    pipe.set_unet(pipe.unet)
    rng = np.random.default_rng(0)
    x_T = jnp.asarray(rng.normal(0, 0.1, (2, 4, 8, 8, 4)), jnp.float32)
    context, uncond = (jnp.asarray(rng.normal(0, 1, (2, 77, 32)), jnp.float32) for _ in range(2))
    got = pipe.sample_latents(x_T, context, uncond, steps=4, guidance_scale=3.0, eta=0.0, key=jax.random.key(0))

    ts = schedules.timesteps(pipe.schedule, 4, "videocrafter")
    fps = jnp.full((2,), pipe.config.sample.fps)
    x = x_T
    for t, t_prev in zip(ts, schedules.previous_timesteps(ts)):
        t_b = jnp.full((2,), t)
        e = ddim.guidance(pipe.unet(x, t_b, uncond, fps=fps), pipe.unet(x, t_b, context, fps=fps), 3.0)
        x, _ = ddim.ddim_step(pipe.schedule, e, t, t_prev, x, eta=0.0, set_alpha_to_one=False)
    assert pipe.schedule.scale_arr is not None  # t2v_1024's use_scale (fix_scale_bug, scale_b 0.3)
    error = max_abs_error(got, x)
    print(f"pipeline vs hand-written loop: {error:.2e} (latent std {float(jnp.std(x)):.2f})")
    assert error <= 1e-4 * max(1.0, float(jnp.std(x)))


@pytest.fixture(scope="module")
def i2v():
    return I2VPipeline.random_init(load_config("configs/videocrafter.py:variant=tiny_i2v_512_v1"))


def test_i2v_samples_from_an_image_of_another_size(i2v):
    image = np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    out = i2v(["a red square moving right", "a blue circle"], image=image)
    assert out.frames.shape == (2, 4, 32, 48, 3) and out.frames.dtype == np.uint8
    assert np.isfinite(out.latents).all()
    tokens = i2v.image_tokens(jnp.zeros((1, 32, 48, 3)))
    assert tokens.shape == (1, i2v.config.image_proj.num_queries, i2v.config.unet.cross_attention_dim)


def test_i2v_bad_input_says_what_to_do(i2v):
    with pytest.raises(ValueError, match="needs an input image"):
        i2v(["a cat"])
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        i2v(["a", "b"], image=np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        i2v(["a"], image=np.zeros((8, 8), np.float32))
    from vdjax.io.image import fit_image  # grayscale and RGBA are converted as PIL's convert('RGB') does
    gray = np.random.default_rng(3).integers(0, 256, (20, 30), dtype=np.uint8)
    rgba = np.concatenate([np.repeat(gray[..., None], 3, -1), np.zeros((20, 30, 1), np.uint8)], -1)
    np.testing.assert_array_equal(fit_image(gray, 16, 24), fit_image(rgba, 16, 24))
    t2v = load_config("configs/videocrafter.py:variant=tiny_t2v_512_v2")
    with pytest.raises(ValueError, match="no image cross-attention"):
        I2VPipeline(t2v, i2v.unet, i2v.vae, i2v.text_encoder, i2v.image_encoder, i2v.image_proj)


def test_sample_script_runs_i2v_from_a_released_layout_checkpoint(tmp_path):
    """End to end: a tiny I2V model.ckpt in VideoCrafter's layout (upstream key names, torch layouts, packed
    OpenCLIP projections, schedule buffers) -> launch/sample.py --model --image -> a video file."""
    import torch

    from test_videocrafter_convert import config, released_state_dict, tiny_models

    variant = "tiny_i2v_512_v1"
    ckpt = tmp_path / "model.ckpt"
    state = released_state_dict(tiny_models(variant), config(variant))
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()}}, ckpt)
    frame = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(frame)
    cmd = [sys.executable, "launch/sample.py", f"--config=configs/videocrafter.py:variant={variant}",
           f"--model={ckpt}", "--prompt=a cat", "--steps=2"]
    missing = subprocess.run(cmd + [f"--output={tmp_path / 'a.gif'}"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "give --image" in missing.stderr
    ok = subprocess.run(cmd + [f"--image={frame}", f"--output={tmp_path / 'b.gif'}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "weights: model=" in ok.stdout
    assert (tmp_path / "b.gif").stat().st_size > 0
