"""Small argument parsers shared by the launch scripts."""
from __future__ import annotations

import json
import logging
import sys
import time

from absl import flags


def parse_lora(spec: str) -> tuple[str, float]:
    """'path/to/lora.safetensors:0.8' -> (path, 0.8); no scale (or a ':' inside the path) -> scale 1.0."""
    path, sep, scale = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return spec, 1.0


def quiet_library_logs() -> None:
    """Show vdjax's own INFO lines (a run resumed, a sample written) but only the warnings of the libraries: Orbax
    writes some 30 INFO lines per checkpoint saved or loaded, JAX one per backend it cannot start. An explicit
    --verbosity (absl's flag: 0 = INFO, -1 = WARNING, ...) is left as given."""
    if flags.FLAGS["verbosity"].present:
        return
    logging.getLogger().setLevel(logging.INFO)
    for name in ("absl", "jax"):  # Orbax logs through absl.logging, whose logger is 'absl'
        logging.getLogger(name).setLevel(logging.WARNING)


class ProgressBar:
    """A one-line progress bar on stderr: bar(label, done, total)."""

    def __init__(self, width: int = 30):
        self.width, self.start = width, time.perf_counter()

    def __call__(self, label: str, done, total) -> None:
        done, total = int(done), int(total)
        filled = int(self.width * done / total)
        sys.stderr.write(f"\r{label:<13}[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                         f"{time.perf_counter() - self.start:6.1f}s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class WeightFlags:
    """--model/--unet/--motion_module/--vae/--text_encoder/--lora, shared by the scripts that read PyTorch files."""

    def __init__(self):
        self._files = {
            "model": flags.DEFINE_string("model", None, "A whole PyTorch model: single file or diffusers snapshot "
                                                        "folder."),
            "unet": flags.DEFINE_string("unet", None, "UNet weights (file or component folder)."),
            "motion_module": flags.DEFINE_string("motion_module", None, "AnimateDiff motion module (mm_*.ckpt), "
                                                 "MotionAdapter folder, or I2V-Adapter's "
                                                 "animatediff_v15_v1_ipplus.pth."),
            "vae": flags.DEFINE_string("vae", None, "VAE weights (file or component folder)."),
            "text_encoder": flags.DEFINE_string("text_encoder", None, "Text encoder weights (file or folder)."),
            "image_encoder": flags.DEFINE_string("image_encoder", None, "Image encoder: IP-Adapter's "
                                                 "models/image_encoder folder (transformers "
                                                 "CLIPVisionModelWithProjection) or its weight file."),
            "image_proj": flags.DEFINE_string("image_proj", None, "Image projection weights (default: "
                                              "--ip_adapter's)."),
            "i2v_module": flags.DEFINE_string("i2v_module", None, "I2V-Adapter first-frame attention "
                                              "(i2v_module.pth)."),
            "ip_adapter": flags.DEFINE_string("ip_adapter", None, "SD 1.5 IP-Adapter: ip-adapter-plus_sd15 or "
                                              "ip-adapter_sd15 (.bin or .safetensors)."),
        }
        self._lora = flags.DEFINE_multi_string("lora", [], "LoRA file with its scale, PATH:SCALE (1.0 if omitted); "
                                                           "repeatable.")

    def files(self) -> dict:
        """{part: path} of the flags given (for vdjax.convert.sources.load_models)."""
        return {k: f.value for k, f in self._files.items() if f.value}

    def loras(self) -> list[tuple[str, float]]:
        return [parse_lora(s) for s in self._lora.value]


def pipeline_class(config):
    """The pipeline a config samples with: MagDiff, I2V-Adapter, VideoCrafter I2V, or text-to-video."""
    from vdjax.pipelines.i2v import I2VPipeline
    from vdjax.pipelines.i2v_adapter import I2VAdapterPipeline
    from vdjax.pipelines.magdiff import MagDiffPipeline
    from vdjax.pipelines.t2v import T2VPipeline

    if config.get("family") == "magdiff":
        return MagDiffPipeline
    if config.unet.get("first_frame_attention"):
        return I2VAdapterPipeline
    return I2VPipeline if "image_encoder" in config else T2VPipeline


def model_differences(config, saved, parts) -> list[str]:
    """'part.key' for each model setting (of `parts`) where `config` and a folder's config.json (`saved`) differ;
    values compared as JSON stores them (tuples as lists, sub-configs as dicts)."""
    def plain(value):
        return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value, default=str))

    return [f"{part}.{key}" for part in parts if part in config
            for key in sorted(set(config[part]) | set(saved.get(part, {})))
            if plain(config[part].get(key)) != plain(saved.get(part, {}).get(key))]
