"""I2V-Adapter's sampling and training around the (upstream-checked) attention layers: the Frame Similarity Prior,
the clean first frame the sampler never touches, colour matching, and a trainer that only trains the adapter."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import load_config
from vdjax.diffusion import frame_prior
from vdjax.models.imaging import match_colors, rgb_to_lab
from vdjax.pipelines.i2v_adapter import I2VAdapterPipeline
from vdjax.train.step import Trainer

SPEC = "configs/i2v_adapter_sd15.py:variant=tiny"


def test_blur_equals_torchvision_gaussian_blur():
    """torchvision's GaussianBlur((9, 9), 18): a normalised outer-product kernel, reflect padding (written with
    torch's conv2d here, as torchvision is not a dependency)."""
    x = np.random.default_rng(0).normal(size=(2, 4, 16, 12)).astype(np.float32)
    k = np.exp(-0.5 * (np.linspace(-4, 4, 9) / 18.0) ** 2)
    k = torch.from_numpy(np.outer(k / k.sum(), k / k.sum())).float()[None, None].repeat(4, 1, 1, 1)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.from_numpy(x), (4,) * 4, mode="reflect"), k,
                                     groups=4).numpy()
    ours = np.asarray(frame_prior.gaussian_blur(jnp.asarray(x.transpose(0, 2, 3, 1)), 9, 18.0)).transpose(0, 3, 1, 2)
    assert np.abs(ours - ref).max() <= 1e-5


def test_frame_prior_keeps_frame_zero_and_mixes_the_rest():
    first = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
    x = frame_prior.degrade(jax.random.key(1), first, 6, keep_prob=0.3)
    np.testing.assert_array_equal(x[:, 0], first)
    blurred = frame_prior.gaussian_blur(first, 9, 18.0)[:, None]
    kept = np.isclose(x[:, 1:], first[:, None])
    assert np.all(kept | np.isclose(x[:, 1:], blurred))
    assert abs(kept.mean() - 0.3) < 0.02  # 15k elements: the keep fraction is p
    pipe_schedule = load_config(SPEC)  # any schedule: the tiny config's
    from vdjax.pipelines.t2v import make_schedule
    schedule = make_schedule(pipe_schedule.schedule)
    x_T = frame_prior.initial_latents(jax.random.key(2), first, 6, schedule, 999)
    np.testing.assert_array_equal(x_T[:, 0], first)
    a = float(schedule.alphas_cumprod[999])
    assert abs(float(jnp.std(x_T[:, 1:])) - np.sqrt(a * 1 + 1 - a)) < 0.05  # mostly noise at t=999


def test_colour_matching_moves_a_b_histograms_and_keeps_lightness():
    rng = np.random.default_rng(0)
    ref = rng.integers(60, 190, (24, 24, 3), dtype=np.uint8)  # mid-range: the tint stays in gamut
    tinted = (ref.astype(int) + [40, -20, -40]).astype(np.uint8)
    out = match_colors(tinted[None], ref)[0]
    lab_ref, lab_out, lab_tint = rgb_to_lab(ref), rgb_to_lab(out), rgb_to_lab(tinted)
    for ch in (1, 2):  # a*, b* distributions now follow the reference's
        before = np.abs(np.sort(lab_tint[..., ch].ravel()) - np.sort(lab_ref[..., ch].ravel())).mean()
        after = np.abs(np.sort(lab_out[..., ch].ravel()) - np.sort(lab_ref[..., ch].ravel())).mean()
        assert after < before / 3, (ch, before, after)
    assert np.abs(lab_out[..., 0] - lab_tint[..., 0]).mean() < 2.0  # lightness kept (gamut clipping aside)


@pytest.fixture(scope="module")
def pipe():
    return I2VAdapterPipeline.random_init(load_config(SPEC))


