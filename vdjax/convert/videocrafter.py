"""VideoCrafter1/2 `model.ckpt` files (AILab-CVC/VideoCrafter): the LDM numbered layout plus openaimodel3d's
temporal parts, in one file with every part.

Prefixes: the 3-D UNet `model.diffusion_model.`, the VAE `first_stage_model.`, the OpenCLIP text tower
`cond_stage_model.model.`, and for I2V the OpenCLIP image tower `embedder.model.` and the resampler
`image_proj_model.`. Upstream reads `ckpt['state_dict']`, or a DeepSpeed `ckpt['module']` whose keys carry a
`_forward_module.` prefix; both are accepted.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, Mapping

import ml_collections

from vdjax.convert import formats, ldm, openclip
from vdjax.convert.keymap import PartMap
from vdjax.convert.readers import CheckpointError, shape_of
from vdjax.models import resampler, unet3d


def unet_config(params: Mapping) -> ml_collections.ConfigDict:
    """vdjax UNet3D config from openaimodel3d `UNetModel` kwargs (a VideoCrafter yaml's `unet_config.params`)."""
    p = dict(params)
    unsupported = {k: p[k] for k in ("tempspatial_aware", "use_scale_shift_norm", "resblock_updown") if p.get(k)}
    if p.get("temporal_attention", True) is False or not p.get("temporal_selfatt_only", True) or unsupported:
        raise ValueError("vdjax builds VideoCrafter's released UNets: temporal self-attention only, no "
                         f"scale-shift norm or resblock up/down sampling; got {unsupported or p}")
    if p.get("temporal_transformer_depth", 1) != p.get("transformer_depth", 1):
        raise ValueError("UNet3D has one transformer depth for spatial and temporal transformers; got "
                         f"{p.get('transformer_depth', 1)} and {p['temporal_transformer_depth']}")
    cfg = ldm.unet_config({**p, "use_linear_in_transformer": p.get("use_linear", False)})
    cfg.motion.update(kind="lvdm", transformer_layers=p.get("transformer_depth", 1), mid_block=True,
                      max_positions=p.get("temporal_length") or 0, norm_scope="clip",
                      relative_position=bool(p.get("use_relative_position", True)),
                      causal=bool(p.get("use_causal_attention", False)))
    cfg.update(image_cross_attention="lvdm_dual" if p.get("use_image_attention") else "none",
               fps_conditioning=bool(p.get("fps_cond", False)), init_attention=bool(p.get("addition_attention")),
               init_attention_heads=8, init_attention_head_dim=p.get("num_head_channels", 64),
               temporal_conv=bool(p.get("temporal_conv", False)))
    if cfg.init_attention and p.get("num_head_channels", -1) == -1:
        raise ValueError("init_attn needs num_head_channels (its head width), as every released config sets")
    unet3d.check_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# One model.ckpt, every part: which prefix each part reads, what is ignored by name, which release a file is.

PREFIXES = {"unet": ldm.UNET_PREFIX, "vae": ldm.VAE_PREFIX, "text_encoder": "cond_stage_model.",
            "image_encoder": "embedder.", "image_proj": resampler.VIDEOCRAFTER_PREFIX}
TEXT_TOWER, IMAGE_TOWER = ldm.OPENCLIP_PREFIX, "embedder.model."
# Non-persistent buffers upstream never saves (the image embedder's CLIP mean/std and causal mask), ignored by name
# should a re-saved file carry them; the schedule buffers, `lvlb_weights`, EMA copies and the text tower's unused
# keys are ldm.ignored's.
NON_PERSISTENT = re.compile(r"^embedder\.(mean|std|model\.attn_mask)$")


def ignored(key: str) -> bool:
    """A key of a VideoCrafter model.ckpt that no vdjax model reads (named, whatever the part)."""
    return (ldm.ignored(key) or bool(NON_PERSISTENT.match(key))
            or (key.startswith(IMAGE_TOWER) and bool(openclip.VISION_UNUSED.search(key))))


def _others(part: str) -> Callable[[str], bool]:
    """Strict within the part's prefix; the other parts' prefixes and the named keys are someone else's. A key
    under no known prefix is unexpected in every part (upstream loads these files with strict=True)."""
    own, others = PREFIXES[part], tuple(p for q, p in PREFIXES.items() if q != part)
    return lambda key: ignored(key) or (key.startswith(others) and not key.startswith(own))


def part_map(part: str, config) -> PartMap:
    """The map of `part` ('unet', 'vae', 'text_encoder', 'image_encoder', 'image_proj') in a VideoCrafter
    model.ckpt; `config` is the model config (configs/videocrafter.py: `.unet`, `.vae`, ...)."""
    if part == "unet":
        return PartMap(ldm.unet_key(config.unet), _others(part))
    if part == "vae":
        return PartMap(ldm.vae_key(config.vae), _others(part), ldm.squeeze_attention)
    if part == "text_encoder":
        return PartMap(openclip.text_key(TEXT_TOWER), _others(part), openclip.split_in_proj)
    if part == "image_encoder":
        return PartMap(openclip.vision_key(IMAGE_TOWER), _others(part), openclip.split_in_proj)
    if part == "image_proj":
        return PartMap(functools.partial(resampler.image_proj_key, prefix=PREFIXES[part]), _others(part))
    raise ValueError(f"a VideoCrafter model.ckpt has no part {part!r}; its parts are {', '.join(PREFIXES)}")


# What tells the released files apart (configs/inference_*.yaml `unet_config.params`), all with addition_attention
# (init_attn). The UNets of t2v_1024_v1 and t2v_512_v1 differ only by fps conditioning.
RELEASES = {
    "t2v_1024_v1": dict(temporal_conv=False, use_relative_position=True, fps_cond=True, use_image_attention=False),
    "t2v_512_v1": dict(temporal_conv=False, use_relative_position=True, fps_cond=False, use_image_attention=False),
    "i2v_512_v1": dict(temporal_conv=True, use_relative_position=False, fps_cond=True, use_image_attention=True),
    "t2v_512_v2": dict(temporal_conv=True, use_relative_position=False, fps_cond=True, use_image_attention=False),
}
_FLAG_WORDS = {"temporal_conv": "temporal convolutions (temopral_conv)",
               "use_relative_position": "relative-position tables", "fps_cond": "fps conditioning",
               "use_image_attention": "the image branch (embedder, image_proj_model, to_k_ip/to_v_ip)"}
# Only these parts change between the releases; the VAE and the OpenCLIP text tower are the same in all four.
VARIANT_PARTS = ("unet", "image_encoder", "image_proj")


def file_flags(keys: Iterable[str]) -> dict[str, bool]:
    """The release flags a VideoCrafter state dict's keys show."""
    found = dict.fromkeys(_FLAG_WORDS, False)
    for key in keys:
        if key.startswith(ldm.UNET_PREFIX):
            found["temporal_conv"] |= ".temopral_conv." in key
            found["use_relative_position"] |= ".relative_position_k." in key
            found["fps_cond"] |= key.startswith(ldm.UNET_PREFIX + "fps_embedding.")
            found["use_image_attention"] |= ".to_k_ip." in key
        found["use_image_attention"] |= key.startswith(PREFIXES["image_proj"])
    return found


def config_flags(config) -> dict[str, bool]:
    unet = config.unet
    return dict(temporal_conv=bool(unet.temporal_conv), use_relative_position=bool(unet.motion.relative_position),
                fps_cond=bool(unet.fps_conditioning), use_image_attention=unet.image_cross_attention == "lvdm_dual")


def release_of(flags: Mapping[str, bool]) -> str | None:
    return next((name for name, f in RELEASES.items() if f == dict(flags)), None)


def _describe(flags: Mapping[str, bool]) -> str:
    words = [w for k, w in _FLAG_WORDS.items() if flags[k]]
    return ", ".join(words) if words else "none of temporal convs, relative positions, fps, image branch"


def is_videocrafter_config(config) -> bool:
    return config.get("family") == "videocrafter" or config.unet.motion.kind == "lvdm"


def check_file(part: str, state: Mapping, fmt: str, config, source: str) -> None:
    """Refuse, with the config to use, a file of another family or release than the config's, before any key is
    planned: a VideoCrafter model.ckpt needs a VideoCrafter config of its release (for the UNet and the image
    branch), and a VideoCrafter config's UNet and image branch come from VideoCrafter files only."""
    ours = is_videocrafter_config(config)
    named = f"{config.get('family', 'this')} config" + (f" (variant {config.variant})" if "variant" in config else "")
    if fmt != "videocrafter":
        if ours and part in VARIANT_PARTS:
            other = (" (it loads with configs/animatediff_sd15.py)"
                     if fmt in ("ldm_sd1", "diffusers_unet", "animatediff_motion", "diffusers_motion_adapter") else "")
            raise CheckpointError(
                f"{source} is not a VideoCrafter model.ckpt but a {fmt} file ({formats.READABLE.get(fmt, fmt)})"
                f"{other}; the {named} reads its {part} from VideoCrafter's released model.ckpt files "
                "(AILab-CVC/VideoCrafter: t2v 1024 v1, t2v 512 v1, i2v 512 v1, VideoCrafter2 t2v 512).")
        return
    keys = list(state)
    flags = file_flags(keys)
    whole = any(k.startswith(ldm.UNET_PREFIX) for k in keys)  # else a part file (e.g. image_proj_model.* alone)
    release = release_of(flags)
    tiny = "tiny_" if str(config.get("variant", "")).startswith("tiny_") else ""
    conv_in = ldm.UNET_PREFIX + "input_blocks.0.0.weight"
    in_channels = shape_of(state, conv_in)[1] if conv_in in state else None
    if in_channels == 8 and flags["use_image_attention"]:
        raise CheckpointError(f"{source} looks like a DynamiCrafter checkpoint (the same keys as VideoCrafter I2V, "
                              "but an 8-channel conv_in: the image latent is concatenated to the noise); DynamiCrafter "
                              "is not a vdjax family. VideoCrafter I2V is configs/videocrafter.py:variant=i2v_512_v1.")
    use = (f"--config=configs/videocrafter.py:variant={tiny}{release}" if release else
           "a configs/videocrafter.py variant with these flags (its released ones: " + ", ".join(RELEASES) + ")")
    looks = f"VideoCrafter {release} checkpoint" if release else "VideoCrafter checkpoint of no released variant"
    if not ours:
        raise CheckpointError(f"{source} looks like a {looks} ({_describe(flags)}), but the {named} is not "
                              f"VideoCrafter's; use {use}.")
    if part not in VARIANT_PARTS or not whole:
        return
    want = config_flags(config)
    if flags != want:
        raise CheckpointError(
            f"{source} looks like a {looks} ({_describe(flags)}), but the {named} has {_describe(want)}; use {use}.")
    width, file_width = config.unet.block_out_channels[0], shape_of(state, conv_in)[0] if in_channels else None
    if file_width is not None and file_width != width:
        fits = {320: release, 32: f"tiny_{release}"}.get(file_width) if release else None
        raise CheckpointError(
            f"{source} is a VideoCrafter UNet of {file_width} channels at the first level, but the {named} has "
            f"{width}; use " + (f"--config=configs/videocrafter.py:variant={fits}." if fits else
                                 f"a config whose UNet has {file_width} channels at the first level."))
