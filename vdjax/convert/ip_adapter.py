"""IP-Adapter files (tencent-ailab/IP-Adapter): `ip-adapter_sd15` and `ip-adapter-plus_sd15`, `.safetensors` and `.bin`.

- `.safetensors`: `image_proj.<key>` (the ImageProjModel or Resampler state dict) and `ip_adapter.<idx>.to_k_ip.weight`
  / `.to_v_ip.weight` ((hidden, cross_attention_dim), no bias).
- `.bin`: `{'image_proj': {...}, 'ip_adapter': {...}}`, the same keys without the prefixes; `readers` flattens it to
  the `.safetensors` spelling.

`idx` is the position of the attention processor in `torch.nn.ModuleList(unet.attn_processors.values())` of
diffusers' `UNet2DConditionModel` (upstream `IPAdapter.load_ip_adapter`). diffusers lists processors in module
order: the down blocks, then the up blocks, then the mid block (its `__init__` registers `up_blocks` before it
assigns `mid_block`); within a transformer block attn1 (even idx, parameter-free `AttnProcessor`) before attn2 (odd
idx, `IPAttnProcessor`). For SD 1.5: 1 = down_blocks.0.attentions.0 ... 29 = up_blocks.3.attentions.2, 31 = mid_block
(tests/fixtures/manifests/ip_adapter*_sd15.json). vdjax derives the order from the UNet itself, so any depth and
attention pattern maps; motion modules are not in a 2-D UNet and take no index.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

from flax import nnx

from vdjax.convert.keymap import Path
from vdjax.convert.readers import CheckpointError, shape_of
from vdjax.models import resampler

PROJ_PREFIX, ADAPTER_PREFIX = resampler.IP_ADAPTER_PREFIX, "ip_adapter."
ADAPTER_KEY = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
IMAGE_KV = ("to_k_ip", "to_v_ip")
_BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

RELEASED = "ip-adapter_sd15 (plain: ImageProjModel, 4 tokens) or ip-adapter-plus_sd15 (Resampler, 16 tokens)"


def is_image_kv_param(path: Path) -> bool:
    """A decoupled cross-attention's image key/value projection (`attn2.to_k_ip` / `attn2.to_v_ip`) of the UNet."""
    return (len(path) >= 3 and path[-3] == "attn2" and path[-2] in IMAGE_KV
            and "motion_modules" not in path)


def attention_sites(model: nnx.Module) -> list[Path]:
    """The UNet's decoupled cross-attentions (paths ending in 'attn2') in diffusers' processor order."""
    sites = {path[:-2] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)) if is_image_kv_param(path)}
    return sorted(sites, key=lambda p: (_BLOCK_ORDER.get(p[0], 3), tuple(x for x in p if isinstance(x, int))))


def site_key(model: nnx.Module) -> Callable[[Path], str]:
    """vdjax path of a `to_k_ip`/`to_v_ip` kernel -> `ip_adapter.<idx>.to_k_ip.weight` (idx = 2 * site + 1)."""
    index = {site: 2 * i + 1 for i, site in enumerate(attention_sites(model))}

    def key_fn(path: Path) -> str:
        return f"{ADAPTER_PREFIX}{index.get(path[:-2], 'none')}.{path[-2]}.weight"
    return key_fn


def image_proj_key(path: Path) -> str:
    return resampler.image_proj_key(path, prefix=PROJ_PREFIX)


def is_adapter_key(key: str) -> bool:
    """A key of the UNet's projections (`ip_adapter.<idx>.*`), not the image_proj part's."""
    return key.startswith(ADAPTER_PREFIX)


def is_image_proj_key(key: str) -> bool:
    return key.startswith(PROJ_PREFIX)


def file_kind(state: Mapping) -> str:
    """'resampler' (IP-Adapter-Plus), 'image_proj_model' (plain) or what else the image projection is."""
    if f"{PROJ_PREFIX}latents" in state:
        return "resampler"
    if f"{PROJ_PREFIX}proj.weight" in state:
        return "image_proj_model"
    if any(k.startswith(f"{PROJ_PREFIX}proj.0.") for k in state):
        return "mlp_proj_model"  # ip-adapter_*_full-face (MLPProjModel)
    if any(k.startswith(f"{PROJ_PREFIX}perceiver_resampler.") for k in state):
        return "face_id_plus"
    return "none" if not any(is_image_proj_key(k) for k in state) else "unknown"


def config_kind(config) -> str:
    """The image projection a model config builds: `config.image_proj.kind` ('resampler' or 'image_proj_model'),
    else told by its fields (an ImageProjModel config has `clip_extra_context_tokens`)."""
    section = config.image_proj
    kind = section.get("kind") or ("image_proj_model" if "clip_extra_context_tokens" in section else "resampler")
    if kind not in ("resampler", "image_proj_model"):
        raise ValueError(f"config.image_proj.kind={kind!r}; choose 'resampler' (IP-Adapter-Plus, VideoCrafter I2V) or "
                         "'image_proj_model' (plain IP-Adapter)")
    return kind


