"""From checkpoint files to device-ready models: which key map serves which part in which layout.

`load_models(config, model=..., unet=..., motion_module=..., vae=..., text_encoder=..., image_encoder=...,
image_proj=..., i2v_module=..., ip_adapter=..., loras=...)` reads each part's file(s) lazily, detects the layout from
the keys, and fills the part's abstract model one parameter at a time, straight into its sharding when a mesh is
given. The parts are those the config has: unet, vae, text_encoder, and for an image-conditioned config (VideoCrafter
I2V, I2V-Adapter) image_encoder and image_proj.

The UNet may be assembled from several files, each parameter from exactly one: the base (`model=` / `unet=`), the
motion modules (`motion_module=`: AnimateDiff, a diffusers MotionAdapter, or I2V-Adapter's
animatediff_v15_v1_ipplus.pth, which also carries IP-Adapter's to_k_ip/to_v_ip), the first-frame attention
(`i2v_module=`, I2V-Adapter) and the image key/value projections (`ip_adapter=`, when the motion file has none; the
same file gives the image_proj part).
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import jax.numpy as jnp
from flax import nnx

from vdjax.convert import animatediff, diffusers, formats, hf_clip, i2v_adapter, ip_adapter, keymap, videocrafter
from vdjax.convert.combined import combine, namespaced, split_ignore
from vdjax.convert.keymap import PartMap
from vdjax.convert.readers import CheckpointError, read_folder, read_state_dict
from vdjax.layers.primitives import InitKeys
from vdjax.models.clip import CLIPTextModel, CLIPVisionModelWithProjection
from vdjax.models.openclip import TextTower, VisionTower
from vdjax.models.resampler import ImageProjModel, Resampler
from vdjax.models.unet3d import UNet3D
from vdjax.models.vae import AutoencoderKL

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder", "image_encoder", "image_proj")
# load_models' file arguments: the parts, plus the files that only feed other parts.
FILE_ARGS = ("model", *PARTS, "motion_module", "i2v_module", "ip_adapter")
# The parts a single file other than a VideoCrafter model.ckpt can hold (an SD file has no image branch).
SD_FILE_PARTS = ("unet", "vae", "text_encoder")


def config_parts(config) -> tuple[str, ...]:
    """The parts a model config builds: those of PARTS it has a section for."""
    return tuple(p for p in PARTS if p in config)


def _companion_map() -> PartMap:
    return PartMap(i2v_adapter.unet_key, i2v_adapter.unet_ignored(()))


def part_map(part: str, fmt: str, config) -> PartMap:
    """The key map of `part` for a file in layout `fmt` (see vdjax.convert.formats)."""
    if fmt == "videocrafter":
        return videocrafter.part_map(part, config)
    if fmt.startswith("ldm"):
        from vdjax.convert import ldm

        return ldm.part_map(part, fmt, config)
    if part == "image_encoder" and fmt == "hf_clip_vision" and config.get("image_encoder_kind") != "clip":
        raise CheckpointError("a transformers CLIPVisionModelWithProjection file is the image encoder of a config with "
                              "image_encoder_kind='clip' (IP-Adapter's models/image_encoder); this config builds an "
                              "OpenCLIP VisionTower (VideoCrafter), read from the VideoCrafter model.ckpt.")
    table = {
        ("unet", "diffusers_unet"): lambda: PartMap(diffusers.unet_key, diffusers.unet_ignored),
        ("unet", "i2v_adapter_unet"): _companion_map,
        ("motion", "animatediff_motion"): lambda: PartMap(animatediff.motion_key,
                                                          animatediff.POSITION_TABLE.search),
        ("motion", "diffusers_motion_adapter"): lambda: PartMap(diffusers.unet_key, diffusers.unet_ignored),
        ("motion", "i2v_adapter_unet"): _companion_map,
        ("vae", "diffusers_vae"): lambda: PartMap(diffusers.vae_key),
        ("text_encoder", "hf_clip_text"): lambda: PartMap(
            hf_clip.text_key, hf_clip.ignored,
            lambda s: hf_clip.with_prefix(s, "text_model.", "text_projection.")),
        ("image_encoder", "hf_clip_vision"): lambda: PartMap(
            hf_clip.vision_key, hf_clip.ignored,
            lambda s: hf_clip.with_prefix(s, "vision_model.", "visual_projection.")),
        ("image_proj", "ip_adapter"): lambda: PartMap(ip_adapter.image_proj_key, ip_adapter.is_adapter_key),
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
                "image_encoder": lambda: (CLIPVisionModelWithProjection if config.get("image_encoder_kind") == "clip"
                                          else VisionTower)(config.image_encoder, rngs=InitKeys(0)),
                "image_proj": lambda: (ImageProjModel if ip_adapter.config_kind(config) == "image_proj_model"
                                       else Resampler)(config.image_proj, rngs=InitKeys(0))}
    return nnx.eval_shape(builders[part])


def _read(path: str) -> Mapping:
    if os.path.isdir(path):
        parts = read_folder(path)
        if "self" in parts:
            return parts["self"]
        raise CheckpointError(f"{path} is a diffusers snapshot; pass it as --model, or name one component folder")
    return read_state_dict(path)


def resolve_sources(model: str | None = None, **parts: str | None) -> dict[str, Mapping]:
    """{source: state dict} from a whole model (single file or snapshot folder) and/or per-part files. Sources are
    the parts, 'motion', 'i2v_module', 'ip_adapter' (which also serves as the image_proj unless that is given) and
    'tokenizer' (a folder)."""
    unknown = sorted(set(parts) - set(FILE_ARGS))
    if unknown:
        raise TypeError(f"unknown model file argument(s) {', '.join(unknown)}; the file arguments are "
                        f"{', '.join(FILE_ARGS)}")
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
            held = PARTS if formats.detect(whole, model) == "videocrafter" else SD_FILE_PARTS
            sources.update({p: whole for p in held})
    renamed = {"motion_module": "motion"}
    for name, path in parts.items():
        if path:
            sources[renamed.get(name, name)] = _read(path)
    if "ip_adapter" in sources and not parts.get("image_proj"):
        sources["image_proj"] = sources["ip_adapter"]
    return sources


def _name(state: Mapping, default: str) -> str:
    return getattr(state, "source", default)


def _detect(state: Mapping, default: str) -> str:
    return formats.detect(state, _name(state, default))


def _unet_state(config, sources: Mapping[str, Mapping], abstract: nnx.Module) -> tuple[Mapping, PartMap]:
    """The UNet's state dict and key map over its files, each parameter from exactly one: first-frame attention
    from 'i2v_module' (else initialised as upstream), image key/value projections from the motion file or the
    base when they carry them (I2V-Adapter's animatediff_v15_v1_ipplus.pth, as upstream's inference), else from
    'ip_adapter'; motion modules from 'motion'; the rest from the base ('unet')."""
    base = sources["unet"]
    fmt = _detect(base, "unet")
    videocrafter.check_file("unet", base, fmt, config, _name(base, "unet"))
    bmap = part_map("unet", fmt, config)
    flat = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    spatial = lambda p: not animatediff.is_motion_param(p) and not ip_adapter.is_image_kv_param(p)
    if fmt == "i2v_adapter_unet":
        animatediff.check_position_tables(base, config.unet.motion.max_positions, _name(base, "unet"))
    states, keys, ignores = {"unet": bmap.prepare(base)}, {"unet": bmap.key_fn}, {"unet": bmap.ignore}

    if "motion" in sources:
        motion = sources["motion"]
        mfmt = _detect(motion, "motion module")
        mmap = part_map("motion", mfmt, config)
        if mfmt in ("animatediff_motion", "i2v_adapter_unet"):
            animatediff.check_position_tables(motion, config.unet.motion.max_positions, _name(motion, "motion module"))
        mignore = mmap.ignore
        if mfmt == "i2v_adapter_unet":  # its spatial weights are the base's to give: ignored, named exactly
            mignore = i2v_adapter.unet_ignored(diffusers.unet_key(p) for p in flat if spatial(p))
        # Spatial parameters from the UNet file, motion modules from the motion file; a UNet file that carries
        # motion modules of its own (a diffusers UNetMotionModel) has them overridden.
        spatial_ignore = bmap.ignore
        states["motion"], keys["motion"] = mmap.prepare(motion), mmap.key_fn
        ignores.update(unet=lambda k: spatial_ignore(k) or "motion_modules." in k, motion=mignore)

    routes = []  # (which parameters, namespaced key function), first match wins
    if config.unet.get("first_frame_attention") and any(i2v_adapter.is_first_frame_param(p) for p in flat):
        if "i2v_module" in sources:
            module = sources["i2v_module"]
            if (mod_fmt := _detect(module, "i2v_module")) != "i2v_adapter_module":
                raise CheckpointError(f"{_name(module, 'i2v_module')} is not an I2V-Adapter module (i2v_module.pth: "
                                      f"attn1.to_q_ff / attn1.to_out_ff) but a {mod_fmt} file "
                                      f"({formats.READABLE.get(mod_fmt, mod_fmt)}).")
            states["i2v"] = module
            routes.append((i2v_adapter.is_first_frame_param, namespaced("i2v", i2v_adapter.module_key)))
        else:
            i2v_adapter.warn_initialised(_name(base, "the base UNet"))
            states["init"] = i2v_adapter.initial_first_frame(
                {p: s for p, s in flat.items() if i2v_adapter.is_first_frame_param(p)})
            spatial_key = keys["unet"]
            routes.append((i2v_adapter.is_first_frame_param,
                           lambda p: (f"unet:{spatial_key(i2v_adapter.to_q_path(p))}" if p[-2] == "to_q_ff"
                                      else f"init:{i2v_adapter.module_key(p)}")))
    elif "i2v_module" in sources:
        raise CheckpointError(f"the config's UNet has no first-frame attention, so it has no use for the I2V-Adapter "
                              f"module {_name(sources['i2v_module'], 'i2v_module')}; use configs/i2v_adapter_sd15.py "
                              "(unet.first_frame_attention=True).")

    # IP-Adapter's decoupled cross-attention (VideoCrafter's and MagDiff's to_k_ip/to_v_ip are their files' own).
    if config.unet.get("image_cross_attention") == "ip_adapter":
        holders = [ns for ns in ("motion", "unet") if ns in states and any(
            i2v_adapter.IMAGE_KV_KEY.search(k) for k in states[ns])]
        if holders:
            ns = holders[0]
            if "ip_adapter" in sources:
                log.info("image key/value projections (to_k_ip/to_v_ip) from %s, as upstream I2V-Adapter; those of "
                         "%s are not used (its image_proj is)", _name(states[ns], ns),
                         _name(sources["ip_adapter"], "ip_adapter"))
            routes.append((ip_adapter.is_image_kv_param, namespaced(ns, keys[ns])))
        elif "ip_adapter" in sources:
            adapter = sources["ip_adapter"]
            if (ip_fmt := _detect(adapter, "ip_adapter")) != "ip_adapter":
                raise CheckpointError(f"{_name(adapter, 'ip_adapter')} is not an IP-Adapter file but a {ip_fmt} file "
                                      f"({formats.READABLE.get(ip_fmt, ip_fmt)}).")
            ip_adapter.check_file(adapter, config, _name(adapter, "ip_adapter"),
                                  sites=len(ip_adapter.attention_sites(abstract)))
            states["ip"], ignores["ip"] = adapter, ip_adapter.is_image_proj_key
            routes.append((ip_adapter.is_image_kv_param, namespaced("ip", ip_adapter.site_key(abstract))))
        else:
            raise CheckpointError(
                "the config's UNet has IP-Adapter cross-attention (attn2.to_k_ip / to_v_ip), and no file given holds "
                "them: pass ip_adapter= (--ip_adapter: ip-adapter-plus_sd15.bin / .safetensors, or ip-adapter_sd15 "
                "with a plain image_proj config), or I2V-Adapter's animatediff_v15_v1_ipplus.pth as motion_module=.")
    elif "ip_adapter" in sources and "unet" in sources:
        raise CheckpointError(f"the config's UNet has no IP-Adapter cross-attention, so it has no use for "
                              f"{_name(sources['ip_adapter'], 'ip_adapter')}; use a config with "
                              "unet.image_cross_attention='ip_adapter' (configs/i2v_adapter_sd15.py).")

    if len(states) == 1:  # one file: its own keys, as before
        return states["unet"], bmap
    if "motion" in states:
        motion_key = namespaced("motion", keys["motion"])
        routes.append((animatediff.is_motion_param, motion_key))
    base_key = namespaced("unet", keys["unet"])

    def key_fn(path):
        return next((fn(path) for match, fn in routes if match(path)), None) or base_key(path)
    return combine(states), PartMap(key_fn, split_ignore(ignores))


def part_state(part: str, config, sources: Mapping[str, Mapping], abstract: nnx.Module | None = None
               ) -> tuple[Mapping, PartMap]:
    """The state dict (prepared, combined where several files feed the part) and key map that fill `part`."""
    abstract = abstract if abstract is not None else abstract_part(part, config)
    if part == "unet":
        return _unet_state(config, sources, abstract)
    state = sources[part]
    fmt = _detect(state, part)
    videocrafter.check_file(part, state, fmt, config, _name(state, part))
    if fmt == "ip_adapter":
        ip_adapter.check_file(state, config, _name(state, part))
    pmap = part_map(part, fmt, config)
    return pmap.prepare(state), pmap


def plan_part(part: str, config, sources: Mapping[str, Mapping], abstract: nnx.Module | None = None) -> dict:
    """{parameter path: (namespaced) checkpoint key} of `part`, checked by key and shape without reading a value
    (shape-only state dicts, e.g. manifests, are enough)."""
    abstract = abstract if abstract is not None else abstract_part(part, config)
    state, pmap = part_state(part, config, sources, abstract)
    return keymap.plan(abstract, state, pmap.key_fn, ignore=pmap.ignore, source=_name(state, part))


def load_part(part: str, config, sources: Mapping[str, Mapping], *, shardings_for=None, dtype=jnp.float32,
              progress=None) -> nnx.Module:
    """Fill one part. The UNet may combine several files (see `_unet_state`)."""
    abstract = abstract_part(part, config)
    state, pmap = part_state(part, config, sources, abstract)
    shardings = shardings_for(abstract) if shardings_for else None
    return keymap.load_sharded(abstract, state, pmap.key_fn, shardings=shardings, dtype=dtype, ignore=pmap.ignore,
                               source=_name(state, part), progress=progress)


def load_models(config, *, parts: Sequence[str] | None = None, shardings_for=None, dtype=jnp.float32,
                loras: Sequence[tuple[str, float]] = (), progress=None, **files) -> dict[str, nnx.Module]:
    """Read the files (`model=`, `unet=`, `motion_module=`, `vae=`, `text_encoder=`, `image_encoder=`,
    `image_proj=`, `i2v_module=`, `ip_adapter=`) and build every part of the config (`config_parts`) they provide,
    LoRAs merged: {part: model}, plus 'tokenizer_folder' when a snapshot has one. `shardings_for(abstract_model) ->
    {path: sharding}` puts each parameter in place.

    I2V-Adapter: `model=` SD 1.5 (file or snapshot; community fine-tunes too), `motion_module=` its
    animatediff_v15_v1_ipplus.pth (or an AnimateDiff v1 mm_sd_v15.ckpt), `i2v_module=` i2v_module.pth, `ip_adapter=`
    ip-adapter-plus_sd15 (.bin / .safetensors: image_proj, and to_k_ip/to_v_ip unless the motion file has them),
    `image_encoder=` IP-Adapter's models/image_encoder folder (transformers CLIPVisionModelWithProjection).

    MagDiff: `model=` VideoCrafter I2V 512's model.ckpt, the starting point (see vdjax.convert.magdiff)."""
    if config.get("family") == "magdiff":  # VideoCrafter I2V's files, then MagDiff's new parameters at their init
        from vdjax.convert import magdiff

        models = load_models(magdiff.base_config(config), parts=parts, dtype=dtype, loras=loras, progress=progress,
                             **files)
        if "unet" in models:
            models["unet"] = magdiff.from_base_unet(config, models["unet"])
        return models
    sources = resolve_sources(**files)
    for extra, what in (("motion", "a motion module"), ("i2v_module", "an I2V-Adapter module")):
        if extra in sources and "unet" not in sources:
            raise CheckpointError(f"{what} needs a base UNet: give --model or --unet as well")
    has = config_parts(config)
    absent = [p for p in (parts or ()) if p not in has]
    if absent:
        raise CheckpointError(f"the config ({config.get('family', '?')} {config.get('variant', '')}) has no "
                              f"{', '.join(absent)}; its parts are {', '.join(has)}")
    wanted = [p for p in (parts or has) if p in sources]
    if not wanted:
        raise CheckpointError("no model files given for the config's parts: pass model=, unet=, vae=, text_encoder=, "
                              "image_encoder=, image_proj= or ip_adapter=")
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
