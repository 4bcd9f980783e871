"""diffusers layout: `UNet2DConditionModel` and `UNetMotionModel` / `MotionAdapter` state dicts.

vdjax's module names follow diffusers', so the map is a short list of renames plus the layout transforms.
"""
from __future__ import annotations

from vdjax.convert.keymap import Path, path_to_key, rename, torch_leaf

UNET_RENAMES = (
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
    (r"\.downsampler\.", ".downsamplers.0."),
    (r"\.upsampler\.", ".upsamplers.0."),
)


def unet_key(path: Path) -> str:
    """vdjax UNet3D parameter path -> diffusers state-dict key."""
    return torch_leaf(rename(path_to_key(path), UNET_RENAMES))


def vae_key(path: Path) -> str:
    """vdjax AutoencoderKL parameter path -> diffusers `AutoencoderKL` key (same renames as the UNet)."""
    return unet_key(path)


def unet_ignored(key: str) -> bool:
    # Sinusoidal tables diffusers may register as buffers; vdjax computes them.
    return key.endswith(".pos_embed.pe")