def test_the_sampler_never_changes_the_clean_first_frame(pipe):
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    shape = (1, 4, 4, 4, 4)
    x_T, context, uncond, start, _ = pipe.prepare(jax.random.key(0), shape, ["a cat"], [""], None, steps=4,
                                               image=image)
    assert context.shape == (1, 77 + 16, 32) and uncond.shape == context.shape and start == 0
    z = pipe.sample_latents(x_T, context, uncond, steps=4, guidance_scale=7.5, eta=0.0, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(z[:, 0]), np.asarray(x_T[:, 0]))
    assert not np.allclose(z[:, 1:], x_T[:, 1:])
    out = pipe(["a cat"], image=image)  # end to end: frame prior, loop, decode, colour matching
    assert out.frames.shape == (1, 4, 32, 32, 3)


def test_bad_input_says_what_to_do(pipe):
    with pytest.raises(ValueError, match="needs the first frame"):
        pipe(["a cat"])
    bad = load_config(SPEC)
    bad.unet.first_frame_attention = False
    with pytest.raises(ValueError, match="first_frame_attention"):
        I2VAdapterPipeline(bad, pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder, pipe.image_proj)


def test_training_trains_only_the_first_frame_attention(pipe):
    trainer = Trainer(pipe.config, pipe.unet, pipe.vae, pipe.text_encoder, image_encoder=pipe.image_encoder,
                      image_proj=pipe.image_proj)
    adapter = sum(v.size for p, v in nnx.to_flat_state(nnx.state(pipe.unet, nnx.Param))
                  if p[-2] in ("to_q_ff", "to_out_ff"))
    assert trainer.trainable_count == adapter > 0
    rng = np.random.default_rng(0)
    batch = {"video": rng.uniform(-1, 1, (2, 4, 32, 32, 3)).astype(np.float32),
             "input_ids": rng.integers(0, 49407, (2, 77)).astype(np.int32)}
    state = trainer.init(0)
    state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_a_zero_initialised_adapter_leaves_the_base_unet_unchanged():
    """to_out_ff at its zero init: the adapted UNet equals the base UNet (same other weights) exactly; with a
    random to_out_ff it does not."""
    from conftest import randomize_nnx
    from vdjax.models.unet3d import UNet3D
    from vdjax.layers.primitives import InitKeys

    cfg = load_config(SPEC).unet
    base_cfg = cfg.copy_and_resolve_references()
    base_cfg.first_frame_attention = False
    adapted, base = UNet3D(cfg, rngs=InitKeys(0)), UNet3D(base_cfg, rngs=InitKeys(0))
    randomize_nnx(base, seed=3)
    flat = dict(nnx.to_flat_state(nnx.state(adapted, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(base, nnx.Param)):
        flat[path].set_value(var.get_value())
    for path, var in flat.items():
        if "to_q_ff" in path:  # any value: its branch is multiplied by the zero to_out_ff
            var.set_value(jax.random.normal(jax.random.key(len(path)), var.shape))
    nnx.update(adapted, nnx.from_flat_state(flat))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 3, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(1, 77 + 16, 32)), jnp.float32)
    forward = nnx.jit(lambda model: model(x, 500, context))  # one compile per model; eager ran 3x longer
    np.testing.assert_array_equal(np.asarray(forward(adapted)), np.asarray(forward(base)))
    for path, var in flat.items():
        if "to_out_ff" in path:
            var.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), var.shape))
    nnx.update(adapted, nnx.from_flat_state(flat))
    assert float(jnp.max(jnp.abs(forward(adapted) - forward(base)))) > 1e-3


