"""Reading checkpoints as they are: readers, layout detection, combined UNet + motion module, sharded loading,
the converted-model folder and the conversion CLI. References: diffusers/transformers models saved by the test."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from conftest import ROOT, load_config, max_abs_error
from vdjax.convert import animatediff, converted, formats, readers, sources

from conftest import TINY_SPEC as SPEC


def _params(model) -> dict:
    return {p: np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _unet_output(model, frames=4):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, frames, 8, 8, 4)).astype(np.float32)
    t = np.array([5, 600])
    c = rng.standard_normal((2, 7, 32)).astype(np.float32)
    return x, t, c, np.asarray(nnx.jit(lambda m: m(jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)))(model))


def test_snapshot_plus_motion_adapter_reproduces_diffusers(snapshot):
    root, adapter, reference = snapshot
    models = sources.load_models(load_config(SPEC), model=str(root), motion_module=str(adapter))
    assert set(models) == {"unet", "vae", "text_encoder", "tokenizer_folder"}
    x, t, c, ours = _unet_output(models["unet"])
    with torch.no_grad():
        ref = reference(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), torch.from_numpy(t),
                        torch.from_numpy(c).repeat_interleave(x.shape[1], 0)).sample.numpy()
    assert max_abs_error(ours.transpose(0, 4, 1, 2, 3), ref) <= 1e-4


@pytest.fixture(scope="module")
def loaded(snapshot):
    root, adapter, _ = snapshot
    return sources.load_models(load_config(SPEC), model=str(root), motion_module=str(adapter))


def _to_original_layout(adapter_state: dict) -> dict:
    """diffusers MotionAdapter keys -> the released AnimateDiff layout, position tables included."""
    from vdjax.convert.keymap import rename

    out = {}
    for key, value in adapter_state.items():
        if key.endswith("pos_embed.pe"):
            continue
        out[rename(key, animatediff.MOTION_RENAMES)] = value
    for key in list(out):
        if key.endswith("attention_blocks.0.to_q.weight"):
            for i in (0, 1):
                out[key.replace("attention_blocks.0.to_q.weight", f"attention_blocks.{i}.pos_encoder.pe")] = \
                    np.zeros((1, 32, out[key].shape[1]), np.float32)
    return out


def test_file_formats_give_the_same_parameters(snapshot, loaded, tmp_path):
    """.bin (LDM 'state_dict' nesting), DeepSpeed 'module', sharded safetensors and the original AnimateDiff
    motion-module layout all load to the same parameters as the diffusers folders."""
    root, adapter, _ = snapshot
    unet_state = dict(readers.read_component(str(root / "unet")))
    adapter_state = dict(readers.read_component(str(adapter)))
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in unet_state.items()}}, tmp_path / "unet.ckpt")
    torch.save({"module": {"_forward_module." + k: torch.from_numpy(v) for k, v in adapter_state.items()}},
               tmp_path / "adapter.pt")
    keys = sorted(unet_state)
    save_file({k: unet_state[k] for k in keys[::2]}, str(tmp_path / "a.safetensors"))
    save_file({k: unet_state[k] for k in keys[1::2]}, str(tmp_path / "b.safetensors"))
    (tmp_path / "unet.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: ("a" if i % 2 == 0 else "b") + ".safetensors" for i, k in enumerate(keys)}}))
    torch.save({k: torch.from_numpy(v) for k, v in _to_original_layout(adapter_state).items()}, tmp_path / "mm.ckpt")
    expected = _params(loaded["unet"])
    cfg = load_config(SPEC)
    for unet_file, motion_file in [("unet.ckpt", "adapter.pt"), ("unet.safetensors.index.json", "mm.ckpt")]:
        got = sources.load_models(cfg, parts=["unet"], unet=str(tmp_path / unet_file),
                                  motion_module=str(tmp_path / motion_file))
        got = _params(got["unet"])
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[p], expected[p]) for p in got)


def test_layout_detection_names_what_it_reads():
    assert formats.detect(["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"]) == "ldm_sd1"
    assert formats.detect(["down_blocks.0.motion_modules.0.temporal_transformer.norm.weight"]) == "animatediff_motion"
    assert formats.detect(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) == "kohya_lora"
    with pytest.raises(formats.UnknownFormatError, match="vdjax reads:(.|\n)*ldm_sd1"):
        formats.detect(["something.else"], "x.safetensors")
    with pytest.raises(formats.UnknownFormatError, match="SDXL is not a vdjax family"):
        formats.detect(["conditioner.embedders.0.transformer.text_model.x", "model.diffusion_model.x"])
    assert formats.detect(["model.diffusion_model.init_attn.0.proj_in.weight"]) == "videocrafter"


def test_bad_files_say_what_is_wrong(tmp_path, snapshot):
    root, _, _ = snapshot
    good = root / "unet" / "diffusion_pytorch_model.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(readers.CheckpointError, match="truncated or corrupt"):
        dict(readers.read_state_dict(str(truncated)))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x80\x04not a real pickle" * 10)
    with pytest.raises(readers.CheckpointError, match="corrupt.ckpt"):
        readers.read_state_dict(str(corrupt))
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": pathlib.Path("x")}, unsafe)
    with pytest.raises(readers.CheckpointError, match="weights_only=True"):
        readers.read_state_dict(str(unsafe))
    with pytest.raises(readers.CheckpointError, match="unknown file type"):
        readers.read_state_dict(str(root / "model_index.json"))


def test_wrong_motion_module_version_is_named(snapshot, tmp_path):
    root, adapter, _ = snapshot
    state = _to_original_layout(dict(readers.read_component(str(adapter))))
    state = {k: (np.zeros((1, 24, v.shape[2]), np.float32) if k.endswith(".pe") else v) for k, v in state.items()}
    save_file(state, str(tmp_path / "mm_v1.safetensors"))
    with pytest.raises(ValueError, match="24-long table is AnimateDiff v1"):
        sources.load_models(load_config(SPEC), parts=["unet"], model=str(root),
                            motion_module=str(tmp_path / "mm_v1.safetensors"))


def test_converted_folder_round_trip_and_atomic_write(loaded, tmp_path):
    cfg = load_config(SPEC)
    out = tmp_path / "model"
    summary = converted.save(str(out), cfg, loaded)
    assert set(summary["parts"]) == {"unet", "vae", "text_encoder"} and (out / "tokenizer" / "vocab.json").exists()
    config, models = converted.load(str(out))
    for part in ("unet", "vae", "text_encoder"):
        a, b = _params(models[part]), _params(loaded[part])
        assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)
    assert tuple(config.unet.block_out_channels) == (32, 64)
    with pytest.raises(FileExistsError, match="--overwrite"):
        converted.save(str(out), cfg, loaded)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        converted.save(str(tmp_path / "missing" / "model"), cfg, loaded)

    class Boom(dict):
        def get(self, key, default=None):
            raise RuntimeError("killed mid-way")
    with pytest.raises(RuntimeError):
        converted.save(str(tmp_path / "never"), cfg, Boom(loaded))
    assert not any(p.name.startswith("never") for p in tmp_path.iterdir())


SHARDED = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import load_config
from vdjax import parallel
from vdjax.convert import converted, sources
mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
shardings_for = lambda abstract: parallel.param_shardings(abstract, mesh)
cfg = load_config(sys.argv[1])
models = sources.load_models(cfg, parts=["unet"], model=sys.argv[2], motion_module=sys.argv[3],
                             shardings_for=shardings_for)
_, restored = converted.load(sys.argv[4], parts=["unet"], shardings_for=shardings_for)
from flax import nnx
report = {"devices": len(jax.devices()), "sharded": 0, "wrong": []}
for tree in (models["unet"], restored["unet"]):
    want = shardings_for(tree)
    for path, var in nnx.to_flat_state(nnx.state(tree, nnx.Param)):
        if not var[...].sharding.is_equivalent_to(want[path], var.ndim):
            report["wrong"].append(str(path))
        report["sharded"] += int(len(var[...].sharding.device_set) > 1 and not var[...].sharding.is_fully_replicated)
print(json.dumps(report))
"""


