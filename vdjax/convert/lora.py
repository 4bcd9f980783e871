"""Merging LoRA weights into a model's parameters: W += scale * (alpha / rank) * up @ down, several LoRAs at once.

Layouts read (a state dict of arrays; reading files is `vdjax.convert.readers`' job):
- kohya/sd-scripts: `lora_unet_<module, '.' -> '_'>.lora_down.weight` / `.lora_up.weight` / `.alpha`, and
  `lora_te_<module>` for the text encoder; LoCon conv modules (down (r, I, kh, kw), up (O, r, 1, 1)) alike.
- diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (optionally `.lora_A.<adapter>.weight`,
  `.alpha`), `text_encoder.<module>...`, or without a prefix (then taken to be for the part being merged);
  diffusers' older `<module>.lora.down.weight`, `.lora_linear_layer.down.weight` and `attn1.processor.to_q_lora.down
  .weight` / `self_attn.to_q_lora.down.weight` (its alphas were kept outside the file: fold them into `scale`).
A missing alpha means alpha = rank (scale 1), as in kohya and diffusers.

A LoRA module is matched to the model through the part's `key_fn` (the same map that loads the checkpoint): the
parameter whose torch key is `<module>.weight`. Names are compared with '.' -> '_', which is how kohya spells them,
so one table serves every layout. Everything is checked before anything is written: a module that names no layer
of the model (an SDXL LoRA on SD 1.5), a part SD 1.5 does not have (`lora_te2_`), LoHa/LoKr/DoRA keys, or a
shape mismatch raise one `LoraError` listing all of them, and the model is left unchanged.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdjax.convert.diffusers import unet_key
from vdjax.convert.hf_clip import text_key
from vdjax.convert.keymap import Path, to_flax_layout

KEY_FNS = {"unet": unet_key, "text_encoder": text_key}
_KOHYA = re.compile(r"^lora_(unet|te\d?)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(.+?)\.(?:(lora_A|lora_B)(?:\.[^.]+)?\.weight|lora(?:_linear_layer)?\.(down|up)\.weight"
                   r"|(alpha))$")
_PROCESSOR = re.compile(r"^(.+?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_CLIP_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A": "down", "lora_B": "up", "down": "down",
         "up": "up", "alpha": "alpha"}
_PREFIX_PART = {"unet": "unet", "text_encoder": "text_encoder", "te": "text_encoder"}


class LoraError(ValueError):
    pass


def _parse(key: str, part: str) -> tuple[str, str, str] | None:
    """A LoRA key -> (part, module name with '_' for '.', role), or None when the key is in no known layout."""
    m = _KOHYA.match(key)
    if m:  # lora_te1_/lora_te2_ (SDXL's two encoders) stay parts of their own, which no SD 1.5 model has
        return _PREFIX_PART.get(m[1], m[1]), m[2], _ROLE[m[3]]
    if key.startswith("lora_"):
        return None  # kohya keys of another kind: LoHa (hada_*), LoKr (lokr_*), DoRA (dora_scale), Tucker (lora_mid)
    m = _PROCESSOR.match(key)
    if m:  # diffusers' old names: `attn1.processor.to_q_lora` (UNet), `self_attn.to_q_lora` (CLIP's q_proj)
        proj = _CLIP_PROJ[m[3]] if m[1].endswith("self_attn") else "to_out.0" if m[3] == "to_out" else m[3]
        module, role = f"{m[1]}.{proj}", m[4]
    else:
        m = _PEFT.match(key)
        if not m:
            return None
        module, role = m[1], _ROLE[m[2] or m[3] or m[4]]
    head, _, rest = module.partition(".")
    if head in ("unet", "text_encoder", "text_encoder_2"):
        part, module = _PREFIX_PART.get(head, head), rest
    return part, module.replace(".", "_"), role


def _targets(model: nnx.Module, key_fn: Callable[[Path], str]) -> dict[str, tuple[Path, nnx.Variable, str]]:
    """'<torch module, '.' -> '_'>' -> (path, parameter, torch key) for every kernel of the model."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = key_fn(path)
        if path[-1] == "kernel" and key.endswith(".weight"):
            out[key[:-len(".weight")].replace(".", "_")] = (path, var, key)
    return out


def _lookup(targets, name):
    # transformers 5.x saves CLIPTextModel without `text_model.`, so PEFT files from it may lack it too.
    return targets.get(name) or targets.get("text_model_" + name)


def _torch_shape(var) -> tuple[int, ...]:
    """The torch layout of a flax kernel: (in, out) -> (out, in); (kh, kw, I, O) -> (O, I, kh, kw)."""
    s = tuple(var.shape)
    return (s[-1], s[-2], *s[:-2])