def test_first_frame_concat_gives_every_frame_the_clean_first_frame():
    """unet.first_frame_concat: the UNet equals a plain one of twice the input channels fed [x, x[:, :1]] (all
    weights random, the extra channels' included); at init those channels are zero; refused without a clean frame 0."""
    from conftest import randomize_nnx
    from vdjax.models.unet3d import UNet3D
    from vdjax.layers.primitives import InitKeys

    cfg = load_config(SPEC).unet
    cfg.first_frame_concat = True
    concat = UNet3D(cfg, rngs=InitKeys(0))
    kernel = np.asarray(concat.conv_in.kernel.get_value())
    assert kernel.shape[2] == 2 * cfg.in_channels and not kernel[:, :, cfg.in_channels:].any()
    assert np.abs(kernel[:, :, :cfg.in_channels]).max() > 0
    wide_cfg = cfg.copy_and_resolve_references()
    wide_cfg.update(first_frame_concat=False, in_channels=2 * cfg.in_channels)
    wide = UNet3D(wide_cfg, rngs=InitKeys(0))
    randomize_nnx(concat, seed=5)
    nnx.update(wide, nnx.state(concat, nnx.Param))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 3, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(1, 77 + 16, 32)), jnp.float32)
    got = nnx.jit(lambda m: m(x, 500, context))(concat)
    paired = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], x.shape)], axis=-1)
    want = nnx.jit(lambda m: m(paired, 500, context))(wide)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert float(jnp.max(jnp.abs(got - nnx.jit(lambda m: m(jnp.concatenate([x, x], -1), 500, context))(wide)))) > 1e-3
    cfg.first_frame_attention = False
    with pytest.raises(ValueError, match="first_frame_attention=True"):
        UNet3D(cfg, rngs=InitKeys(0))


@pytest.mark.parametrize("option", ["first_frame_concat", "first_frame_rotary"])
def test_a_model_without_an_addable_option_loads_into_a_config_with_it(pipe, tmp_path, option):
    """converted.load(config=...) with unet.first_frame_concat (or first_frame_rotary) over a folder saved without
    it: the same UNet, what the option adds at zero (a fine-tuning run's start, configs/demo.py:first_frame=...)."""
    from vdjax.convert import converted

    converted.save(str(tmp_path / "model"), pipe.config, {"unet": pipe.unet})
    cfg = load_config(SPEC)
    cfg.unet[option] = True
    _, models = converted.load(str(tmp_path / "model"), parts=["unet"], config=cfg)
    grown = models["unet"]
    assert grown.config[option]
    if option == "first_frame_concat":
        assert grown.conv_in.kernel.shape[2] == 2 * cfg.unet.in_channels
    else:
        frequencies = [v for path, v in nnx.to_flat_state(nnx.state(grown, nnx.Param))
                       if path[-1] == "rotary_frequencies"]
        assert frequencies and not any(np.asarray(f.get_value()).any() for f in frequencies)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 3, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(1, 77 + 16, 32)), jnp.float32)
    forward = lambda m: np.asarray(nnx.jit(lambda m: m(x, 500, context))(m))
    np.testing.assert_allclose(forward(grown), forward(pipe.unet), atol=1e-6)


