"""Reading checkpoint files as lazy state dicts: one tensor in memory at a time.

- `.safetensors` (memory-mapped, no torch), and sharded ones through their `*.safetensors.index.json`;
- `.ckpt` / `.pt` / `.pth` / `.bin` through torch with `weights_only=True` (memory-mapped where the file allows),
  unwrapping `state_dict` and DeepSpeed's `module` (`_forward_module.` prefix) containers;
- diffusers snapshot folders: `read_folder` gives each component's state dict.
Every failure names the file and says what to do.
"""
from __future__ import annotations

import json
import os
import weakref
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

SAFETENSORS = (".safetensors",)
TORCH = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not hold what was asked for."""


class LazyStateDict(Mapping):
    """A read-only mapping key -> float32/int numpy array, loaded on access; `shape(key)` without loading."""

    def __init__(self, source: str, shapes: dict[str, tuple], load):
        self.source, self._shapes, self._load = source, shapes, load

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._shapes:
            raise KeyError(key)
        return self._load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key) -> bool:
        return key in self._shapes  # Mapping's default would read the tensor

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def subset(self, prefix: str, strip: bool = True) -> "LazyStateDict":
        """The keys under `prefix` (e.g. 'first_stage_model.'), with the prefix removed when `strip`."""
        inner = {k[len(prefix):] if strip else k: k for k in self._shapes if k.startswith(prefix)}
        return LazyStateDict(self.source, {k: self._shapes[v] for k, v in inner.items()},
                             lambda k: self._load(inner[k]))


def shape_of(state_dict: Mapping, key: str) -> tuple:
    return state_dict.shape(key) if isinstance(state_dict, LazyStateDict) else tuple(np.shape(state_dict[key]))


def rewrite(state_dict: Mapping, fn) -> LazyStateDict:
    """A lazy pre-pass: `fn(key, shape)` -> None (keep) or [(new_key, new_shape, transform(value) or None)].

    Keys are renamed/split and values reshaped on access; shapes are known without reading, so a memory-mapped
    file stays on disk and shape-only key lists (manifests) can be checked."""
    shapes, origin = {}, {}
    for key in state_dict:
        shape = tuple(shape_of(state_dict, key))
        for new, new_shape, transform in fn(key, shape) or [(key, shape, None)]:
            shapes[new], origin[new] = tuple(new_shape), (key, transform)

    def load(key):
        src, transform = origin[key]
        value = np.asarray(state_dict[src])
        return value if transform is None else transform(value)
    return LazyStateDict(getattr(state_dict, "source", "checkpoint"), shapes, load)


def _as_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: widen losslessly
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _read_safetensors(path: str) -> LazyStateDict:
    """The header is parsed here and each tensor read with `os.pread` into its own buffer. Not `mmap`: mapped pages
    stay resident once touched, so loading a model would hold the file *and* the model in memory."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file ({why}). The file may be truncated or "
                               "corrupt; download it again.")

    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    try:
        (length,) = np.frombuffer(os.pread(fd, 8, 0), "<u8") if size >= 8 else (None,)
        if length is None or 8 + length > size:
            raise corrupt("header longer than the file")
        header = json.loads(os.pread(fd, int(length), 8))
    except (ValueError, UnicodeDecodeError) as e:
        os.close(fd)
        raise corrupt(f"bad header: {e}") from e
    except CheckpointError:
        os.close(fd)
        raise
    header.pop("__metadata__", None)
    start = 8 + int(length)
    entries = {}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise corrupt(f"tensor {key!r} has dtype {info['dtype']}, which vdjax does not read")
        if start + end > size:
            os.close(fd)
            raise corrupt(f"tensor {key!r} ends at byte {start + end}, past the end of the file ({size} bytes)")
        entries[key] = (np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"]), start + begin, end - begin)

    def load(key):
        dtype, shape, offset, nbytes = entries[key]
        data = os.pread(fd, nbytes, offset)
        if len(data) != nbytes:
            raise corrupt(f"tensor {key!r} is cut short")
        return np.frombuffer(data, dtype).reshape(shape)
    state = LazyStateDict(path, {k: e[1] for k, e in entries.items()}, load)
    weakref.finalize(state, os.close, fd)  # the file stays open while its state dict can still be read
    return state


def _read_sharded_safetensors(index_path: str) -> LazyStateDict:
    try:
        weight_map = json.load(open(index_path))["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index (a JSON file with a 'weight_map'): {e}") from e
    folder = os.path.dirname(index_path)
    shards = {f: _read_safetensors(os.path.join(folder, f)) for f in sorted(set(weight_map.values()))}
    missing = [k for k, f in weight_map.items() if k not in shards[f]]
    if missing:
        raise CheckpointError(f"{index_path}: {len(missing)} key(s) listed in the index are not in their shard "
                              f"(e.g. {missing[0]!r}); a shard is incomplete — download it again.")
    return LazyStateDict(index_path, {k: shards[f].shape(k) for k, f in weight_map.items()},
                         lambda k: shards[weight_map[k]][k])


DEEPSPEED_PREFIX = "_forward_module."  # DeepSpeed's wrapper module, in front of every key of `ckpt['module']`


# IP-Adapter's .bin files hold {'image_proj': {...}, 'ip_adapter': {...}}; read as its .safetensors spells the same
# tensors: 'image_proj.<key>', 'ip_adapter.<key>'.
NESTED_PARTS = ("image_proj", "ip_adapter")


def _unwrap(obj, path: str) -> dict:
    """Lightning/LDM checkpoints nest the weights under 'state_dict'; DeepSpeed under 'module' with a prefix;
    IP-Adapter's .bin under 'image_proj' and 'ip_adapter' (flattened with those prefixes)."""
    import torch

    if (isinstance(obj, dict) and obj and set(obj) <= set(NESTED_PARTS)
            and all(isinstance(v, dict) for v in obj.values())):
        return {f"{name}.{k}": v for name, part in obj.items() for k, v in part.items() if isinstance(v, torch.Tensor)}
    for container in ("state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(container), dict):
            obj = obj[container]
            if container == "module":
                obj = {k[len(DEEPSPEED_PREFIX):] if k.startswith(DEEPSPEED_PREFIX) else k: v for k, v in obj.items()}
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors (found {type(obj).__name__} with keys "
                              f"{list(obj)[:5] if isinstance(obj, dict) else '-'}).")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _read_torch(path: str) -> LazyStateDict:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading {os.path.splitext(path)[1]} files needs torch; "
                              "pip install 'vdjax[torch]' (or convert the file to .safetensors).") from e
    import pickle
    import zipfile

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: torch's safe loader (weights_only=True) refuses this pickle: {str(e).splitlines()[0]}. "
            "vdjax never runs code from a checkpoint. If you trust the file, re-save its state dict as .safetensors "
            "in PyTorch and load that.") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read by torch ({str(e).splitlines()[0]}). The file may be "
                              "truncated or corrupt; download it again.") from e
    tensors = _unwrap(obj, path)
    return LazyStateDict(path, {k: tuple(v.shape) for k, v in tensors.items()}, lambda k: _as_numpy(tensors[k]))


