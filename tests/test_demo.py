"""The shipped demo model (configs/demo.py, assets/demo/model) does what the README says, measured on one sample made
as `python launch/sample.py --config=configs/demo.py` makes it (the bundled frame, its caption, config.sample):

- it runs offline with no other flags (weights, frame and prompt from config.sample);
- frame 0 is the input frame: PSNR >= 25 dB (the VAE's round trip of the clean first-frame latent);
- the shapes move: the palette-colour masks' centroids shift by >= MIN_DISPLACEMENT pixels, on average over the
  colours, from frame 0 to the last frame (the true clip moves its shapes by 9.1 pixels; a still video scores 0);
- the shapes keep their colour and count: in >= MIN_CONSISTENCY of the later frames the shapes found (connected
  components per palette colour) are frame 0's (vdjax/data/shape_measures.py). The shipped weights do this on
  about half of the held-out clips (0.65 on average over 32 clips and 5 seeds, launch/measure_demo.py) but not on
  the bundled frame (0.0): its blue triangle, a few pixels after the VAE's round trip, and its white circle merge
  from frame 1. A strict xfail, which turns into a failure when better weights pass it, so that the marker is then
  removed.
The measures are shown to fail on a still video and on one whose shapes vanish or change colour.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, load_config
from vdjax.data import shape_measures
from vdjax.data.moving_shapes import make_clip

MIN_PSNR = 25.0          # dB, frame 0 against the input frame
MIN_DISPLACEMENT = 3.0   # pixels, mean centroid shift frame 0 -> last frame (32 x 32 frames)
MIN_CONSISTENCY = 0.7    # fraction of frames with frame 0's shapes (colour and count)


@pytest.fixture(scope="module")
def config():
    return load_config("configs/demo.py")


@pytest.fixture(scope="module")
def sample(config, tmp_path_factory):
    """The README's first command, with the frames written as PNGs (lossless) instead of outputs/sample.mp4."""
    import imageio.v3 as iio

    frames = tmp_path_factory.mktemp("demo") / "frames"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "launch/sample.py", "--config=configs/demo.py", f"--output={frames}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    video = np.stack([iio.imread(p) for p in sorted(frames.glob("*.png"))])
    image = iio.imread(ROOT / config.sample.image)
    measures = dict(psnr=shape_measures.psnr(video[0], image), displacement=shape_measures.displacement(video),
                    consistency=shape_measures.consistency(video), seconds=seconds)
    print(f"demo sample: {measures}")
    return image, video, measures, result


def test_the_shipped_files(config):
    """The weights fit the repository's budget; the bundled frame is held out of training (seed 1, training uses
    seed 0) and the default prompt is its caption."""
    folder = ROOT / config.sample.checkpoint
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 2 ** 20, f"{size / 2 ** 20:.1f} MB"
    assert config.train.seed == 0 and config.data.source == "moving_shapes"
    clip = make_clip(0, num_frames=config.sample.num_frames, size=config.sample.height, seed=1)
    from vdjax.io.image import read_image
    np.testing.assert_array_equal(read_image(str(ROOT / config.sample.image)), clip["first_frame"])
    assert config.sample.prompt == clip["caption"]
    for name in os.listdir(folder):  # nothing of the machine that trained it
        if name.endswith(".json"):
            assert "/work/" not in (folder / name).read_text(), name


def test_the_config_variants():
    """configs/demo.py:factor=2 (assets/demo/README.md): its VAE maps the demo's 32x32 frames to 16x16 latents whose
    channels are the UNet's, and its wide UNet takes them; stage=decoder trains the VAE's decoder alone, with the
    UNet stage's latent scale; an unknown factor, UNet or stage is refused with the choices."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vdjax.pipelines.t2v import build_part

    config = load_config("configs/demo.py:factor=2")
    frames = jnp.zeros((1, config.sample.height, config.sample.width, 3))
    latents = jax.eval_shape(lambda: build_part("vae", config, nnx.Rngs(0)).encode(frames).mean)
    assert latents.shape == (1, 16, 16, config.unet.in_channels) and config.unet.out_channels == 4, latents.shape
    with pytest.raises(ValueError, match="choose one of 4, 2"):
        load_config("configs/demo.py:factor=3")
    wide = load_config("configs/demo.py:factor=2,unet=wide")  # the UNet of 48/96 channels, attention at both levels
    eps = jax.eval_shape(lambda: build_part("unet", wide, nnx.Rngs(0))(
        jnp.zeros((1, 8, 16, 16, 4)), jnp.zeros((1,)), jnp.zeros((1, 77 + 16, wide.unet.cross_attention_dim))))
    assert eps.shape == (1, 8, 16, 16, 4) and wide.unet.block_out_channels == (48, 96)
    with pytest.raises(ValueError, match="choose one of tiny, wide"):
        load_config("configs/demo.py:unet=huge")
    decoder = load_config("configs/demo.py:stage=decoder")  # the decoder fine-tuned under the shipped UNet
    assert decoder.train.objective == "autoencoder" and decoder.train.trainable == ("decoder", "post_quant_conv")
    assert decoder.vae.scaling_factor == load_config("configs/demo.py").vae.scaling_factor  # a sampleable folder
    with pytest.raises(ValueError, match="choose one of unet, vae, decoder"):
        load_config("configs/demo.py:stage=encoder")


def test_frame_zero_is_the_input(sample):
    image, video, m, _ = sample
    assert video.shape == (8, 32, 32, 3)
    assert m["psnr"] >= MIN_PSNR, m


def test_the_command_prints_what_it_does_not_library_logs(sample):
    """Orbax's INFO lines (some 30 per model loaded) are not shown unless asked for with --verbosity=0."""
    output = sample[3].stdout + sample[3].stderr
    assert "wrote " in output and "done in" in output
    assert "orbax" not in output.lower() and "Restoring checkpoint" not in output, output[-2000:]


