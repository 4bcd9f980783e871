"""Convert PyTorch checkpoints into a vdjax model folder (Orbax checkpoints + config) for fast reloads.

    python launch/convert.py --config=configs/animatediff_sd15.py:variant=v2 \
        --model=/path/to/v1-5-pruned-emaonly.safetensors --motion_module=/path/to/mm_sd_v15_v2.ckpt \
        --lora=/path/to/style.safetensors:0.8 --dtype=bfloat16 --output=/path/to/sd15_mm_v2

`--model` is a single file (the original LDM layout, as community checkpoints ship) or a diffusers snapshot
folder; `--unet`, `--vae`, `--text_encoder` replace single parts. Nothing is written at `--output` unless the
whole conversion succeeds.
"""
from __future__ import annotations

import time

import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from launch_helpers import ProgressBar, WeightFlags, quiet_library_logs
from vdjax.convert import converted, sources

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model family config (path:arg).", lock_config=False)
_WEIGHTS = WeightFlags()
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Stored parameter dtype.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write (must not exist unless --overwrite).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def main(argv):
    del argv
    quiet_library_logs()
    start = time.perf_counter()
    files = _WEIGHTS.files()
    try:
        models = sources.load_models(_CONFIG.value, dtype=getattr(jnp, _DTYPE.value), loras=_WEIGHTS.loras(),
                                     progress=lambda part, i, n, key, bar=ProgressBar(): bar(part, i, n), **files)
    except converted.CheckpointError as e:  # a file that is not what the config needs: its message says what to give
        raise app.UsageError(str(e)) from None
    summary = converted.save(_OUTPUT.value, _CONFIG.value, models, overwrite=_OVERWRITE.value,
                             sources=files | {"lora": [p for p, _ in _WEIGHTS.loras()]})
    print(f"{'part':<14}{'parameters':>15}{'MiB':>10}  dtype")
    for part, info in summary["parts"].items():
        print(f"{part:<14}{info['parameters']:>15,}{info['bytes'] / 2**20:>10.1f}  {info['dtype']}")
    print(f"wrote {_OUTPUT.value} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "output"])
    app.run(main)