def _without_deepspeed_prefix(state: LazyStateDict) -> LazyStateDict:
    """A DeepSpeed state dict saved flat (e.g. re-saved as .safetensors) keeps `_forward_module.` on every key."""
    if len(state) and all(k.startswith(DEEPSPEED_PREFIX) for k in state):
        return state.subset(DEEPSPEED_PREFIX)
    return state


def read_state_dict(path: str) -> LazyStateDict:
    """A checkpoint file (or a sharded safetensors index) -> lazy state dict."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; for a diffusers snapshot use read_folder(), or name the file")
    name = path.lower()
    if name.endswith(".safetensors.index.json"):
        return _without_deepspeed_prefix(_read_sharded_safetensors(path))
    if name.endswith(SAFETENSORS):
        return _without_deepspeed_prefix(_read_safetensors(path))
    if name.endswith(TORCH):
        return _without_deepspeed_prefix(_read_torch(path))
    raise CheckpointError(f"{path}: unknown file type; vdjax reads {', '.join(SAFETENSORS + TORCH)} files, "
                          "sharded '*.safetensors.index.json' and diffusers snapshot folders.")


# Component folders of a diffusers snapshot, and the weight files each may hold (preferred first).
COMPONENTS = ("unet", "vae", "text_encoder", "image_encoder", "motion_adapter")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin")


def read_component(folder: str) -> LazyStateDict:
    """One component folder (e.g. `unet/`) -> its weights."""
    for name in _WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_state_dict(path)
    raise CheckpointError(f"{folder}: no weight file found (looked for {', '.join(_WEIGHT_FILES)}).")


def read_folder(folder: str) -> dict[str, object]:
    """A diffusers snapshot (`model_index.json` + component folders) -> {component: LazyStateDict, ...}, plus
    'tokenizer' (its folder path) and 'scheduler' (its config dict) where present. A folder that is a single
    component (it has a weight file of its own, e.g. a MotionAdapter snapshot) -> {'self': LazyStateDict}."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        try:
            return {"self": read_component(folder)}
        except CheckpointError:
            raise CheckpointError(f"{folder}: neither a diffusers snapshot (no model_index.json) nor a component "
                                  "folder with a weight file.") from None
    out: dict[str, object] = {}
    for part in COMPONENTS:
        if os.path.isdir(os.path.join(folder, part)):
            out[part] = read_component(os.path.join(folder, part))
    if os.path.isdir(os.path.join(folder, "tokenizer")):
        out["tokenizer"] = os.path.join(folder, "tokenizer")
    scheduler = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler):
        out["scheduler"] = json.load(open(scheduler))
    return out