def test_the_shapes_move(sample):
    assert sample[2]["displacement"] >= MIN_DISPLACEMENT, sample[2]


def test_frame_zero_has_the_input_shapes(sample):
    image, video, m, _ = sample
    assert shape_measures.shapes(video[0]) == shape_measures.shapes(image)
    assert sum(shape_measures.shapes(image)) >= 1


@pytest.mark.xfail(strict=True, reason="the shipped weights merge the bundled frame's blue triangle and white circle "
                   "from frame 1 (consistency 0.0; 0.65 on average over 32 held-out clips and 5 seeds); see "
                   "assets/demo/README.md")
def test_the_shapes_keep_colour_and_count(sample):
    assert sample[2]["consistency"] >= MIN_CONSISTENCY, sample[2]


def test_the_measures_can_fail(sample):
    """A still video does not move; one whose shapes fade into the background, or change colour, is not
    consistent; the true clip passes all three."""
    image, video, _, _ = sample
    still = np.repeat(image[None], 8, axis=0)
    assert shape_measures.displacement(still) == 0.0 < MIN_DISPLACEMENT
    background = np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)
    faded = video.copy()
    for frame in faded[3:]:
        frame[shape_measures.subject_mask(frame)] = background
    assert shape_measures.consistency(faded) < MIN_CONSISTENCY
    recoloured = video.copy()
    recoloured[2:] = recoloured[2:, ..., ::-1]  # RGB -> BGR: white stays white, blue turns red
    assert shape_measures.consistency(recoloured) < MIN_CONSISTENCY
    clip = make_clip(0, num_frames=8, size=32, seed=1)["video"]
    assert shape_measures.displacement(clip) >= MIN_DISPLACEMENT and shape_measures.consistency(clip) == 1.0


def test_direction_agreement_compares_the_ways_shapes_move():
    """A white square moving right against the same square moving right, left, down, and standing still."""
    def square(dy, dx):
        video = np.zeros((8, 32, 32, 3), np.uint8)
        for f in range(8):
            y, x = 12 + dy * f, 8 + dx * f
            video[f, y:y + 4, x:x + 4] = 245
        return video

    right = square(0, 2)
    assert shape_measures.direction_agreement(right, right) == pytest.approx(1.0)
    assert shape_measures.direction_agreement(square(0, -1), right) == pytest.approx(-1.0)
    assert shape_measures.direction_agreement(square(1, 0), right) == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(shape_measures.direction_agreement(square(0, 0), right))
    clip = make_clip(3, num_frames=8, size=32, seed=1)["video"]
    assert shape_measures.direction_agreement(clip, clip) == pytest.approx(1.0)


def test_sampling_settings_come_from_the_config_not_the_folder(tmp_path):
    """The demo folder's config.json samples with the frame prior from step 8; a --config.sample override wins (here
    one the pipeline refuses, so the test is quick) and the difference is printed; a model setting of --config does
    not apply to the folder's model, which is said."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "launch/sample.py", "--config=configs/demo.py",
                             "--config.sample.frame_prior.start_step=30", "--config.unet.norm_eps=0.001",
                             f"--output={tmp_path / 'v.mp4'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "the folder's config.json differs in sample.frame_prior" in result.stdout, result.stdout[-2000:]
    assert "start_step=30; use 0 to 24" in result.stderr, result.stderr[-2000:]
    assert "the model is the folder's: --config's unet.norm_eps" in result.stdout, result.stdout[-2000:]


def test_measure_demo_script(sample):
    """launch/measure_demo.py (the README's numbers) samples clip 0 with seed 0 exactly as the README's first command
    does (JAX's partitionable threefry: a batch's first sample draws the same noise as a batch of one), and with
    --seeds reports each seed's figures and the clip's mean over them."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "launch/measure_demo.py", "--clips=1", "--seeds=2"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    per_seed = {name: [float(v) for v in line.split(": ", 1)[1].split(" (")[0].split(", ")]
                for line in lines if line.startswith("per seed, ")
                for name in [line[len("per seed, "):].split(":")[0]]}
    m = sample[2]
    assert per_seed["motion px"][0] == round(m["displacement"], 2), (per_seed, m)
    assert per_seed["consistency"][0] == round(m["consistency"], 2), (per_seed, m)
    clip = next(l for l in lines if l.startswith("clip   0:"))
    clip_consistency = float(clip.split("consistency ")[1].split()[0])
    assert abs(clip_consistency - np.mean(per_seed["consistency"])) <= 0.01, (clip, per_seed)  # means of rounded
    assert "mean over 1 clips" in result.stdout and "2 seeds from 0" in result.stdout
