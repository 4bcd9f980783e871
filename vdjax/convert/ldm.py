"""The original LDM single-file layout (Stability-AI/stablediffusion): SD 1.x/2.x `.ckpt`/`.safetensors` files and
the community DreamBooth / fine-tuned models that ship the same way.

One file holds every part under its own prefix: the UNet (`model.diffusion_model.`, openaimodel's numbered
`input_blocks.N.M` / `middle_block.M` / `output_blocks.N.M`), the VAE (`first_stage_model.`), the text encoder
(`cond_stage_model.transformer.` = transformers CLIP for SD 1.x, `cond_stage_model.model.` = OpenCLIP for SD 2.x)
and the noise-schedule buffers. Each part's map ignores the other parts' keys, so a part loads from the whole file.
The UNet's block numbers are derived from the config (any depth, levels and attention pattern).
"""
from __future__ import annotations

import re
import types
from typing import Callable, Mapping

import ml_collections
from flax import nnx

from vdjax.convert import hf_clip, openclip
from vdjax.convert.animatediff import is_motion_param
from vdjax.convert.diffusers import UNET_RENAMES
from vdjax.convert.keymap import PartMap, Path, load_params, path_to_key, rename, torch_leaf
from vdjax.convert.readers import CheckpointError, LazyStateDict, rewrite
from vdjax.models import unet3d, vae

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_PREFIX, OPENCLIP_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model."}

# Keys no vdjax model reads, by name: LatentDiffusion's registered noise-schedule buffers (vdjax's schedulers
# compute them) and `logvar`/`lvlb_weights`; EMA copies (`model_ema.*`: '-emaonly' files already hold the EMA
# weights in `model.diffusion_model.*`; pass ema=True to load_unet to read the copies instead); CLIP's
# `position_ids` (arange(77); some merged files carry a corrupted float copy — ignoring it is the fix), OpenCLIP's
# causal `attn_mask`, its pooled-output `text_projection` / `logit_scale`; training losses (`loss.*`: LPIPS and
# discriminator of VAE training dumps).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
                    "scale_arr")  # VideoCrafter's use_scale latent scaling per timestep
IGNORED = re.compile(rf"^({'|'.join(SCHEDULE_BUFFERS)})$|^model_ema\.|\.position_ids$|^{OPENCLIP_PREFIX}attn_mask$"
                     rf"|^(first_stage_model\.)?loss\.")


def ignored(key: str) -> bool:
    """A key of an LDM single file that no vdjax model reads (the named list above)."""
    return bool(IGNORED.search(key)) or (key.startswith(OPENCLIP_PREFIX) and bool(openclip.TEXT_UNUSED.search(key)))


# ---------------------------------------------------------------------------------------------------------------
# Configs from the LDM yaml's constructor arguments (`unet_config.params`, `first_stage_config.params`).

def unet_config(params: Mapping) -> ml_collections.ConfigDict:
    """vdjax UNet3D config (no temporal layers) from openaimodel `UNetModel` kwargs."""
    p = dict(params)
    if not p.get("use_spatial_transformer", True) or p.get("num_classes") is not None:
        raise ValueError("only text-conditioned UNets with spatial transformers (SD 1.x/2.x) map onto UNet3D")
    chans = tuple(p["model_channels"] * m for m in p["channel_mult"])
    depth = p.get("transformer_depth", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise ValueError(f"transformer_depth={depth}: UNet3D has one depth for every level")
        depth = depth[0]
    # Upstream: heads = num_heads (fixed), or ch // num_head_channels (fixed head width, SD 2.x).
    nhc = p.get("num_head_channels", -1)
    heads = tuple(c // nhc if nhc != -1 else p["num_heads"] for c in chans)
    cfg = unet3d.base_config()
    cfg.update(in_channels=p["in_channels"], out_channels=p["out_channels"], block_out_channels=chans,
               attention_levels=tuple(2 ** i in p["attention_resolutions"] for i in range(len(chans))),
               num_attention_heads=heads, layers_per_block=p["num_res_blocks"], transformer_layers=depth,
               cross_attention_dim=p["context_dim"], use_linear_projection=p.get("use_linear_in_transformer", False))
    return cfg


def vae_config(params: Mapping) -> ml_collections.ConfigDict:
    """vdjax AutoencoderKL config from ldm `AutoencoderKL` kwargs (`ddconfig`, `embed_dim`)."""
    dd = params["ddconfig"]
    if dd.get("attn_resolutions") or not dd.get("double_z", True) or dd["z_channels"] != params["embed_dim"]:
        raise ValueError("vdjax's AutoencoderKL is SD's KL-f8 kind: no level attention, double_z, "
                         f"z_channels == embed_dim; got {dict(dd)}, embed_dim={params['embed_dim']}")
    cfg = vae.base_config()
    cfg.update(in_channels=dd["in_channels"], out_channels=dd["out_ch"], latent_channels=params["embed_dim"],
               block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]), layers_per_block=dd["num_res_blocks"])
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Key functions: vdjax path -> LDM key.