def test_rotary_first_frame_attention_looks_by_offset():
    """first_frame_rotary: a query and a key of fixed content score by their grid offset alone; with frequencies at
    zero (their init) the branch is I2V-Adapter's, with others it is not; odd head widths and a missing grid width
    are refused."""
    from vdjax.layers.attention import FirstFrameAttention, rotate_2d
    from vdjax.layers.primitives import InitKeys
    from vdjax.models.unet3d import UNet3D

    frequencies = jax.random.normal(jax.random.key(0), (2, 2, 4))
    q = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 1, 2, 16)), (1, 12, 2, 16))  # one content
    k = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (1, 1, 2, 16)), (1, 12, 2, 16))  # at all 3 x 4 cells
    logits = np.asarray(jnp.einsum("bihd,bjhd->bhij", rotate_2d(q, frequencies, 4), rotate_2d(k, frequencies, 4)))
    same_offset = [(0, 5), (1, 6), (2, 7), (6, 11)]  # (dy, dx) = (1, 1)
    np.testing.assert_allclose([logits[0, :, i, j] for i, j in same_offset], [logits[0, :, 0, 5]] * 4, atol=1e-5)
    assert np.abs(logits[0, :, 0, 5] - logits[0, :, 0, 1]).max() > 1e-2  # (1, 1) against (0, 1)
    np.testing.assert_array_equal(np.asarray(rotate_2d(q, jnp.zeros_like(frequencies), 4)), np.asarray(q))

    rotary = FirstFrameAttention(32, 2, 16, rotary=True, rngs=nnx.Rngs(0))
    plain = FirstFrameAttention(32, 2, 16, rngs=nnx.Rngs(0))
    for module in (rotary, plain):  # the branch's output projection starts at zero: make it count
        module.to_out_ff.kernel.set_value(jax.random.normal(jax.random.key(4), module.to_out_ff.kernel.shape))
    x = jax.random.normal(jax.random.key(3), (4, 12, 32))  # 2 clips of 2 frames, 3 x 4 tokens
    np.testing.assert_array_equal(np.asarray(rotary(x, clips=2, width=4)), np.asarray(plain(x, clips=2)))
    rotary.rotary_frequencies.set_value(frequencies)
    assert float(jnp.abs(rotary(x, clips=2, width=4) - plain(x, clips=2)).max()) > 1e-2
    with pytest.raises(ValueError, match="width"):
        rotary(x, clips=2)
    with pytest.raises(ValueError, match="divides by 4"):
        FirstFrameAttention(36, 2, 18, rotary=True, rngs=nnx.Rngs(0))
    cfg = load_config(SPEC).unet
    cfg.update(first_frame_rotary=True, first_frame_attention=False)
    with pytest.raises(ValueError, match="needs first_frame_attention=True"):
        UNet3D(cfg, rngs=InitKeys(0))


def test_frame_prior_with_p_1_at_the_last_timestep_is_plain_noising():
    from vdjax.pipelines.t2v import make_schedule

    schedule = make_schedule(load_config(SPEC).schedule)
    first = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    key = jax.random.key(5)
    x = frame_prior.initial_latents(key, first, 5, schedule, 999, keep_prob=1.0)
    noise = jax.random.normal(jax.random.split(key)[1], (2, 5, 8, 8, 4))
    a = float(schedule.alphas_cumprod[999])
    expected = (np.sqrt(a) * first[:, None] + np.sqrt(1 - a) * noise).at[:, 0].set(first)
    np.testing.assert_allclose(np.asarray(x), np.asarray(expected), atol=1e-6)


def _train_config(spec: str, **train):
    config = load_config(spec)
    config.train.update(train)
    return config


