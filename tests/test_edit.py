"""Editing (vdjax/pipelines/edit.py) on a tiny random text-to-video model: DDIM inversion + regeneration
reconstructs the source, latent blending keeps the region outside the mask on the inversion trajectory, and the bad
inputs (masks of another size, empty, soft, per frame; short and long videos) fail or are fixed with a message.

MagDiff's editing (subject image and mask as conditions) is tested in tests/test_magdiff.py.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config

SIZE, FRAMES = 16, 4


@pytest.fixture(scope="module")
def pipe():
    """The tiny text-to-video model with random weights (every parameter drawn with numpy: T2VPipeline.random_init
    compiles an initialiser per parameter shape, ~10x slower), latents scaled to about unit variance (as SD's VAE
    scaling factor does for its VAE)."""
    from flax import nnx

    from conftest import randomize_nnx
    from vdjax.layers.primitives import InitKeys
    from vdjax.pipelines.t2v import T2VPipeline, build_part

    config = load_config("configs/animatediff_sd15.py:variant=tiny_v2")
    config.sample.update(num_frames=FRAMES, height=SIZE, width=SIZE)
    config.vae.scaling_factor = 2.5  # this random VAE's latents have std 0.38
    parts = {}
    for seed, part in enumerate(T2VPipeline.PARTS):
        parts[part] = nnx.eval_shape(lambda: build_part(part, config, InitKeys(0)))
        randomize_nnx(parts[part], seed=seed)
    return T2VPipeline(config, **parts)


@pytest.fixture(scope="module")
def source():
    from vdjax.data.moving_shapes import make_clip

    clip = make_clip(3, num_frames=FRAMES, size=SIZE, seed=0)
    return clip["video"], clip["mask"][0]


def relative(out) -> float:
    return float(np.linalg.norm(out.latents - out.source_latents) / np.linalg.norm(out.source_latents))


def test_same_prompt_eta_0_reconstructs_the_source_latents(pipe, source):
    """Same prompt, eta 0, no guidance: the regeneration retraces the inversion. The random UNet changes fast with
    its input, so plain DDIM inversion (the model at the latent it leaves) does not retrace; with fixed-point
    iterations (the model at the latent it arrives at) it does. Another prompt or eta 1 does not reconstruct."""
    from vdjax.pipelines.edit import edit_video

    video, _ = source
    prompt = "a red circle moving right"
    run = lambda **kw: edit_video(pipe, video, prompt, steps=10, guidance_scale=1.0, **kw)
    outs = dict(plain=run(inversion_iterations=0), fixed4=run(inversion_iterations=4),
                fixed8=run(inversion_iterations=8),
                other_prompt=run(inversion_iterations=8, source_prompt="a blue square flying up"),
                eta1=run(inversion_iterations=8, eta=1.0))
    errors = {name: relative(out) for name, out in outs.items()}
    fixed = outs["fixed8"]
    print(f"edit reconstruction, 10 steps, relative L2 error of the latents (source std "
          f"{fixed.source_latents.std():.2f}): " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()) +
          f"; max abs fixed8 {np.abs(fixed.latents - fixed.source_latents).max():.4f}")
    assert errors["fixed8"] < 0.02 and errors["fixed8"] < errors["fixed4"]
    assert errors["plain"] > 10 * errors["fixed8"]  # the check can fail: plain inversion with this model
    assert errors["other_prompt"] > 10 * errors["fixed8"] and errors["eta1"] > 10 * errors["fixed8"]
    assert fixed.frames.shape == (1, FRAMES, SIZE, SIZE, 3) and fixed.frames.dtype == np.uint8
    assert fixed.trajectory.shape == (10, *fixed.source_latents.shape)


def test_blending_keeps_outside_the_mask_on_the_inversion_trajectory(pipe, source):
    """Another prompt: outside the mask the final latents are the source's exactly, inside they change; the sampler
    puts the trajectory's latent at each step's landing timestep outside the mask (checked at every step)."""
    from vdjax.diffusion.sampler import ddim_invert, ddim_loop
    from vdjax.pipelines.edit import edit_video, latent_mask

    video, mask = source
    calls = []
    out = edit_video(pipe, video, "a blue square flying up", source_prompt="a red circle moving right", steps=10,
                     guidance_scale=1.0, blend_mask=mask, inversion_progress=lambda i, n: calls.append((i, n)))
    assert sorted(calls) == [(i, 10) for i in range(1, 11)]
    inside = np.broadcast_to(latent_mask(mask, FRAMES, SIZE, SIZE, pipe.vae.downsampling_factor), out.latents.shape)
    assert 0 < inside.mean() < 1
    assert np.array_equal(out.latents[~inside], out.source_latents[~inside])
    assert np.abs(out.latents[inside] - out.source_latents[inside]).max() > 0.1
    assert not np.array_equal(out.frames, edit_video(pipe, video, "a blue square flying up", steps=10,
                                                     guidance_scale=1.0, source_prompt="a red circle moving right").frames)

    # Every step, with a cheap model: the state outside the mask is the inversion's latent at that step's timestep.
    seen = []
    denoise = lambda x, t, c: jnp.tanh(x + c) * (t[:, None, None, None, None] / 1000.0)
    x0 = jnp.asarray(out.source_latents)
    ts = pipe.timesteps(10)
    c = jnp.float32(0.3)
    x_T, path = ddim_invert(denoise, x0, ts, pipe.schedule, context=c, return_trajectory=True)
    where = jnp.asarray(~inside)
    targets = jnp.concatenate([path[1:], x0[None]])

    def recording(x, t, c):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), x)
        return denoise(x, t, -c)  # another condition: inside the mask the latents leave the trajectory
    final = jax.jit(lambda x: ddim_loop(recording, x, ts, pipe.schedule, context=c, keep=(where, targets)))(x_T)
    assert len(seen) == 10
    for i in range(1, 10):  # the model's input at step i is the state after step i - 1
        assert np.array_equal(seen[i][~inside], np.asarray(path[i])[~inside]), i
        assert np.abs(seen[i][inside] - np.asarray(path[i])[inside]).max() > 1e-3, i
    assert np.array_equal(np.asarray(final)[~inside], out.source_latents[~inside])


@pytest.mark.parametrize("use_scale,set_alpha_to_one", [(False, True), (True, False)])
def test_fixed_point_inversion_retraces_the_sampler(use_scale, set_alpha_to_one):
    """ddim_invert(fixed_point_iterations=k) inverts ddim_loop's eta-0 steps of a model that plain inversion
    cannot follow; fixed_first_frame keeps frame 0 clean in both (I2V-Adapter). Also with VideoCrafter's
    per-timestep latent scale (use_scale, scale_b 0.7 as t2v_512_v2 and i2v_512_v1; its final alpha)."""
    from vdjax.diffusion.sampler import ddim_invert, ddim_loop
    from vdjax.diffusion.schedules import Schedule, timesteps

    schedule = Schedule.create(beta_schedule="scaled_linear", use_scale=use_scale, scale_b=0.7)
    ts = timesteps(schedule, 10, spacing="leading", steps_offset=1)
    kw = dict(context=0.5, set_alpha_to_one=set_alpha_to_one)
    denoise = lambda x, t, c: jnp.sin(x + c)  # O(1) changes with x
    x0 = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, 2))

    def roundtrip(k, first):
        x_T = ddim_invert(denoise, x0, ts, schedule, fixed_point_iterations=k, fixed_first_frame=first, **kw)
        if first:
            assert np.array_equal(x_T[:, 0], x0[:, 0])
        return float(jnp.abs(ddim_loop(denoise, x_T, ts, schedule, fixed_first_frame=first, **kw) - x0).max())
    plain, fixed_first = roundtrip(0, False), roundtrip(20, True)
    print(f"use_scale={use_scale}: sampler after inversion, max abs error {plain:.2f} plain, {fixed_first:.1e} "
          "with 20 fixed-point iterations")
    assert fixed_first < 1e-4 and plain > 0.1, (plain, fixed_first)


def test_bad_inputs(pipe, source, caplog, tmp_path):
    from PIL import Image

    from vdjax.io.mask import fit_mask, read_mask, subject_image
    from vdjax.io.video import read_video, write_video
    from vdjax.pipelines.edit import edit_video, latent_mask, select_frames, source_frames

    video, mask = source
    # A mask of another size: fitted (centred crop to the aspect ratio, resize) with a log line.
    with caplog.at_level(logging.WARNING):
        big = fit_mask(np.kron(mask, np.ones((4, 6), np.uint8)) * 255, SIZE, SIZE)  # 64 x 96 uint8 0/255
    assert f"mask 96x64 fitted to the frame size {SIZE}x{SIZE}" in caplog.text
    assert big.dtype == bool and big.shape == (SIZE, SIZE) and (big == mask.astype(bool)).mean() > 0.9
    # Non-binary: thresholded at 0.5, float or uint8.
    np.testing.assert_array_equal(fit_mask(mask * 0.6 + 0.1, SIZE, SIZE), mask > 0)
    np.testing.assert_array_equal(fit_mask((mask * 100 + 100).astype(np.uint8), SIZE, SIZE), mask > 0)
    # Per frame: leading dims kept; frames follow the video's selection.
    per_frame = np.stack([mask, np.roll(mask, 2, axis=1)])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert fit_mask(per_frame, 8, 8).shape == (2, 8, 8)
        assert not fit_mask(np.stack([mask, 0 * mask]), SIZE, SIZE)[1].any()  # a frame without the subject
    assert caplog.text.count("fitted to the frame size 8x8") == 1 and "mask frames [1] have no subject" in caplog.text
    with pytest.raises(ValueError, match="no subject in any of its 2 frames"):
        fit_mask(0 * per_frame, SIZE, SIZE)
    assert latent_mask(select_frames(per_frame, FRAMES, loop=True, what="blend mask"), FRAMES, SIZE, SIZE,
                       2).shape == (1, FRAMES, SIZE // 2, SIZE // 2, 1)
    with pytest.raises(ValueError, match="blend mask has 2 frames and the model makes 4"):
        edit_video(pipe, video, "x", blend_mask=per_frame, steps=2)
    # Empty: a clear error, before any compute.
    with pytest.raises(ValueError, match="the mask is empty: no subject.*white on black"):
        fit_mask(np.zeros((SIZE, SIZE), np.float32), SIZE, SIZE)
    with pytest.raises(ValueError, match="the mask is empty"):
        edit_video(pipe, video, "x", blend_mask=np.zeros_like(mask), steps=2)
    with pytest.raises(ValueError, match="the mask is empty"):  # a tiny subject lost in the resize
        fit_mask(np.pad(np.ones((1, 1)), ((40, 40), (40, 40))) * 0.4, SIZE, SIZE)
    # Mask files of any mode.
    for mode in ("L", "RGB", "RGBA", "1", "I;16"):
        path = tmp_path / f"mask_{mode.replace(';', '')}.png"
        Image.fromarray((mask * 255).astype(np.uint8)).convert(mode).save(path)
        np.testing.assert_array_equal(fit_mask(read_mask(str(path)), SIZE, SIZE), mask > 0, err_msg=mode)
    moving = np.stack([np.roll(mask, i, axis=1) for i in range(3)]) * 255
    write_video(np.repeat(moving[..., None], 3, -1), str(tmp_path / "masks"))  # a folder of PNGs
    write_video(np.repeat(moving[..., None], 3, -1), str(tmp_path / "masks.gif"))
    for path in ("masks", "masks.gif"):  # one mask per frame
        np.testing.assert_array_equal(fit_mask(read_mask(str(tmp_path / path)), SIZE, SIZE), moving > 0)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable mask"):
        read_mask(str(tmp_path / "bad.png"))
    cut = subject_image(video[0], mask > 0)
    assert cut.dtype == np.uint8 and not cut[mask == 0].any() and np.array_equal(cut[mask > 0], video[0][mask > 0])
    # Videos: shorter refused (or looped), longer cut, with messages.
    with pytest.raises(ValueError, match="has 2 frames and the model makes 4.*loop_short_video"):
        edit_video(pipe, video[:2], "x", steps=2)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        looped = source_frames(video[:3], 5, loop=True)
        first = source_frames(np.concatenate([video, video]), 3)
    np.testing.assert_array_equal(looped, video[[0, 1, 2, 0, 1]])
    np.testing.assert_array_equal(first, video[:3])
    assert "looped to 5" in caplog.text and "its first 3 are edited" in caplog.text
    with pytest.raises(ValueError, match=r"uint8 \(frames, H, W, 3\)"):
        source_frames(video[0], 4)
    # Reading videos: a folder of gray + alpha frames, 16-bit frames; one image, frames of two sizes refused.
    (tmp_path / "frames").mkdir()
    Image.fromarray(video[0]).convert("LA").save(tmp_path / "frames" / "0.png")
    Image.fromarray((video[1, ..., 0].astype(np.uint16) * 257)).save(tmp_path / "frames" / "1.png")
    read = read_video(str(tmp_path / "frames"))
    assert read.shape == (2, SIZE, SIZE, 3) and read.dtype == np.uint8
    np.testing.assert_array_equal(read[1], np.repeat(video[1, ..., :1], 3, -1))
    with pytest.raises(ValueError, match="a single image"):
        read_video(str(tmp_path / "frames" / "0.png"))
    Image.fromarray(video[0, :8]).save(tmp_path / "frames" / "2.png")
    with pytest.raises(ValueError, match="frames of different sizes"):
        read_video(str(tmp_path / "frames"))
    # Settings.
    with pytest.raises(ValueError, match="strength"):
        edit_video(pipe, video, "x", steps=2, strength=1.5)
    with pytest.raises(ValueError, match="2 negative prompts; an edit takes one"):
        edit_video(pipe, video, "x", steps=2, negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="inversion_iterations"):
        edit_video(pipe, video, "x", steps=2, inversion_iterations=-1)


def test_launch_sample_checks_editing_flags_before_compute(tmp_path, source):
    """launch/sample.py --video/--mask: bad editing flags are usage errors, before any weights are built."""
    from PIL import Image

    from vdjax.io.video import write_video

    video, mask = source
    write_video(video[:2], str(tmp_path / "short.gif"))
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "empty.png")
    base = [sys.executable, "launch/sample.py", "--config=configs/animatediff_sd15.py:variant=tiny_v2",
            "--random_init", "--prompt=x", f"--output={tmp_path / 'o.gif'}", "--num_frames=4"]
    cases = {
        "has 2 frames and the model makes 4": [f"--video={tmp_path / 'short.gif'}"],
        "the mask is empty: no subject": [f"--video={tmp_path / 'short.gif'}", "--loop_short_video",
                                          f"--mask={tmp_path / 'empty.png'}"],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this tree's
    for message, args in cases.items():
        run = subprocess.run(base + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
        assert "weights: random" not in run.stdout  # refused before building the model
