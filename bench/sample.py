"""The whole text-to-video loop: vdjax's T2VPipeline (one jitted DDIM loop) vs diffusers' AnimateDiffPipeline,
identical weights, latents out; then the VAE decode of those latents, timed separately.

    python bench/sample.py                     # the workload of this machine's backend; appends to BENCHMARKS.md
    python bench/sample.py --size=gpu --torch-compile
    python bench/sample.py --size=smoke --no-append

Workloads (one prompt and a negative prompt, classifier-free guidance 7.5, DDIM eta 0):
- cpu: the tiny AnimateDiff model of the tests (UNet channels (32, 64), tiny VAE and text encoder), 16 frames of
  64x64 px (32x32 latents), 10 DDIM steps, float32.
- gpu: full-size SD 1.5 + motion module v2, 16 frames of 512x512, 25 steps, bfloat16 (weights too) on both sides.
- smoke: the tiny model, 2 frames of 16x16, 2 steps, 1 timed run.

"Loop" is prompts -> text encoder -> the whole denoising loop -> latents on both sides (vdjax:
`encode_prompts` + `sample_latents`; diffusers: the pipeline with `output_type='latent'`). "Decode" is the VAE
decode of the final latents in chunks of 4 frames on both sides (vdjax `decode`; diffusers `decode_latents`).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time

import common
import numpy as np
from common import SD15, UNetSpec

TINY = UNetSpec((32, 64), 1, 2, 32, 8, 2)
PROMPT, NEGATIVE = "a red square moving right", "blurry"


@dataclasses.dataclass(frozen=True)
class Workload:
    spec: UNetSpec
    tiny_parts: bool  # the tiny VAE and text encoder of the tests, or SD 1.5's
    frames: int
    size: int  # pixels
    steps: int
    dtype: str
    guidance: float = 7.5
    chunk: int = 4

    def describe(self) -> str:
        parts = "tiny VAE and text encoder" if self.tiny_parts else "SD 1.5 VAE and CLIP ViT-L/14 text encoder"
        return (f"UNet: {self.spec.describe()}; {parts}; {self.frames} frames of {self.size}x{self.size} px, "
                f"{self.steps} DDIM steps, guidance {self.guidance}, {self.dtype}; decode in chunks of {self.chunk}")


WORKLOADS = {
    "smoke": Workload(TINY, True, 2, 16, 2, "float32"),
    "cpu": Workload(TINY, True, 16, 64, 10, "float32"),
    "gpu": Workload(SD15, False, 16, 512, 25, "bfloat16"),
}


def build(w: Workload, attention: str, device):
    """(vdjax T2VPipeline, diffusers AnimateDiffPipeline) with the same random weights."""
    import torch
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from vdjax.models.clip_tokenizer import write_tokenizer_folder
    from vdjax.pipelines.t2v import T2VPipeline

    cfg = common.animatediff_config(w.spec, w.dtype, attention, tiny_parts=w.tiny_parts)
    s, levels = w.spec, len(w.spec.channels)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1), attention_head_dim=s.heads,
        block_out_channels=s.channels, layers_per_block=s.layers, cross_attention_dim=s.cross_dim,
        norm_num_groups=s.groups)
    adapter = MotionAdapter(block_out_channels=s.channels, motion_layers_per_block=s.layers,
                            motion_num_attention_heads=s.motion_heads, motion_norm_num_groups=s.groups,
                            motion_max_seq_length=32, use_motion_mid_block=True)
    common.randomize_torch(unet, seed=0)
    common.randomize_torch(adapter, seed=3)
    vae, text = common.diffusers_vae(cfg.vae), common.transformers_text(cfg.text_encoder)
    dtype = common.jax_dtype(w.dtype)
    tokenizer = write_tokenizer_folder(tempfile.mkdtemp(prefix="vdjax_bench_tokenizer_"))
    ours = T2VPipeline(
        cfg, common.load_vdjax("unet", cfg, common.state_dict_numpy(unet), motion=common.state_dict_numpy(adapter),
                               dtype=dtype),
        common.load_vdjax("vae", cfg, common.state_dict_numpy(vae), dtype=dtype),
        common.load_vdjax("text_encoder", cfg, common.state_dict_numpy(text), dtype=dtype),
        tokenizer_folder=tokenizer)
    sch = cfg.schedule
    reference = AnimateDiffPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tokenizer),
        unet=unet, motion_adapter=adapter,
        scheduler=DDIMScheduler(beta_schedule=sch.beta_schedule, beta_start=sch.beta_start, beta_end=sch.beta_end,
                                steps_offset=sch.steps_offset, timestep_spacing=sch.timestep_spacing,
                                clip_sample=False, set_alpha_to_one=sch.set_alpha_to_one))
    reference.set_progress_bar_config(disable=True)
    reference = reference.to(device=device, dtype=common.torch_dtype(w.dtype))
    return ours, reference


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--attention", default=None, choices=("xla", "blocked", "cudnn", "auto"),
                   help="vdjax's attention implementation (default: cuDNN flash on a GPU where it takes every head "
                        "width, else xla)")
    p.add_argument("--torch-compile", action="store_true", help="run the reference's UNet through torch.compile")
    args = common.parse(p, argv)
    w = WORKLOADS[args.size]
    attention = common.attention_impl(args.attention, w.dtype, w.spec.head_dims + [64])

    import jax
    import jax.numpy as jnp
    import torch

    device = common.torch_device()
    print(f"sample ({args.size}): {w.describe()}\nbuilding both pipelines ...")
    start = time.perf_counter()
    ours, reference = build(w, attention, device)
    if args.torch_compile:
        reference.unet = torch.compile(reference.unet)
    print(f"  built and converted in {time.perf_counter() - start:.1f} s")

    f = ours.vae.downsampling_factor
    x_T = np.random.default_rng(0).standard_normal((1, w.frames, w.size // f, w.size // f, 4)).astype(np.float32)
    x_T_jax = jnp.asarray(x_T)
    x_T_torch = torch.from_numpy(x_T.transpose(0, 4, 1, 2, 3).copy()).to(device, common.torch_dtype(w.dtype))
    key = jax.random.key(0)
    results = {}

    def loop_vdjax():
        context, uncond = ours.encode_prompts([PROMPT]), ours.encode_prompts([NEGATIVE])
        results["vdjax"] = ours.sample_latents(x_T_jax, context, uncond, steps=w.steps, guidance_scale=w.guidance,
                                               eta=0.0, key=key).block_until_ready()

    def loop_torch():
        with torch.inference_mode():
            results["diffusers"] = reference(
                PROMPT, negative_prompt=NEGATIVE, num_frames=w.frames, height=w.size, width=w.size,
                num_inference_steps=w.steps, guidance_scale=w.guidance, latents=x_T_torch,
                output_type="latent").frames
        common.torch_sync(device)

    def decode_vdjax():
        return ours.decode(results["vdjax"]).block_until_ready()

    def decode_torch():
        with torch.inference_mode():
            out = reference.decode_latents(results["diffusers"], decode_chunk_size=w.chunk)
        common.torch_sync(device)
        return out

    ref_name = "diffusers" + (" + torch.compile" if args.torch_compile else "")
    compiled_before = common.compile_seconds()
    print("loop:")
    loop = common.interleaved({"vdjax": loop_vdjax, ref_name: loop_torch}, warmup=args.warmup, repeats=args.repeats,
                              settle=args.settle)
    loop_compile = common.compile_seconds() - compiled_before
    loop_mem = {"vdjax": common.peak_memory(loop_vdjax, jax_process_peak=True),
                ref_name: common.peak_memory(loop_torch, torch_device=device if common.accelerator() else None)}
    compiled_before = common.compile_seconds()
    print("decode:")
    decode = common.interleaved({"vdjax": decode_vdjax, ref_name: decode_torch}, warmup=args.warmup,
                                repeats=args.repeats, settle=args.settle)
    decode_compile = common.compile_seconds() - compiled_before
    decode_mem = {"vdjax": common.peak_memory(decode_vdjax, jax_process_peak=True),
                  ref_name: common.peak_memory(decode_torch, torch_device=device if common.accelerator() else None)}

    theirs = results["diffusers"].float().cpu().numpy().transpose(0, 2, 3, 4, 1)
    err = float(np.max(np.abs(np.asarray(results["vdjax"]) - theirs)))
    flops = loop_flops(ours, x_T_jax, w)

    rows = []
    for stage, timings, compile_s, mem, stage_flops in (("loop", loop, loop_compile, loop_mem, flops),
                                                        ("decode", decode, decode_compile, decode_mem, None)):
        ratio = timings["vdjax"].median / timings[ref_name].median
        for name, timing in timings.items():
            gflop, rate, util = common.flops_cells(stage_flops, timing.median)
            first = (f"{compile_s:.1f} (compile)" if name == "vdjax" else f"{timing.first:.1f} (first call)")
            rows.append([stage, name, common.fmt_s(timing.median), timing.spread,
                         f"{ratio:.2f}" if name == "vdjax" else "1", first, gflop, rate, util,
                         common.fmt_gib(mem[name])])
    common.report(
        args, f"sample: T2V loop vs diffusers AnimateDiffPipeline, then VAE decode ({args.size} workload)",
        [f"workload: {w.describe()}; vdjax attention `{attention}`, diffusers SDPA"
         f"{' + torch.compile (UNet)' if args.torch_compile else ''}",
         "loop: prompts in, final latents out (text encoder + every denoising step + scheduler); decode: those "
         "latents to frames",
         "FLOPs (loop): XLA's cost analysis of one guided UNet call (batch 2) x steps, the text encoder left out; "
         "compile: JAX's trace + lower + compile seconds during the first call (jax.monitoring)",
         f"check: final latents agree to max abs {err:.2e} (std {float(theirs.std()):.3f})"],
        ["stage", "implementation", "median s", "min–max s", "vdjax / diffusers", "compile or first call s",
         "GFLOP / call", "TFLOP/s", "MFU", "peak memory GiB"], rows)


def loop_flops(ours, x_T, w: Workload) -> float | None:
    """FLOPs of the loop's UNet calls: XLA's cost analysis of one guided call (lowered, not compiled) x steps."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(ours.unet)
    x = jnp.concatenate([x_T, x_T])
    context = jnp.zeros((2, 77, w.spec.cross_dim), jnp.float32)
    lowered = jax.jit(lambda s, x, c: nnx.merge(graphdef, s)(x, jnp.full((2,), 500), c)).lower(state, x, context)
    flops = (lowered.cost_analysis() or {}).get("flops")
    return float(flops) * w.steps if flops else None


if __name__ == "__main__":
    main()
