"""UNet3D forward vs diffusers' UNetMotionModel (AnimateDiff layout), identical weights, one jitted call vs eager.

    python bench/unet.py                       # the workload of this machine's backend; appends to BENCHMARKS.md
    python bench/unet.py --size=gpu --torch-compile
    python bench/unet.py --size=smoke --no-append

Workloads (batch 2 = guidance's two halves, 16 frames, motion module v2, 77 context tokens):
- cpu: block channels (64, 128, 256, 256), 2 layers per block, 8 heads, cross-attention dim 768, 32x32 latents,
  float32.
- gpu: full-size SD 1.5 + motion module v2, 64x64 latents (512x512 px), bfloat16 compute with bfloat16 weights on
  both sides (vdjax attention: cuDNN flash; diffusers: SDPA, optionally `torch.compile`).
- smoke: a tiny UNet, 2 frames of 8x8, 1 timed run (keeps the script from rotting; tests/test_bench.py).

diffusers' UNetMotionModel is built with re-randomised weights and converted to vdjax with vdjax's own converter.
The reference takes the context repeated per frame, as AnimateDiffPipeline feeds it; vdjax takes it once per clip.
FLOPs per call come from XLA's cost analysis of vdjax's compiled program (also used for the reference's rate).
"""
from __future__ import annotations

import dataclasses
import time

import common
import numpy as np
from common import SD15, UNetSpec


@dataclasses.dataclass(frozen=True)
class Workload:
    spec: UNetSpec
    batch: int
    frames: int
    latent: int
    dtype: str

    def describe(self) -> str:
        return (f"{self.spec.describe()}; batch {self.batch}, {self.frames} frames, {self.latent}x{self.latent} "
                f"latents, 77 context tokens, {self.dtype}")


WORKLOADS = {
    "smoke": Workload(UNetSpec((32, 64), 1, 2, 32, 8, 2), 2, 2, 8, "float32"),
    "cpu": Workload(UNetSpec((64, 128, 256, 256), 2, 8, 768, 32, 8), 2, 16, 32, "float32"),
    "gpu": Workload(SD15, 2, 16, 64, "bfloat16"),
}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--attention", default=None, choices=("xla", "blocked", "cudnn", "auto"),
                   help="vdjax's attention implementation (default: cuDNN flash on a GPU where it takes every head "
                        "width, else xla)")
    p.add_argument("--torch-compile", action="store_true", help="run the reference through torch.compile")
    args = common.parse(p, argv)
    w = WORKLOADS[args.size]
    attention = common.attention_impl(args.attention, w.dtype, w.spec.head_dims)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    device = common.torch_device()
    print(f"unet ({args.size}): {w.describe()}\nbuilding diffusers UNetMotionModel and converting it ...")
    start = time.perf_counter()
    ref = common.diffusers_motion_unet(w.spec)
    cfg = common.animatediff_config(w.spec, w.dtype, attention, tiny_parts=True)
    model = common.load_vdjax("unet", cfg, common.state_dict_numpy(ref), dtype=common.jax_dtype(w.dtype))
    ref = ref.to(device=device, dtype=common.torch_dtype(w.dtype))
    print(f"  built and converted in {time.perf_counter() - start:.1f} s")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((w.batch, w.frames, w.latent, w.latent, 4)).astype(np.float32)
    t = np.full((w.batch,), 500, np.int32)
    c = rng.standard_normal((w.batch, 77, w.spec.cross_dim)).astype(np.float32)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
    xj, tj, cj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(c)
    compiled, compile_s = common.compile_timed(forward, state, xj, tj, cj)
    flops = common.flops_of(compiled)
    print(f"  vdjax compiled in {compile_s:.1f} s; {flops / 1e9 if flops else float('nan'):.1f} GFLOP per call")

    tdt = common.torch_dtype(w.dtype)
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()).to(device, tdt)  # (B, C, F, H, W)
    tt = torch.from_numpy(t).to(device)
    ct = torch.from_numpy(c).to(device, tdt).repeat_interleave(w.frames, 0)  # (B*F, 77, D) as the pipeline does
    ref_call = torch.compile(ref) if args.torch_compile else ref

    def run_vdjax():
        return compiled(state, xj, tj, cj).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            out = ref_call(xt, tt, ct).sample
        common.torch_sync(device)
        return out

    ref_name = "diffusers" + (" + torch.compile" if args.torch_compile else "")
    times = common.interleaved({"vdjax": run_vdjax, ref_name: run_torch}, warmup=args.warmup, repeats=args.repeats,
                               settle=args.settle)
    ours, theirs = np.asarray(run_vdjax(), np.float32), run_torch().float().cpu().numpy()
    err = float(np.max(np.abs(ours.transpose(0, 4, 1, 2, 3) - theirs)))
    mem = {"vdjax": common.peak_memory(run_vdjax, compiled=compiled),
           ref_name: common.peak_memory(run_torch, torch_device=device if common.accelerator() else None)}

    ratio = times["vdjax"].median / times[ref_name].median
    rows = []
    for name, timing in times.items():
        gflop, rate, util = common.flops_cells(flops, timing.median)
        first = f"{compile_s:.1f} (compile)" if name == "vdjax" else f"{timing.first:.1f} (first call)"
        rows.append([name, common.fmt_s(timing.median), timing.spread, f"{ratio:.2f}" if name == "vdjax" else "1",
                     first, gflop, rate, util, common.fmt_gib(mem[name])])
    xla = common.xla_bytes(compiled)
    common.report(
        args, f"unet: UNet3D forward vs diffusers UNetMotionModel ({args.size} workload)",
        [f"workload: {w.describe()}; weights in {w.dtype} on both sides; vdjax attention `{attention}`, diffusers "
         f"SDPA{' + torch.compile' if args.torch_compile else ''}",
         "FLOPs: XLA's cost analysis of vdjax's compiled forward (the reference's TFLOP/s uses the same count); MFU "
         "against the chip's dense bf16 peak (vdjax/flops.py), none on CPU",
         f"check: outputs agree to max abs {err:.2e} (output std {float(theirs.std()):.3f}); XLA temporaries "
         f"{common.fmt_gib(xla['temp'])} GiB"],
        ["implementation", "median s", "min–max s", "vdjax / diffusers", "compile or first call s", "GFLOP / call",
         "TFLOP/s", "MFU", "peak memory GiB"], rows)


if __name__ == "__main__":
    main()