def lora_deltas(model: nnx.Module, state_dict: Mapping[str, np.ndarray], scale: float = 1.0, *, part: str = "unet",
                key_fn: Callable[[Path], str] | None = None, source: str = "LoRA") -> tuple[dict, int]:
    """The float32 updates (flax layout) one LoRA makes to `model`, by parameter path; and how many modules it has
    for other parts (skipped). Raises `LoraError` listing every module that does not fit."""
    targets = _targets(model, key_fn or KEY_FNS[part])
    modules, unknown, other = defaultdict(dict), [], set()
    for key, value in state_dict.items():
        parsed = _parse(key, part)
        if parsed is None:
            unknown.append(key)
        elif parsed[0] in KEY_FNS and parsed[0] != part:
            other.add(parsed[:2])  # e.g. the text-encoder half of a file while merging the UNet
        else:
            modules[parsed[:2]][parsed[2]] = np.asarray(value, np.float32)
    deltas, problems = {}, [f"{k}: not a LoRA key vdjax reads (LoHa/LoKr/DoRA/full diffs are not supported)"
                            for k in sorted(unknown)]
    for (mpart, name), parts in sorted(modules.items()):
        label = f"{mpart}:{name}"
        target = _lookup(targets, name) if mpart == part else None
        if target is None:
            problems.append(f"{label}: no such layer in the model ({part})" if mpart == part else
                            f"{label}: the model has no part {mpart!r}")
            continue
        if "down" not in parts or "up" not in parts:
            problems.append(f"{label}: needs both down (lora_A) and up (lora_B), has {sorted(parts)}")
            continue
        path, var, torch_key = target
        down, up = parts["down"], parts["up"]
        rank, shape = down.shape[0], _torch_shape(var)
        # Linear (r, in) / (out, r); conv (r, I, kh, kw) / (O, r, 1, 1): flatten to matrices, multiply, and reshape
        # to the layer's torch shape (a linear LoRA on a 1x1 conv, or the reverse, fits too).
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(rank, -1)
        if up2.shape != (shape[0], rank) or down2.shape[1] != int(np.prod(shape[1:])):
            problems.append(f"{label}: down {down.shape} and up {up.shape} do not fit {torch_key} {shape}")
            continue
        alpha = float(np.asarray(parts.get("alpha", rank)).reshape(()))
        delta = (scale * alpha / rank) * (up2 @ down2)
        deltas[path] = to_flax_layout(delta.reshape(shape), len(shape))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise LoraError(f"{source} does not fit the model's {part} ({len(problems)} problem(s)):\n  " +
                        "\n  ".join(shown) + "\n  Check that the LoRA is for this base model (SD 1.5, not SDXL).")
    return deltas, len(other)


def merge_loras(model: nnx.Module, loras: Sequence[tuple], *, part: str = "unet",
                key_fn: Callable[[Path], str] | None = None) -> dict:
    """Add several LoRAs to `model`'s parameters in place: `loras` is [(state_dict, scale[, source name]), ...].

    All are checked before any parameter changes. Returns {'layers': parameters changed, 'modules': modules merged
    per LoRA, 'skipped': modules per LoRA that are for another part}.
    """
    if part not in KEY_FNS and key_fn is None:
        raise ValueError(f"part={part!r}; choose one of {sorted(KEY_FNS)} or pass key_fn")
    total, counts, skipped = {}, [], []
    for i, (state_dict, scale, *name) in enumerate(loras):
        deltas, other = lora_deltas(model, state_dict, scale, part=part, key_fn=key_fn,
                                    source=name[0] if name else f"LoRA #{i}")
        for path, delta in deltas.items():
            total[path] = total.get(path, 0.0) + delta
        counts.append(len(deltas))
        skipped.append(other)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, delta in total.items():
        var = flat[path]
        # Sum in float32 whatever the parameter dtype, then cast back once.
        var.set_value((var.get_value().astype(jnp.float32) + jnp.asarray(delta)).astype(var.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return {"layers": len(total), "modules": counts, "skipped": skipped}


def merge_lora(model: nnx.Module, state_dict: Mapping[str, np.ndarray], scale: float = 1.0, *, part: str = "unet",
               key_fn: Callable[[Path], str] | None = None, source: str = "LoRA") -> dict:
    """Add one LoRA, `scale` times, to `model`'s `part` ('unet' or 'text_encoder') in place; see `merge_loras`."""
    return merge_loras(model, [(state_dict, scale, source)], part=part, key_fn=key_fn)
