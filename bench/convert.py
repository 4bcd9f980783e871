"""Load a full-size SD 1.5 single-file checkpoint: vdjax (device-ready parameters) vs diffusers `from_single_file`.

    python bench/convert.py [--workdir /tmp/vdjax_bench_convert] [--repeats 1]

The benchmark writes a random float16 `.safetensors` file with every key and shape of the released SD 1.5 file
(tests/fixtures/manifests/sd15_ldm.json) and the diffusers configs of SD 1.5 (offline). Each loader runs in its own
process, so each one's peak RSS is its own; speed does not depend on the weights' values. Appends to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(ROOT, "tests", "fixtures", "manifests", "sd15_ldm.json")

VDJAX = r"""
import sys, time, resource, json
start = time.perf_counter()
import jax, jax.numpy as jnp
sys.path.insert(0, ROOT)
from ml_collections import ConfigDict
import importlib.util
spec = importlib.util.spec_from_file_location("cfg", ROOT + "/configs/animatediff_sd15.py")
cfg_mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg_mod)
from vdjax.convert import sources
models = sources.load_models(cfg_mod.get_config("variant=sd15"), model=FILE, dtype=jnp.float16)
jax.block_until_ready([jax.tree.leaves(m) for m in models.values() if not isinstance(m, str)])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

DIFFUSERS = r"""
import sys, time, resource, json
start = time.perf_counter()
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_single_file(FILE, config=CONFIG, local_files_only=True, torch_dtype=torch.float16,
                                                safety_checker=None)
returned = time.perf_counter() - start
# from_single_file returns with the tensors still memory-mapped; reading every weight once makes them resident.
with torch.no_grad():
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        for p in part.parameters():
            p.view(-1)[:: max(1, 2048 // p.element_size())].sum()  # one element per 4 KiB page
print(json.dumps({"seconds": returned, "resident_seconds": time.perf_counter() - start,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def write_checkpoint(path: str) -> None:
    from safetensors.numpy import save_file

    manifest = json.load(open(MANIFEST))
    rng = np.random.default_rng(0)
    tensors = {k: (rng.standard_normal(int(np.prod(s)), dtype=np.float32) * 0.02).astype(np.float16).reshape(s)
               for k, s in manifest["keys"].items()}
    save_file(tensors, path)


def write_diffusers_config(folder: str) -> None:
    """SD 1.5's diffusers configs (no weights), so that from_single_file runs offline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    sys.path.insert(0, ROOT)
    from vdjax.models.clip_tokenizer import write_tokenizer_folder

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        unet.save_config(f"{folder}/unet")
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                      sample_size=512).save_config(f"{folder}/vae")
    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   hidden_act="quick_gelu", projection_dim=768).save_pretrained(f"{folder}/text_encoder")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(f"{folder}/scheduler")
    write_tokenizer_folder(f"{folder}/tokenizer")
    json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
               "safety_checker": [None, None], "feature_extractor": [None, None]},
              open(f"{folder}/model_index.json", "w"))


def run(code: str, **names) -> dict:
    prelude = "".join(f"{k} = {v!r}\n" for k, v in names.items())
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/vdjax_bench_convert")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    file = os.path.join(args.workdir, "sd15_random_fp16.safetensors")
    config = os.path.join(args.workdir, "sd15_config")
    if not os.path.exists(file):
        write_checkpoint(file)
    if not os.path.exists(config):
        write_diffusers_config(config)
    size = os.path.getsize(file) / 2**30
    rows = {}
    for name, code, extra in (("vdjax", VDJAX, {"ROOT": ROOT}), ("diffusers", DIFFUSERS, {"CONFIG": config})):
        runs = [run(code, FILE=file, **extra) for _ in range(args.repeats)]
        rows[name] = {"seconds": float(np.median([r["seconds"] for r in runs])),
                      "resident": float(np.median([r.get("resident_seconds", r["seconds"]) for r in runs])),
                      "peak_rss_gib": max(r["peak_rss_gib"] for r in runs)}
    ratio = rows["vdjax"]["seconds"] / rows["diffusers"]["seconds"]
    lines = [f"### convert: SD 1.5 single file ({size:.2f} GiB fp16 safetensors) -> device-ready fp16 parameters",
             "", f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; CPU",
             f"- command: `python bench/convert.py --repeats {args.repeats}` (median of {args.repeats}; each "
             "loader in a fresh process, import time included)", "",
             "| loader | wall s (returned) | wall s (every weight read) | peak RSS GiB | RSS / file |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['resident']:.1f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['peak_rss_gib'] / size:.2f} |")
    resident = rows["vdjax"]["resident"] / rows["diffusers"]["resident"]
    lines += ["", f"vdjax / diffusers time: {ratio:.2f} as returned, {resident:.2f} with every weight read", ""]
    print("\n".join(lines))
    if not args.no_write:
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