RESNET = ((r"^norm1\.", "in_layers.0."), (r"^conv1\.", "in_layers.2."), (r"^time_emb_proj\.", "emb_layers.1."),
          (r"^norm2\.", "out_layers.0."), (r"^conv2\.", "out_layers.3."), (r"^conv_shortcut\.", "skip_connection."))
UNET_TOP = ((r"^conv_in\.", "input_blocks.0.0."), (r"^time_embedding\.linear_1\.", "time_embed.0."),
            (r"^time_embedding\.linear_2\.", "time_embed.2."), (r"^conv_norm_out\.", "out.0."),
            (r"^conv_out\.", "out.2."))


TEMPORAL_CONV = ((r"^norms\.(\d)\.", lambda m: f"conv{int(m[1]) + 1}.0."),
                 (r"^convs\.(\d)\.", lambda m: f"conv{int(m[1]) + 1}.{2 if m[1] == '0' else 3}."))
VIDEOCRAFTER_TOP = ((r"^init_attention\.", "init_attn.0."), (r"^fps_embedding\.linear_1\.", "fps_embedding.0."),
                    (r"^fps_embedding\.linear_2\.", "fps_embedding.2."))


def unet_key(config, prefix: str = UNET_PREFIX, ema: bool = False) -> Callable[[Path], str]:
    """vdjax UNet3D path -> LDM key. openaimodel numbers its blocks sequentially: input block 0 is conv_in, then
    per level `layers_per_block` [ResBlock, SpatialTransformer?] blocks and (not on the last level) a Downsample
    block; output blocks have `layers_per_block + 1` per level (deepest first), the Upsample appended to the
    level's last block after its ResBlock (and transformer, where the level has attention).

    VideoCrafter's openaimodel3d (motion.kind 'lvdm') adds to the same numbering: a TemporalTransformer after each
    SpatialTransformer (slot 2; in the middle block before the second ResBlock, which moves to slot 3), the
    ResBlocks' `temopral_conv` (sic), `init_attn.0` and `fps_embedding`.

    ema=True: the EMA copy in training dumps, `model_ema.` + the key after `model.` with the dots removed."""
    n, levels, attn = config.layers_per_block + 1, len(config.block_out_channels), tuple(config.attention_levels)
    temporal = config.motion.kind == "lvdm"  # temporal transformers are part of this layout

    def slot(kind: str, rest: str) -> str:
        if kind == "resnets":
            return "0." + rename(rest, RESNET)
        if kind == "temporal_convs":
            return "0.temopral_conv." + rename(rest, TEMPORAL_CONV)
        return f"{1 if kind == 'attentions' else 2}.{_sub(kind, rest)}"

    def block(key: str) -> str:
        kinds = "resnets|attentions|motion_modules|temporal_convs"
        if m := re.match(rf"down_blocks\.(\d+)\.({kinds})\.(\d+)\.(.*)", key):
            return f"input_blocks.{1 + int(m[1]) * n + int(m[3])}.{slot(m[2], m[4])}"
        if m := re.match(r"down_blocks\.(\d+)\.downsampler\.conv\.(.*)", key):
            return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
        if m := re.match(rf"mid_block\.({kinds})\.(\d+)\.(.*)", key):
            if m[1] in ("resnets", "temporal_convs") and m[2] == "1":  # the second ResBlock, after the transformers
                return f"middle_block.{3 if temporal else 2}.{slot(m[1], m[3])[2:]}"
            return f"middle_block.{slot(m[1], m[3])}"
        if m := re.match(rf"up_blocks\.(\d+)\.({kinds})\.(\d+)\.(.*)", key):
            return f"output_blocks.{int(m[1]) * n + int(m[3])}.{slot(m[2], m[4])}"
        if m := re.match(r"up_blocks\.(\d+)\.upsampler\.conv\.(.*)", key):
            u = int(m[1])
            has_attn = attn[levels - 1 - u]
            return f"output_blocks.{u * n + n - 1}.{1 + has_attn + (has_attn and temporal)}.conv.{m[2]}"
        if key.startswith("init_attention."):
            return "init_attn.0." + _sub("motion_modules", key[len("init_attention."):])
        return rename(rename(key, UNET_TOP), VIDEOCRAFTER_TOP)  # unmatched paths come out as 'missing' keys

    def key_fn(path: Path) -> str:
        key = prefix + torch_leaf(block(path_to_key(path)))
        return "model_ema." + key[len("model."):].replace(".", "") if ema else key
    return key_fn


def _sub(kind: str, rest: str) -> str:
    if kind == "resnets":
        return rename(rest, RESNET)
    return rename("." + rest, UNET_RENAMES)[1:]  # to_out.0, ff.net.0.proj, ff.net.2 as in diffusers


