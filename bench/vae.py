"""VAE decode of a clip, chunked vs whole: vdjax `decode_video` vs diffusers' AutoencoderKL.decode, same weights.

    python bench/vae.py                        # the workload of this machine's backend; appends to BENCHMARKS.md
    python bench/vae.py --size=smoke --no-append

Workloads (SD 1.5's VAE decoder, (128, 256, 512, 512) channels, except for smoke):
- gpu: 16 frames of 512x512 px, bfloat16 (weights too) on both sides; chunks of 4 frames vs the whole clip.
- cpu: 4 frames of 64x64 px, float32; 1 frame at a time vs the whole clip. The decoder costs 2.5 TFLOP per
  512x512 frame (XLA's count), about two minutes per frame on this project's 2-core CI machine, so the CPU run keeps
  the full-size decoder and shrinks the frames.
- smoke: the tiny VAE of the tests, 2 frames of 16x16 px, 1 timed run.

Chunked on both sides means the same thing: vdjax maps the decoder over chunks with `jax.lax.map` inside one jitted
program; diffusers calls `decode` once per chunk, as AnimateDiffPipeline.decode_latents does.
"""
from __future__ import annotations

import dataclasses

import common
import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    tiny: bool
    frames: int
    size: int  # pixels
    chunks: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        vae = "the tiny test VAE" if self.tiny else "SD 1.5's VAE decoder"
        return f"{vae}; {self.frames} frames of {self.size}x{self.size} px, {self.dtype}"


WORKLOADS = {
    "smoke": Workload(True, 2, 16, (1, 2), "float32"),
    "cpu": Workload(False, 4, 64, (1, 4), "float32"),
    "gpu": Workload(False, 16, 512, (4, 16), "bfloat16"),
}


def main(argv=None):
    args = common.parse(common.parser(__doc__), argv)
    w = WORKLOADS[args.size]

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    device = common.torch_device()
    print(f"vae ({args.size}): {w.describe()}\nbuilding diffusers AutoencoderKL and converting it ...")
    cfg = common.family_config("tiny_v2" if w.tiny else "v2")
    cfg.vae.dtype = w.dtype
    ref = common.diffusers_vae(cfg.vae)
    ours = common.load_vdjax("vae", cfg, common.state_dict_numpy(ref), dtype=common.jax_dtype(w.dtype))
    ref = ref.eval().to(device=device, dtype=common.torch_dtype(w.dtype))

    f = ours.downsampling_factor
    z = np.random.default_rng(0).standard_normal((1, w.frames, w.size // f, w.size // f, 4)).astype(np.float32)
    zj = jnp.asarray(z)
    zt = torch.from_numpy(z[0].transpose(0, 3, 1, 2).copy()).to(device, common.torch_dtype(w.dtype))
    graphdef, state = nnx.split(ours)

    # XLA's cost analysis counts a loop's body once, so the FLOPs of every mode are those of the whole-clip decode.
    whole = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z.reshape(-1, *z.shape[2:])))
    flops = (whole.lower(state, zj).cost_analysis() or {}).get("flops")
    rows, checks = [], []
    for chunk in w.chunks:
        mode = "whole clip" if chunk >= w.frames else f"chunks of {chunk}"
        decode = jax.jit(lambda s, z, chunk=chunk: nnx.merge(graphdef, s).decode_video(z, chunk_size=chunk))
        compiled, compile_s = common.compile_timed(decode, state, zj)
        print(f"{mode}: vdjax compiled in {compile_s:.1f} s")

        def run_vdjax(compiled=compiled):
            return compiled(state, zj).block_until_ready()

        def run_torch(chunk=chunk):
            with torch.inference_mode():
                out = torch.cat([ref.decode(zt[i:i + chunk]).sample for i in range(0, w.frames, chunk)])
            common.torch_sync(device)
            return out

        times = common.interleaved({"vdjax": run_vdjax, "diffusers": run_torch}, warmup=args.warmup,
                                   repeats=args.repeats, settle=args.settle)
        ours_out, theirs = np.asarray(run_vdjax(), np.float32)[0], run_torch().float().cpu().numpy()
        checks.append(f"{mode} max abs {float(np.max(np.abs(ours_out.transpose(0, 3, 1, 2) - theirs))):.2e}")
        mem = {"vdjax": common.peak_memory(run_vdjax, compiled=compiled),
               "diffusers": common.peak_memory(run_torch, torch_device=device if common.accelerator() else None)}
        ratio = times["vdjax"].median / times["diffusers"].median
        temp = common.fmt_gib(common.xla_bytes(compiled)["temp"])
        for name, timing in times.items():
            gflop, rate, util = common.flops_cells(flops, timing.median)
            first = f"{compile_s:.1f} (compile)" if name == "vdjax" else f"{timing.first:.2f} (first call)"
            rows.append([mode, name, common.fmt_s(timing.median), timing.spread,
                         f"{ratio:.2f}" if name == "vdjax" else "1", first, gflop, rate, util,
                         common.fmt_gib(mem[name]), temp if name == "vdjax" else ""])
    common.report(
        args, f"vae: decode {w.frames} frames, chunked vs whole, vs diffusers AutoencoderKL ({args.size} workload)",
        [f"workload: {w.describe()}; weights in {w.dtype} on both sides",
         "FLOPs: XLA's cost analysis of vdjax's decode of the whole clip (the same count for every row)",
         "check: frames agree to " + "; ".join(checks)],
        ["mode", "implementation", "median s", "min–max s", "vdjax / diffusers", "compile or first call s",
         "GFLOP / call", "TFLOP/s", "MFU", "peak memory GiB", "XLA temporaries GiB"], rows)


if __name__ == "__main__":
    main()
