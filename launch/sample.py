"""Sample videos from text, or from an image and text.

    python launch/sample.py --config=configs/animatediff_sd15.py:variant=v2 --checkpoint=models/sd15_mm_v2 \
        --prompt="a corgi running on the beach, golden hour" --output=corgi.mp4
    python launch/sample.py --config=configs/animatediff_sd15.py:variant=v2 \
        --model=realisticVision.safetensors --motion_module=mm_sd_v15_v2.ckpt --lora=style.safetensors:0.7 ...
    python launch/sample.py --config=configs/videocrafter.py:variant=t2v_512_v2 --model=base_512_v2/model.ckpt \
        --prompt="a panda playing guitar" --output=panda.mp4
    python launch/sample.py --config=configs/videocrafter.py:variant=i2v_512_v1 --model=i2v_512_v1/model.ckpt \
        --image=cat.png --prompt="a cat walking"
    python launch/sample.py --config=configs/magdiff.py --checkpoint=runs/magdiff/model --image=dog.png \
        --mask=dog_mask.png --prompt="a dog running on the beach"
    python launch/sample.py --config=configs/magdiff.py --checkpoint=runs/magdiff/model --video=dog.mp4 \
        --mask=dog_mask.png --source_prompt="a dog running on grass" --prompt="a dog running on the beach"
    python launch/sample.py --config=configs/animatediff_sd15.py:variant=v2 --checkpoint=models/sd15_mm_v2 \
        --video=dog.mp4 --mask=dog_mask.png --source_prompt="a dog on grass" --prompt="a cat on grass"

Image-to-video configs (those with an image encoder) need --image: it is fitted to the frame size (centred crop
to the aspect ratio, then resize). MagDiff takes the subject as --image and --mask (the image outside the mask is
black; without --mask the whole image).

--video edits that video instead of generating (vdjax/pipelines/edit.py; every family): DDIM inversion with
--source_prompt, then the same sampler with --prompt. Its first --num_frames frames are edited; a shorter video is
refused unless --loop_short_video. --mask (white = the subject, the region the edit
changes: one PNG, or one per frame as a folder or a mask video, which follows a moving subject) keeps the rest from
the source (--edit_blend: default config.sample.edit_blend, MagDiff's True, which then needs --mask; for other
families on exactly when --mask is given). Image-conditioned families take the video's first frame as --image
unless it is given (MagDiff: the subject = that image inside the (first) mask). --inversion_iterations: fixed-point
iterations per inversion step, for a closer reconstruction (default config.sample.inversion_iterations or 0).

VideoCrafter's fps conditioning is config.sample.fps (--config.sample.fps=...); --fps sets the frame rate of the
written file.

Weights come from a converted folder (`--checkpoint`, see launch/convert.py) or from PyTorch files converted at
load time. A converted folder brings its own model config (config.json); how to sample (config.sample: steps, frame
prior, colour matching, ... and their --config.sample.* overrides) is always --config's, and the settings where the
folder's config.json differs are printed (and, for a model trained with train.frame_prior_path, the settings that
start on its training path when --config's do not). `--random_init` samples with random weights (noise; for smoke
tests).
Every argument is checked before any compute.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from launch_helpers import ProgressBar, WeightFlags, model_differences, pipeline_class, quiet_library_logs
from vdjax.convert.readers import CheckpointError
from vdjax.diffusion import frame_prior
from vdjax.io.image import read_image
from vdjax.io.mask import read_mask
from vdjax.io.video import check_output, write_video
from vdjax.pipelines.t2v import T2VPipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model family config (path:arg).", lock_config=False)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A converted model folder (launch/convert.py).")
_WEIGHTS = WeightFlags()
_RANDOM = flags.DEFINE_bool("random_init", False, "Random weights (smoke tests; the video is noise).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt; repeat for several videos.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line.")
_IMAGE = flags.DEFINE_string("image", None, "Image-to-video: the conditioning image (PNG/JPEG), for every prompt.")
_MASK = flags.DEFINE_string("mask", None, "The subject's mask (PNG, white = subject): MagDiff's subject for --image or "
                             "--video; with --video, the region the edit changes (also one mask per frame: a folder "
                             "of PNGs or a mask video).")
_VIDEO = flags.DEFINE_string("video", None, "Edit this video (mp4/gif/frames folder) instead of generating.")
_SOURCE_PROMPT = flags.DEFINE_string("source_prompt", None, "Editing: the prompt describing --video (default: the "
                                     "prompt).")
_EDIT_BLEND = flags.DEFINE_bool("edit_blend", None, "Editing: keep the region outside --mask from the source "
                                "(default: config.sample.edit_blend, else whether --mask is given).")
_LOOP = flags.DEFINE_bool("loop_short_video", None, "Editing: loop a --video shorter than --num_frames (default: "
                          "config.sample.loop_short_video, else refused).")
_ITERATIONS = flags.DEFINE_integer("inversion_iterations", None, "Editing: fixed-point iterations per DDIM inversion "
                                   "step (default: config.sample.inversion_iterations, else 0).")
_STRENGTH = flags.DEFINE_float("strength", None, "Editing: the inverted fraction of the schedule (default: "
                               "config.sample.edit_strength).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Negative prompt (default: the config's).")
_FRAMES = flags.DEFINE_integer("num_frames", None, "Frames (default: the config's).")
_HEIGHT = flags.DEFINE_integer("height", None, "Height in pixels.")
_WIDTH = flags.DEFINE_integer("width", None, "Width in pixels.")
_STEPS = flags.DEFINE_integer("steps", None, "DDIM steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (1 = none).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
_SEED = flags.DEFINE_integer("seed", None, "Random seed: the same seed gives the same video.")
_FPS = flags.DEFINE_float("fps", None, "Frames per second of the written video.")
_OUTPUT = flags.DEFINE_string("output", "outputs/sample.mp4", "Output: .mp4, .gif, or a folder for PNG frames.")
_SAVE_LATENTS = flags.DEFINE_bool("save_latents", False, "Also write the final latents next to the output (.npy).")


def _config_path(config, key: str) -> str | None:
    """config.sample.<key> (configs/demo.py's default weights and image), relative to the repository's root."""
    path = config.sample.get(key)
    return path and os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)


def _prompts(config) -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        if not os.path.isfile(_PROMPTS_FILE.value):
            raise app.UsageError(f"--prompts_file={_PROMPTS_FILE.value}: no such file")
        prompts += [line.strip() for line in open(_PROMPTS_FILE.value) if line.strip()]
    if not prompts and config.sample.get("prompt"):
        prompts = [config.sample.prompt]
    if not prompts:
        raise app.UsageError("give --prompt (repeatable) or --prompts_file")
    return prompts


def _outputs(n: int) -> list[str]:
    if not _OUTPUT.present:  # the default, outputs/: made on a fresh checkout
        os.makedirs(os.path.dirname(_OUTPUT.value), exist_ok=True)
    base, ext = os.path.splitext(_OUTPUT.value)
    paths = [_OUTPUT.value] if n == 1 else [f"{base}_{i:02d}{ext}" for i in range(n)]
    for path in paths:
        try:
            check_output(path)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    return paths


# Which public files each family loads, and the command that converts them once (then --checkpoint=FOLDER).
_WHERE_WEIGHTS = {
    "animatediff": "get an SD 1.5 checkpoint (v1-5-pruned-emaonly.safetensors, or a community fine-tune) and an "
                   "AnimateDiff motion module (guoyww/animatediff: mm_sd_v15_v2.ckpt), then `python launch/convert.py "
                   "--config=configs/animatediff_sd15.py:variant=v2 --model=v1-5-pruned-emaonly.safetensors "
                   "--motion_module=mm_sd_v15_v2.ckpt --output=models/sd15_mm_v2`. ",
    "videocrafter": "get the release's model.ckpt (VideoCrafter/VideoCrafter2 on the Hugging Face hub), then `python "
                    "launch/convert.py --config=configs/videocrafter.py:variant=VARIANT --model=model.ckpt "
                    "--output=models/videocrafter`. ",
    "i2v_adapter": "get SD 1.5, I2V-Adapter's animatediff_v15_v1_ipplus.pth and i2v_module.pth (KwaiVGI/I2V-Adapter)"
                   ", IP-Adapter's ip-adapter-plus_sd15.bin and models/image_encoder (h94/IP-Adapter), then `python "
                   "launch/convert.py --config=configs/i2v_adapter_sd15.py --model=v1-5-pruned-emaonly.safetensors "
                   "--motion_module=animatediff_v15_v1_ipplus.pth --i2v_module=i2v_module.pth "
                   "--ip_adapter=ip-adapter-plus_sd15.bin --image_encoder=models/image_encoder "
                   "--output=models/i2v_adapter`. ",
    "magdiff": "MagDiff has no public weights: train it (`python launch/train.py --config=configs/magdiff.py "
               "--workdir=runs/magdiff --export=models/magdiff`, starting from VideoCrafter I2V 512: convert "
               "i2v_512_v1/model.ckpt with `python launch/convert.py --config=configs/magdiff.py "
               "--model=model.ckpt --output=models/magdiff_init` and pass --checkpoint=models/magdiff_init). ",
}


def _pipeline(config) -> T2VPipeline:
    kind = pipeline_class(config)
    given = _WEIGHTS.files()
    if _RANDOM.value:
        print("weights: random (--random_init)")
        return kind.random_init(config)
    checkpoint = _CHECKPOINT.value or (None if given else _config_path(config, "checkpoint"))
    if checkpoint:
        if not os.path.isdir(checkpoint):
            raise app.UsageError(f"{checkpoint}: no such converted model folder" + (
                "" if _CHECKPOINT.value else f" (config.sample.checkpoint; {config.family} {config.variant}: "
                f"restore it with `git checkout -- {config.sample.checkpoint}`, or remake it with the commands in "
                "the config's docstring, or give --checkpoint / --model)"))
        print(f"weights: converted model {checkpoint}")
        pipe = kind.from_converted(checkpoint)
        differ = model_differences(config, pipe.config, kind.PARTS)
        if differ:
            print(f"the model is the folder's: --config's {', '.join(differ)} (which differ from {checkpoint}/"
                  "config.json) do not apply; convert or train a model with them")
        return _sample_as_configured(pipe, config)
    if not given:
        raise app.UsageError(f"no weights for {config.family} {config.get('variant', '')}: "
                             f"{_WHERE_WEIGHTS.get(config.family, '')}Give a converted folder (--checkpoint), the "
                             "files themselves (converted at load time), or --random_init (noise; smoke tests).")
    print("weights: " + ", ".join(f"{k}={v}" for k, v in given.items()))
    return kind.from_files(config, loras=_WEIGHTS.loras(), **given)


def _sample_as_configured(pipe, config):
    """The folder gives the model; --config (with its command-line overrides) says how to sample it."""
    theirs = pipe.config.sample
    differ = sorted(k for k in set(theirs) | set(config.sample)
                    if k not in ("checkpoint", "image", "prompt") and theirs.get(k) != config.sample.get(k))
    if differ:
        print(f"sampling as --config says; the folder's config.json differs in sample.{', sample.'.join(differ)}")
    note = frame_prior.off_path_note(pipe.config, config.sample, pipe.timesteps)
    if note:
        print(f"note: {note}")
    with pipe.config.unlocked():
        pipe.config.sample = config.sample
    return pipe


def _read(flag, reader):
    try:
        return reader(flag.value)
    except (OSError, ValueError) as e:
        raise app.UsageError(f"--{flag.name}: {e}") from None


def _conditions(config) -> dict:
    """The pipeline's conditions (image=, MagDiff's mask=), and for editing video= (the frames edited) and
    blend_mask= (non-MagDiff families' --mask); each read and checked here, before any compute."""
    magdiff = config.get("family") == "magdiff"
    if _MASK.value and not (magdiff or _VIDEO.value):
        raise app.UsageError(f"--mask: {config.family} takes a mask only when editing (--video: the region the edit "
                             "changes); MagDiff (configs/magdiff.py) takes it as the subject of --image")
    for flag in (_SOURCE_PROMPT, _STRENGTH, _LOOP, _ITERATIONS):
        if flag.value is not None and not _VIDEO.value:
            raise app.UsageError(f"--{flag.name} is for editing: give --video=FILE too")
    if _EDIT_BLEND.value is not None and not _VIDEO.value:
        raise app.UsageError("--edit_blend is for editing: give --video=FILE too")
    conditions = {}
    s = config.sample
    height, width = _HEIGHT.value or s.height, _WIDTH.value or s.width
    if _VIDEO.value:  # editing: the source video, and the subject from its first frame unless --image is given
        from vdjax.io.video import read_video
        from vdjax.pipelines.edit import source_frames

        if _ITERATIONS.value is not None and _ITERATIONS.value < 0:
            raise app.UsageError(f"--inversion_iterations={_ITERATIONS.value}; give 0 or more")
        if _STRENGTH.value is not None and not 0 < _STRENGTH.value <= 1:
            raise app.UsageError(f"--strength={_STRENGTH.value}; give the inverted fraction of the schedule in (0, 1]")
        video = _read(_VIDEO, read_video)
        loop = s.get("loop_short_video", False) if _LOOP.value is None else _LOOP.value
        try:
            conditions["video"] = source_frames(video, _FRAMES.value or s.num_frames, loop=loop)
        except ValueError as e:
            raise app.UsageError(f"--video: {e}") from None
    if _MASK.value:
        from vdjax.io.mask import fit_mask

        mask = _read(_MASK, read_mask)
        try:  # fitted here (log line), so that an empty mask fails before compute
            mask = fit_mask(mask, height, width)
        except ValueError as e:
            raise app.UsageError(f"--mask: {e}") from None
        if mask.ndim == 3 and not _VIDEO.value:
            raise app.UsageError("--mask: masks per frame (a folder or a mask video) are for editing a --video; give "
                                 "one image (PNG) with --image")
        if magdiff:  # the subject: the (first) mask; a mask per frame also blends the edit frame by frame
            conditions["mask"] = mask[0] if mask.ndim == 3 else mask
        if mask.ndim == 3 or not magdiff:
            conditions["blend_mask"] = mask
    if "image_encoder" not in config:
        if _IMAGE.value:
            raise app.UsageError(f"--image: {config.family} {config.variant} is text-to-video; use an image-to-video "
                                 "config (e.g. configs/videocrafter.py:variant=i2v_512_v1)")
        _check_blend(config, conditions)
        return conditions
    if _IMAGE.value:
        conditions["image"] = _read(_IMAGE, read_image)
    elif _config_path(config, "image") and "video" not in conditions:
        conditions["image"] = read_image(_config_path(config, "image"))
    elif "video" in conditions:
        conditions["image"] = conditions["video"][0]
    else:
        raise app.UsageError(f"{config.family} {config.variant} is image-to-video: give --image=FILE" +
                             (" (the subject) and --mask=FILE (its mask)" if magdiff else ""))
    if magdiff:
        conditions.setdefault("mask", None)
    _check_blend(config, conditions)
    return conditions


def _check_blend(config, conditions):
    if "video" in conditions and _edit_blend(config) and not _MASK.value:
        raise app.UsageError("editing keeps the region outside the subject mask (--edit_blend): give --mask, or "
                             "--noedit_blend to regenerate the whole video")


def _edit_blend(config) -> bool:
    if _EDIT_BLEND.value is not None:
        return _EDIT_BLEND.value
    return config.sample.get("edit_blend", bool(_MASK.value))


def _edit(pipe, config, prompts, conditions, kwargs, bar):
    """Editing of --video: one output per prompt."""
    from vdjax.pipelines.edit import edit_video

    video = conditions.pop("video")
    mask = conditions.pop("blend_mask") if "blend_mask" in conditions else conditions.get("mask")
    blend = _edit_blend(config)
    outs = []
    sampling, inverting = (lambda i, n: bar("editing", i, n)), (lambda i, n: bar("inverting", i, n))  # one compile
    for prompt in prompts:
        try:
            out = edit_video(pipe, video, prompt, source_prompt=_SOURCE_PROMPT.value, negative_prompt=_NEGATIVE.value,
                             blend_mask=mask if blend else None, strength=_STRENGTH.value,
                             inversion_iterations=_ITERATIONS.value, seed=_SEED.value, progress=sampling,
                             inversion_progress=inverting, **conditions, **kwargs)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        outs.append((out.frames[0], out.latents[0]))
    return outs


def main(argv):
    del argv
    quiet_library_logs()
    config = _CONFIG.value
    prompts = _prompts(config)
    outputs = _outputs(len(prompts))
    conditions = _conditions(config)
    start = time.perf_counter()
    try:
        pipe = _pipeline(config)
    except CheckpointError as e:  # a file that is not what the config needs: its message says what to give
        raise app.UsageError(str(e)) from None
    s = config.sample
    kwargs = dict(num_frames=_FRAMES.value or s.num_frames, height=_HEIGHT.value or s.height,
                  width=_WIDTH.value or s.width, steps=s.steps if _STEPS.value is None else _STEPS.value,
                  guidance_scale=s.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value,
                  eta=s.eta if _ETA.value is None else _ETA.value)
    try:
        pipe.check(**kwargs)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    print(f"loaded {config.family} {config.variant} in {time.perf_counter() - start:.1f} s on "
          f"{jax.devices()[0].device_kind}; {len(prompts)} prompt(s), {kwargs['num_frames']} frames "
          f"{kwargs['height']}x{kwargs['width']}, {kwargs['steps']} steps, guidance {kwargs['guidance_scale']}")
    bar = ProgressBar()
    if "video" in conditions:
        results = _edit(pipe, config, prompts, conditions, kwargs, bar)
    else:
        try:
            out = pipe(prompts, negative_prompt=_NEGATIVE.value, seed=_SEED.value,
                       progress=lambda i, n: bar("sampling", i, n), **conditions, **kwargs)
        except ValueError as e:  # e.g. an empty mask
            raise app.UsageError(str(e)) from None
        results = list(zip(out.frames, out.latents))
    for (video, latents), path in zip(results, outputs):
        write_video(video, path, fps=_FPS.value or s.get("save_fps", s.fps))
        print(f"wrote {path}")
        if _SAVE_LATENTS.value:
            np.save(os.path.splitext(path)[0] + "_latents.npy", latents)
            print(f"wrote {os.path.splitext(path)[0]}_latents.npy")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