def test_training_on_the_frame_prior_path_meets_the_sampler_at_every_step(pipe):
    """train.frame_prior_path: the UNet's training input at the timestep t0 that config.sample's Frame Similarity
    Prior starts from (keep_prob 1) is the sampler's start, and DDIM steps that take the training targets as the
    model's output pass through the training inputs at every later timestep and end on the clip's latents; plain
    training's input at t0 is another point. Timesteps are drawn in [0, t0]; settings that cannot work are refused."""
    from vdjax.diffusion.ddim import ddim_step

    steps, start = 10, 3
    ts = pipe.timesteps(steps)
    t0 = int(ts[start])
    config = _train_config(SPEC, frame_prior_path=True)
    config.sample.update(steps=steps)
    config.sample.frame_prior.update(start_step=start, keep_prob=1.0)
    parts = dict(image_encoder=pipe.image_encoder, image_proj=pipe.image_proj)
    trainer = Trainer(config, pipe.unet, pipe.vae, pipe.text_encoder, **parts)
    assert trainer.frame_prior_timestep == t0
    z = jax.random.normal(jax.random.key(0), (2, 5, 8, 8, config.unet.in_channels))
    key = jax.random.key(1)
    x = frame_prior.initial_latents(key, z[:, 0], 5, pipe.schedule, t0, keep_prob=1.0)
    noise = jax.random.normal(jax.random.split(key)[1], z.shape)  # the noise initial_latents drew
    plain, _ = Trainer(pipe.config, pipe.unet, pipe.vae, pipe.text_encoder, **parts).diffuse(z, noise, jnp.full(2, t0))
    assert float(jnp.max(jnp.abs(plain - x))) > 0.5
    for t, t_prev in zip(ts[start:], pipe.previous_timesteps(ts, steps)[start:]):
        noisy, target = trainer.diffuse(z, noise, jnp.full(2, t))
        np.testing.assert_allclose(np.asarray(x), np.asarray(noisy), atol=1e-5, err_msg=f"t={t}")
        x, _ = ddim_step(pipe.schedule, target, t, t_prev, x, set_alpha_to_one=config.schedule.set_alpha_to_one)
        x = x.at[:, 0].set(z[:, 0])  # the sampler's fixed first frame
    np.testing.assert_allclose(np.asarray(x), np.asarray(z), atol=1e-4)

    drawn = trainer.draw_timesteps(jax.random.key(2), 4096)
    assert int(drawn.max()) == t0 and int(drawn.min()) == 0
    for change, message in [(dict(keep_prob=0.5), "keep_prob=0.5, but only the undegraded"),
                            (dict(start_step=steps), "start_step=10; use 0 to 9"),
                            (dict(enabled=False), "this config has none")]:
        bad = _train_config(SPEC, frame_prior_path=True)
        bad.sample.update(steps=steps)
        bad.sample.frame_prior.update(start_step=start, keep_prob=1.0)
        bad.sample.frame_prior.update(change)
        with pytest.raises(ValueError, match=message):
            Trainer(bad, pipe.unet, pipe.vae, pipe.text_encoder, **parts)
    for change, message in [(dict(max_timestep=700), "leave train.max_timestep at 0"),
                            (dict(first_frame_clean=False), "this config has none")]:
        bad = _train_config(SPEC, frame_prior_path=True)
        bad.sample.frame_prior.keep_prob = 1.0
        bad.train.update(change)
        with pytest.raises(ValueError, match=message):
            Trainer(bad, pipe.unet, pipe.vae, pipe.text_encoder, **parts)


def test_sampling_a_path_trained_model_off_its_path_is_noted(pipe):
    """launch/sample.py prints frame_prior.off_path_note: a model trained with train.frame_prior_path (its config:
    10 steps, the prior from step 3) sampled from another start timestep, or degraded, is told the settings that
    start on its path; the same start (other step counts included) and models trained otherwise get no note."""
    trained = _train_config(SPEC, frame_prior_path=True)
    trained.sample.update(steps=10)
    trained.sample.frame_prior.update(start_step=3, keep_prob=1.0)
    note = lambda model, sample: frame_prior.off_path_note(model, sample, pipe.timesteps)
    assert note(trained, trained.sample) is None
    assert note(pipe.config, pipe.config.sample) is None  # not trained on the path
    t0 = int(pipe.timesteps(10)[3])
    same_start = trained.sample.copy_and_resolve_references()
    same_start.steps = 20
    same_start.frame_prior.start_step = int(np.flatnonzero(pipe.timesteps(20) == t0)[0])
    assert note(trained, same_start) is None
    # start_step=10 is out of range: noted, not raised (the sampler's argument check reports it as a usage error)
    for change in (dict(start_step=4), dict(start_step=10), dict(keep_prob=0.9), dict(enabled=False)):
        other = trained.sample.copy_and_resolve_references()
        other.frame_prior.update(change)
        assert note(trained, other) == (
            f"this model was trained on the Frame Similarity Prior's path from t={t0} (train.frame_prior_path), which "
            "this sampler does not start on; to sample on it: --config.sample.steps=10 "
            "--config.sample.frame_prior.start_step=3 --config.sample.frame_prior.keep_prob=1 "
            "--config.sample.frame_prior.enabled=True"), change