def test_sharded_load_on_8_devices_follows_the_rules(snapshot, loaded, tmp_path):
    root, adapter, _ = snapshot
    converted.save(str(tmp_path / "model"), load_config(SPEC), loaded)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED, SPEC, str(root), str(adapter), str(tmp_path / "model")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["wrong"] == [] and report["sharded"] > 20


def test_convert_cli_writes_a_model_folder(snapshot, tmp_path):
    root, adapter, _ = snapshot
    out = tmp_path / "cli_model"
    cmd = [sys.executable, "launch/convert.py", f"--config={SPEC}", f"--model={root}", f"--motion_module={adapter}",
           "--dtype=bfloat16", f"--output={out}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and "bfloat16" in result.stdout
    _, models = converted.load(str(out), parts=["vae"])
    assert jax.tree.leaves(nnx.state(models["vae"], nnx.Param))[0].dtype == jnp.bfloat16
    (tmp_path / "notes.txt").write_text("not weights")
    bad = subprocess.run(cmd[:3] + [f"--motion_module={tmp_path / 'notes.txt'}", f"--output={tmp_path / 'x'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "notes.txt: unknown file type; vdjax reads .safetensors" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()


def _meta_state(model) -> readers.LazyStateDict:
    """A torch model built on the meta device as a shapes-only state dict (reading a value would fail)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return readers.LazyStateDict(type(model).__name__, shapes, lambda k: (_ for _ in ()).throw(AssertionError(k)))


@pytest.mark.parametrize("part", ["unet_motion_v2", "vae", "text_encoder"])
def test_full_size_diffusers_layouts_map_completely(part):
    """diffusers' / transformers' full-size SD 1.5 (+ motion v2) models, by key and shape, onto vdjax's."""
    from diffusers import AutoencoderKL, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from vdjax.convert.keymap import plan

    cfg = load_config("configs/animatediff_sd15.py:variant=v2")
    with torch.device("meta"):
        reference = {
            "unet_motion_v2": lambda: UNetMotionModel(cross_attention_dim=768, num_attention_heads=8,
                                                      motion_max_seq_length=32, use_motion_mid_block=True),
            "vae": lambda: AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                         up_block_types=("UpDecoderBlock2D",) * 4,
                                         block_out_channels=(128, 256, 512, 512), layers_per_block=2),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                                 num_attention_heads=12, num_hidden_layers=12)),
        }[part]()
    state = _meta_state(reference)
    name = "unet" if part.startswith("unet") else part
    fmt = formats.detect(state)
    pmap = sources.part_map(name, fmt, cfg)
    mapping = plan(sources.abstract_part(name, cfg), pmap.prepare(state), pmap.key_fn, ignore=pmap.ignore)
    assert len(mapping) == len([k for k in state if not pmap.ignore(k)])