VAE_RENAMES = (
    (r"^(encoder)\.down_blocks\.(\d+)\.resnets\.", r"\1.down.\2.block."),
    (r"^(encoder)\.down_blocks\.(\d+)\.downsampler\.", r"\1.down.\2.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.attn_1\.to_([qkv])\.", r".attn_1.\1."),
    (r"\.attn_1\.to_out\.", ".attn_1.proj_out."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
)


def vae_key(config, prefix: str = VAE_PREFIX) -> Callable[[Path], str]:
    """vdjax AutoencoderKL path -> LDM key. LDM's `decoder.up.N` is the resolution level (N=0 full resolution,
    run last), vdjax's `decoder.up_blocks.u` the execution order: N = levels - 1 - u."""
    levels = len(config.block_out_channels)

    def key_fn(path: Path) -> str:
        key = path_to_key(path)
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsampler)\.(.*)", key):
            key = f"decoder.up.{levels - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.{m[3]}"
        return prefix + torch_leaf(rename(key, VAE_RENAMES))
    return key_fn


def clip_text_key(path: Path) -> str:
    """SD 1.x text encoder: transformers-4.x CLIPTextModel keys (with the `text_model.` level) under
    `cond_stage_model.transformer.`."""
    return CLIP_PREFIX + hf_clip.text_key(path)


# ---------------------------------------------------------------------------------------------------------------
# Lazy state-dict pre-passes: keys renamed/split and values reshaped on access, shapes known without reading, so
# a memory-mapped file stays on disk and shape-only key lists (manifests) can be checked.

def squeeze_attention(state_dict: Mapping) -> LazyStateDict:
    """The VAE mid attention's q/k/v/proj_out are 1x1 convs (O, I, 1, 1) in LDM, dense layers in vdjax: (O, I)."""
    def fn(key, shape):
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key) and len(shape) == 4 and shape[2:] == (1, 1):
            return [(key, shape[:2], lambda v: v.reshape(v.shape[:2]))]
    return rewrite(state_dict, fn)


def with_vae_prefix(state_dict: Mapping) -> Mapping:
    """A standalone LDM VAE file (e.g. vae-ft-mse-840000-ema-pruned.ckpt) has no `first_stage_model.` level."""
    if any(k.startswith(VAE_PREFIX) for k in state_dict):
        return state_dict
    return rewrite(state_dict, lambda key, shape: [(VAE_PREFIX + key, shape, None)])


# ---------------------------------------------------------------------------------------------------------------
# One map per part: key function, what to ignore (the other parts and the named list), pre-pass.

def _outside(part: str) -> Callable[[str], bool]:
    return lambda key: not key.startswith(PREFIXES[part]) or ignored(key)


def part_map(part: str, fmt: str, config) -> PartMap:
    """The map of `part` ('unet', 'vae', 'text_encoder') in a file of layout `fmt` ('ldm_sd1', 'ldm_sd2',
    'ldm_vae'; see vdjax.convert.formats); `config` holds `.unet` / `.vae` (a full model config)."""
    if fmt == "ldm_vae" and part != "vae":
        raise CheckpointError(f"an LDM VAE file holds no {part}; give the {part} a file of its own")
    if part == "unet":
        return PartMap(unet_key(config.unet), _outside("unet"))
    if part == "vae":
        return PartMap(vae_key(config.vae), _outside("vae"), lambda s: squeeze_attention(with_vae_prefix(s)))
    if part == "text_encoder" and fmt == "ldm_sd1":
        return PartMap(clip_text_key, _outside("text_encoder"))
    if part == "text_encoder" and fmt == "ldm_sd2":
        return PartMap(openclip.text_key(OPENCLIP_PREFIX), _outside("text_encoder"), openclip.split_in_proj)
    raise ValueError(f"no LDM map for part {part!r} in layout {fmt!r}")


def load_unet(model: unet3d.UNet3D, state_dict: Mapping, *, ema: bool = False,
              source: str = "LDM single file") -> None:
    """Fill a UNet3D's image-UNet parameters from an LDM file (whole file or UNet keys alone), strictly.

    Motion modules (AnimateDiff) are not in SD files: they are left as they are, for a motion-module file.
    ema=True reads the `model_ema.*` copies of a full training dump instead of `model.diffusion_model.*`."""
    ignore = ((lambda k: not k.startswith("model_ema.") or k in ("model_ema.decay", "model_ema.num_updates"))
              if ema else _outside("unet"))
    load_params(model, state_dict, unet_key(model.config, ema=ema), ignore=ignore,
                select=lambda p: not is_motion_param(p), source=source)


def load_vae(model: vae.AutoencoderKL, state_dict: Mapping, *, source: str = "LDM single file") -> None:
    """Fill an AutoencoderKL from an LDM file (whole file, or a standalone LDM VAE file)."""
    pm = part_map("vae", "ldm_vae", types.SimpleNamespace(vae=model.config))
    load_params(model, pm.prepare(state_dict), pm.key_fn, ignore=pm.ignore, source=source)


def load_text_encoder(model: nnx.Module, state_dict: Mapping, *, source: str = "LDM single file") -> None:
    """Fill SD 1.x's CLIPTextModel or SD 2.x's OpenCLIP TextTower (told by the model's type) from an LDM file."""
    from vdjax.models.openclip import TextTower

    pm = part_map("text_encoder", "ldm_sd2" if isinstance(model, TextTower) else "ldm_sd1", None)
    load_params(model, pm.prepare(state_dict), pm.key_fn, ignore=pm.ignore, source=source)
