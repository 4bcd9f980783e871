"""Reading one upstream golden case (format: ../shared/fixtures/README.md)."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from safetensors.numpy import load_file


@dataclasses.dataclass
class Case:
    path: pathlib.Path
    root: pathlib.Path  # the fixtures directory that `weights_file(s)` paths are relative to
    meta: dict

    @property
    def family(self) -> str:
        return self.meta.get("family") or self.path.parent.name

    def io(self) -> dict[str, np.ndarray]:
        """Inputs and outputs; floating arrays upcast to float32 (inputs are float16-exact)."""
        with np.load(self.path / "io.npz") as data:
            return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in data.items()}

    def weights(self) -> dict[str, np.ndarray]:
        """The state dict, float16 weights upcast to float32, keys the configuration does not build removed."""
        if "weights_files" in self.meta:
            files = [self.root / f for f in self.meta["weights_files"]]
        elif "weights_file" in self.meta:
            files = [self.root / self.meta["weights_file"]]
        else:
            files = [self.path / "weights.safetensors"]
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        for key in self.meta.get("weights_unused_keys", []):
            state.pop(key, None)
        return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in state.items()}


def load(path: pathlib.Path, root: pathlib.Path) -> Case:
    return Case(path, root, json.loads((path / "meta.json").read_text()))


def tolerance(reference: np.ndarray) -> float:
    """float32 parity: 1e-4 absolute on O(1) outputs, scaled up with outputs larger than that."""
    return 1e-4 * max(1.0, float(np.std(reference)))
