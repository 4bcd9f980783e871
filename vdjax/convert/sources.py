"""From checkpoint files to device-ready models: which key map serves which part in which layout.

`load_models(config, model=..., unet=..., motion_module=..., vae=..., text_encoder=..., image_encoder=...,
image_proj=..., loras=...)` reads each part's file(s) lazily, detects the layout from the keys, and fills the part's
abstract model one parameter at a time, straight into its sharding when a mesh is given. The parts are those the
config has: unet, vae, text_encoder, and for an image-conditioned config (VideoCrafter I2V) image_encoder and
image_proj.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax.numpy as jnp
from flax import nnx

from vdjax.convert import animatediff, diffusers, formats, hf_clip, keymap, videocrafter
from vdjax.convert.combined import combine, namespaced, split_ignore
from vdjax.convert.keymap import PartMap
from vdjax.convert.readers import CheckpointError, read_folder, read_state_dict
from vdjax.layers.primitives import InitKeys
from vdjax.models.clip import CLIPTextModel
from vdjax.models.openclip import TextTower, VisionTower
from vdjax.models.resampler import Resampler
from vdjax.models.unet3d import UNet3D
from vdjax.models.vae import AutoencoderKL

PARTS = ("unet", "vae", "text_encoder", "image_encoder", "image_proj")


def config_parts(config) -> tuple[str, ...]:
    """The parts a model config builds: those of PARTS it has a section for."""
    return tuple(p for p in PARTS if p in config)


def part_map(part: str, fmt: str, config) -> PartMap:
    """The key map of `part` for a file in layout `fmt` (see vdjax.convert.formats)."""
    if fmt == "videocrafter":
        return videocrafter.part_map(part, config)
    if fmt.startswith("ldm"):
        from vdjax.convert import ldm

        return ldm.part_map(part, fmt, config)
    table = {
        ("unet", "diffusers_unet"): lambda: PartMap(diffusers.unet_key, diffusers.unet_ignored),
        ("motion", "animatediff_motion"): lambda: PartMap(animatediff.motion_key,
                                                          animatediff.POSITION_TABLE.search),
        ("motion", "diffusers_motion_adapter"): lambda: PartMap(diffusers.unet_key, diffusers.unet_ignored),
        ("vae", "diffusers_vae"): lambda: PartMap(diffusers.vae_key),
        ("text_encoder", "hf_clip_text"): lambda: PartMap(
            hf_clip.text_key, hf_clip.ignored,
            lambda s: hf_clip.with_prefix(s, "text_model.", "text_projection.")),
    }
    if (part, fmt) not in table:
        raise CheckpointError(f"a {formats.READABLE.get(fmt, fmt)} file cannot serve as the {part}; give the "
                              f"{part} a file of its own kind.")
    return table[(part, fmt)]()


def abstract_part(part: str, config) -> nnx.Module:
    builders = {"unet": lambda: UNet3D(config.unet, rngs=InitKeys(0)),
                "vae": lambda: AutoencoderKL(config.vae, rngs=InitKeys(0)),
                "text_encoder": lambda: (TextTower if config.get("text_encoder_kind", "clip") == "openclip"
                                         else CLIPTextModel)(config.text_encoder, rngs=InitKeys(0)),
                "image_encoder": lambda: VisionTower(config.image_encoder, rngs=InitKeys(0)),
                "image_proj": lambda: Resampler(config.image_proj, rngs=InitKeys(0))}
    return nnx.eval_shape(builders[part])


def _read(path: str) -> Mapping:
    if os.path.isdir(path):
        parts = read_folder(path)
        if "self" in parts:
            return parts["self"]
        raise CheckpointError(f"{path} is a diffusers snapshot; pass it as --model, or name one component folder")
    return read_state_dict(path)


def resolve_sources(model: str | None = None, **parts: str | None) -> dict[str, Mapping]:
    """{part: state dict} from a whole model (single file or snapshot folder) and/or per-part files."""
    sources: dict[str, Mapping] = {}
    if model:
        if os.path.isdir(model):
            folder = read_folder(model)
            if "self" in folder:
                raise CheckpointError(f"{model} holds one component, not a whole model; pass it as --unet/--vae/...")
            sources.update({p: folder[p] for p in PARTS if p in folder})
            if "motion_adapter" in folder:
                sources["motion"] = folder["motion_adapter"]
            if "tokenizer" in folder:
                sources["tokenizer"] = folder["tokenizer"]
        else:
            whole = read_state_dict(model)
            sources.update({p: whole for p in PARTS})
    renamed = {"motion_module": "motion"}
    for name, path in parts.items():
        if path:
            sources[renamed.get(name, name)] = _read(path)
    return sources


def load_part(part: str, config, sources: Mapping[str, Mapping], *, shardings_for=None, dtype=jnp.float32,
              progress=None) -> nnx.Module:
    """Fill one part. The UNet may combine a spatial source and a motion-module source."""
    abstract = abstract_part(part, config)
    state = sources[part]
    fmt = formats.detect(state, getattr(state, "source", part))
    videocrafter.check_file(part, state, fmt, config, getattr(state, "source", part))
    pmap = part_map(part, fmt, config)
    if part == "unet" and "motion" in sources:
        motion = sources["motion"]
        mfmt = formats.detect(motion, getattr(motion, "source", "motion module"))
        mmap = part_map("motion", mfmt, config)
        if mfmt == "animatediff_motion":
            animatediff.check_position_tables(motion, config.unet.motion.max_positions,
                                              getattr(motion, "source", "motion module"))
        # Spatial parameters from the UNet file, motion modules from the motion file; a UNet file that carries
        # motion modules of its own (a diffusers UNetMotionModel) has them overridden.
        state = combine({"unet": pmap.prepare(state), "motion": mmap.prepare(motion)})
        spatial_key, motion_key = namespaced("unet", pmap.key_fn), namespaced("motion", mmap.key_fn)
        spatial_ignore = pmap.ignore
        pmap = PartMap(lambda p: motion_key(p) if animatediff.is_motion_param(p) else spatial_key(p),
                       split_ignore({"unet": lambda k: spatial_ignore(k) or "motion_modules." in k,
                                     "motion": mmap.ignore}))
    else:
        state = pmap.prepare(state)
    shardings = shardings_for(abstract) if shardings_for else None
    return keymap.load_sharded(abstract, state, pmap.key_fn, shardings=shardings, dtype=dtype, ignore=pmap.ignore,
                               source=getattr(state, "source", part), progress=progress)


def load_models(config, *, parts: Sequence[str] | None = None, shardings_for=None, dtype=jnp.float32,
                loras: Sequence[tuple[str, float]] = (), progress=None, **files) -> dict[str, nnx.Module]:
    """Read the files (`model=`, `unet=`, `motion_module=`, `vae=`, `text_encoder=`, `image_encoder=`,
    `image_proj=`) and build every part of the config (`config_parts`) they provide, LoRAs merged: {part: model},
    plus 'tokenizer_folder' when a snapshot has one. `shardings_for(abstract_model) -> {path: sharding}` puts each
    parameter in place."""
    sources = resolve_sources(**files)
    if "motion" in sources and "unet" not in sources:
        raise CheckpointError("a motion module needs a base UNet: give --model or --unet as well")
    has = config_parts(config)
    absent = [p for p in (parts or ()) if p not in has]
    if absent:
        raise CheckpointError(f"the config ({config.get('family', '?')} {config.get('variant', '')}) has no "
                              f"{', '.join(absent)}; its parts are {', '.join(has)}")
    wanted = [p for p in (parts or has) if p in sources]
    if not wanted:
        raise CheckpointError("no model files given: pass model=, unet=, vae=, text_encoder=, image_encoder= or "
                              "image_proj=")
    models = {p: load_part(p, config, sources, shardings_for=shardings_for, dtype=dtype,
                           progress=(lambda i, n, k, p=p: progress(p, i, n, k)) if progress else None)
              for p in wanted}
    if loras:
        from vdjax.convert import lora

        files = [(read_state_dict(path), scale, path) for path, scale in loras]
        for part in ("unet", "text_encoder"):  # each LoRA file may carry both parts; the other part is skipped
            if part in models:
                lora.merge_loras(models[part], files, part=part)
    if "tokenizer" in sources:
        models["tokenizer_folder"] = sources["tokenizer"]
    return models