def _base_of(width: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(width, f"a base with {width}-wide text context")


def check_file(state: Mapping, config, source: str, sites: int | None = None) -> None:
    """Refuse, saying what is needed, an IP-Adapter file that does not fit the config: one for another base (SDXL's
    2048-wide cross-attention, SDXL's ViT-bigG image embeds), another image projection than the config's, or
    another number of cross-attentions than the UNet's `sites` (when given)."""
    unet = config.unet
    context = unet.cross_attention_dim
    named = f"{config.get('family', 'this')} config" + (f" (variant {config.variant})" if "variant" in config else "")
    widths = sorted({shape_of(state, k)[1] for k in state if ADAPTER_KEY.match(k)})
    if widths and widths != [context]:
        raise CheckpointError(
            f"{source} is an IP-Adapter for {_base_of(widths[0])} (its to_k_ip/to_v_ip read {widths[0]}-wide "
            f"context), but the {named} has a UNet with {context}-wide cross-attention"
            + (" (SD 1.5)" if context == 768 else "") + f". Use an SD 1.5 IP-Adapter: {RELEASED}.")
    kind = file_kind(state)
    if kind in ("mlp_proj_model", "face_id_plus", "unknown"):
        raise CheckpointError(f"{source}: an IP-Adapter whose image projection ({kind}) vdjax does not build; it "
                              f"reads {RELEASED}.")
    if "image_proj" in config and kind != "none":
        want = config_kind(config)
        proj = config.image_proj
        if kind != want:
            use = ("config.image_proj = vdjax.models.resampler.image_proj_config('ip_adapter_sd15') with "
                   "kind='image_proj_model' and config.unet.image_context_tokens=4"
                   if kind == "image_proj_model" else
                   "config.image_proj = vdjax.models.resampler.resampler_config('ip_adapter_plus_sd15') and "
                   "config.unet.image_context_tokens=16")
            what = {"resampler": "an IP-Adapter-Plus image projection (Resampler)",
                    "image_proj_model": "a plain IP-Adapter image projection (ImageProjModel)"}
            raise CheckpointError(f"{source} holds {what[kind]}, but the {named} builds {what[want]}; use {use}.")
        if kind == "image_proj_model":
            out, embeds = shape_of(state, f"{PROJ_PREFIX}proj.weight")[:2]
            norm = shape_of(state, f"{PROJ_PREFIX}norm.weight")[0] if f"{PROJ_PREFIX}norm.weight" in state else 0
            if norm == proj.cross_attention_dim and embeds != proj.clip_embeddings_dim:
                raise CheckpointError(
                    f"{source}: its ImageProjModel reads {embeds}-wide image embeds (an image encoder with "
                    f"projection_dim {embeds}, e.g. ViT-bigG for ip-adapter_sd15_vit-G), but the {named} has "
                    f"clip_embeddings_dim={proj.clip_embeddings_dim} (IP-Adapter's ViT-H/14 image encoder: 1024). Use "
                    f"{RELEASED}, or a config whose image encoder and image_proj match the file.")
            if norm != proj.cross_attention_dim:
                encoder = {1024: "; ViT-H/14 image encoder", 1280: "; ViT-bigG image encoder"}.get(embeds, "")
                raise CheckpointError(
                    f"{source}: its ImageProjModel maps {embeds}-wide image embeds to {norm}-wide tokens "
                    f"({_base_of(norm)}{encoder}), but the {named} wants {proj.clip_embeddings_dim} -> "
                    f"{proj.cross_attention_dim}. Use an SD 1.5 IP-Adapter: {RELEASED}.")
            tokens = out // norm if norm and out % norm == 0 else None
            if tokens != proj.clip_extra_context_tokens:
                raise CheckpointError(f"{source}: {tokens} image tokens, but the {named} has "
                                      f"clip_extra_context_tokens={proj.clip_extra_context_tokens}; set it (and "
                                      f"config.unet.image_context_tokens) to {tokens}.")
        elif f"{PROJ_PREFIX}proj_in.weight" in state and f"{PROJ_PREFIX}proj_out.weight" in state:
            embeds = shape_of(state, f"{PROJ_PREFIX}proj_in.weight")[1]
            out = shape_of(state, f"{PROJ_PREFIX}proj_out.weight")[0]
            if out != proj.output_dim or embeds != proj.embedding_dim:
                raise CheckpointError(
                    f"{source}: its Resampler maps {embeds}-wide image-encoder states to {out}-wide tokens "
                    f"({_base_of(out)}), but the {named} wants {proj.embedding_dim} -> {proj.output_dim}. Use an "
                    f"SD 1.5 IP-Adapter: {RELEASED}.")
    indices = {int(ADAPTER_KEY.match(k)[1]) for k in state if ADAPTER_KEY.match(k)}
    if indices and sites is not None and len(indices) != sites:
        raise CheckpointError(
            f"{source} has image key/value projections for {len(indices)} cross-attentions, but the {named}'s UNet "
            f"has {sites}" + (" (SD 1.5: 16)" if sites == 16 else "") + f". Use an SD 1.5 IP-Adapter: {RELEASED}.")
