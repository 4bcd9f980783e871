"""I2V-Adapter's released files (KwaiVGI/I2V-Adapter; Hugging Face space-xun/i2v_adapter).

- `i2v_module.pth` (format 'i2v_adapter_module'): the first-frame attention of every spatial self-attention,
  `<site>.transformer_blocks.0.attn1.to_q_ff.weight` (no bias), `.attn1.to_out_ff.weight` and `.attn1.to_out_ff.bias`,
  in the UNet3D's (diffusers') names, perhaps under 'state_dict' (upstream `load_weights` loads it into the whole
  UNet with strict=False and asserts no unexpected key). tests/fixtures/manifests/i2v_adapter_i2v_module.json.
- `animatediff_v15_v1_ipplus.pth` (format 'i2v_adapter_unet'): no manifest is available; its layout is inferred from
  the code that reads it. Upstream `UNet3DConditionModel.from_pretrained_ip` loads it as the *whole* UNet3D state
  dict (`model.load_state_dict(torch.load(file), strict=False)`) after looking up `attn1.to_q.weight` in it for every
  spatial self-attention (to initialise `to_q_ff`), so it holds: the SD 1.5 spatial UNet in diffusers' names
  (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`, `...to_out.0.weight`, `...ff.net.0.proj`),
  AnimateDiff v1's motion modules in the original AnimateDiff names (`down_blocks.0.motion_modules.0.
  temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight`, `pos_encoder.pe` of 24 positions), and
  IP-Adapter-Plus's `<site>.transformer_blocks.0.attn2.to_k_ip.weight` / `.to_v_ip.weight` (`IPAdapterAttention`).
  It may also carry `attn1.to_q_ff` / `to_out_ff` (and older `to_k_ff` / `to_v_ff`): upstream overrides those
  (to_q_ff from to_q, then i2v_module.pth), so vdjax ignores them by name.

  As `motion_module=` next to a base model (SD 1.5 or a community fine-tune, as upstream's `--dreambooth_path`
  overrides the spatial weights), it gives the motion modules and the image key/value projections; its spatial
  weights are ignored by name (each must be one of the UNet's spatial keys; anything else is refused). As `unet=`
  (no separate motion module) it gives the whole UNet but the first-frame attention, as `from_pretrained_ip`.

Without `i2v_module.pth` the first-frame attention starts as upstream initialises it: `to_q_ff` a copy of the
base's `to_q`, `to_out_ff` zero (the adapted UNet then equals the base UNet), with a warning.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Iterable, Mapping

import numpy as np

from vdjax.convert import animatediff, diffusers
from vdjax.convert.keymap import Path
from vdjax.convert.readers import LazyStateDict

log = logging.getLogger(__name__)

FIRST_FRAME = ("to_q_ff", "to_out_ff")
# Keys of the first-frame branch in a companion file: ignored by name (upstream replaces them).
FIRST_FRAME_KEY = re.compile(r"\.attn1\.(to_[qkv]_ff\.weight|to_out_ff\.(weight|bias))$")
IMAGE_KV_KEY = re.compile(r"\.attn2\.to_[kv]_ip\.weight$")


def is_first_frame_param(path: Path) -> bool:
    """A first-frame attention parameter (`attn1.to_q_ff` / `attn1.to_out_ff`) of the UNet."""
    return len(path) >= 3 and path[-3] == "attn1" and path[-2] in FIRST_FRAME and "motion_modules" not in path


def module_key(path: Path) -> str:
    """vdjax path -> i2v_module.pth key (diffusers' UNet names)."""
    return diffusers.unet_key(path)


def unet_key(path: Path) -> str:
    """vdjax path -> animatediff_v15_v1_ipplus.pth key: motion modules in AnimateDiff's names, the rest diffusers'."""
    return animatediff.motion_key(path) if animatediff.is_motion_param(path) else diffusers.unet_key(path)


def to_q_path(path: Path) -> Path:
    """The base self-attention's `to_q` of a `to_q_ff` parameter (upstream initialises one from the other)."""
    return (*path[:-2], "to_q", path[-1])


def unet_ignored(spatial_keys: Iterable[str]) -> Callable[[str], bool]:
    """What a companion file may hold that its role does not read: position tables, the first-frame branch, and
    (as a motion-module file) the UNet's spatial keys, named exactly; any other key is unexpected."""
    spatial = frozenset(spatial_keys)
    return lambda key: (bool(animatediff.POSITION_TABLE.search(key)) or bool(FIRST_FRAME_KEY.search(key))
                        or key in spatial)


def initial_first_frame(paths_shapes: Mapping[Path, tuple], source: str = "zero initialisation") -> LazyStateDict:
    """The zero `to_out_ff` weights and biases upstream starts from, as a state dict keyed like i2v_module.pth (torch
    layout: Linear (out, in))."""
    shapes = {}
    for path, shape in paths_shapes.items():
        if path[-2] == "to_out_ff":
            shapes[module_key(path)] = tuple(shape[::-1]) if path[-1] == "kernel" else tuple(shape)
    return LazyStateDict(source, shapes, lambda key: np.zeros(shapes[key], np.float32))


def warn_initialised(source: str) -> None:
    log.warning("No I2V-Adapter module (i2v_module.pth) given: the first-frame attention starts as upstream "
                "initialises it (to_q_ff = to_q of %s, to_out_ff = 0), so the UNet behaves as the base model. Pass "
                "i2v_module= (--i2v_module) to load the released adapter.", source)
