"""Shared test helpers: config loading, PyTorch reference randomisation, and error measures."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tiny AnimateDiff model that tests build in diffusers and load into vdjax (diffusers' GroupNorm placement).
TINY_SPEC = "configs/animatediff_sd15.py:variant=tiny_v2,norms=diffusers"
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8)
# The tiny AnimateDiff model the training tests train (tests/test_train.py, tests/test_train_runs.py).
TRAIN_SPEC = "configs/animatediff_sd15.py:variant=tiny_v2"


def pytest_configure(config):
    """Run-wide JAX settings, set before any test imports JAX and inherited by the xdist workers (spawned after
    this) and by every script a test launches. Most of the suite's time is XLA compiling tiny models, so:
    - XLA's optimisation passes are off (the same semantics; float sums may associate differently, within every
      tolerance here): 23 instead of 27 CPU-minutes. JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests the optimised programs.
    - One persistent compilation cache, fresh for the run and removed at its end (unless JAX_COMPILATION_CACHE_DIR
      is set), caching every compile however short: a process loads what another compiled, e.g. the eager kernels
      of random initialisation, one per parameter shape (a tiny pipeline's `random_init`: 18 s cold, 4 s cached)."""
    if hasattr(config, "workerinput"):
        return
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    config.jax_cache_dir = tempfile.mkdtemp(prefix="vdjax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config.jax_cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
    if getattr(config, "jax_cache_dir", None):
        shutil.rmtree(config.jax_cache_dir, ignore_errors=True)
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        os.environ.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VDJAX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set VDJAX_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def load_config(spec: str):
    """'configs/animatediff_sd15.py:variant=tiny_v2' -> the ConfigDict, as absl's config_flags would build it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def randomize_torch(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Re-draw every parameter (zero-initialised ones included) so that each one moves the output.

    Matrices get a fan-in scaled normal, norm scales 1 + noise, vectors small noise; returns the state dict.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def max_abs_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    # Deterministic, comparable references on the 2-core CI machine.
    try:
        import torch
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass


def randomize_nnx(model, seed: int = 0) -> None:
    """Re-draw every parameter of a vdjax model in place (zero-initialised ones included), as `randomize_torch`."""
    import jax.numpy as jnp
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed)  # numpy: jax.random would compile a kernel per parameter shape
    for path, var in flat:
        noise = rng.standard_normal(var.shape).astype(np.float32)
        if var.ndim >= 2:
            value = noise / np.sqrt(np.prod(var.shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.2 * noise
        else:
            value = 0.2 * noise
        var.set_value(jnp.asarray(value))
    nnx.update(model, nnx.from_flat_state(flat))


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory):
    """A tiny diffusers snapshot (unet, vae, text_encoder, tokenizer) and a MotionAdapter folder, all randomised."""
    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from vdjax.models.clip_tokenizer import write_tokenizer_folder

    root = tmp_path_factory.mktemp("snapshot")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, **TINY_UNET)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    cfg = load_config(TINY_SPEC).text_encoder
    text = CLIPTextModel(CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                                        num_attention_heads=cfg.num_attention_heads,
                                        max_position_embeddings=cfg.max_position_embeddings,
                                        bos_token_id=0, eos_token_id=cfg.eos_token_id))
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=True)
    for i, m in enumerate((unet, vae, text, adapter)):
        randomize_torch(m, seed=i)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    write_tokenizer_folder(str(root / "tokenizer"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    adapter.save_pretrained(root.parent / "adapter")
    reference = UNetMotionModel.from_unet2d(unet, adapter).eval()
    return root, root.parent / "adapter", reference


MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"


@functools.lru_cache(None)
def manifest(name: str) -> dict:
    """A full-size key -> shape listing (tests/fixtures/manifests/NAME.json)."""
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def shapes_only(keys: dict, name: str):
    """A state dict of shapes alone: key maps are planned against it, and reading a value fails the test."""
    from vdjax.convert.readers import LazyStateDict

    def load(key):
        raise AssertionError(f"{name}: shape-only check read {key}")
    return LazyStateDict(name, {k: tuple(v) for k, v in keys.items()}, load)


@pytest.fixture(scope="module")
def tiny_pipe():
    """TRAIN_SPEC's pipeline with random weights (one per test module)."""
    from vdjax.pipelines.t2v import T2VPipeline

    return T2VPipeline.random_init(load_config(TRAIN_SPEC))


@pytest.fixture(scope="module")
def tiny_folder(tiny_pipe, tmp_path_factory):
    """tiny_pipe as a converted folder, so that subprocesses (launch/train.py) load it in a second."""
    from vdjax.convert import converted

    folder = tmp_path_factory.mktemp("model") / "tiny"
    converted.save(str(folder), tiny_pipe.config, {part: getattr(tiny_pipe, part) for part in tiny_pipe.PARTS})
    return str(folder)
