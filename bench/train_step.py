"""One optimiser step with only the motion modules trainable: vdjax's Trainer vs the same step in PyTorch on
diffusers' UNetMotionModel, identical weights and batch, with and without rematerialisation.

    python bench/train_step.py                 # the workload of this machine's backend; appends to BENCHMARKS.md
    python bench/train_step.py --size=smoke --no-append

The step on both sides: VAE-encode the batch's videos and sample the posterior (frozen, no gradient), encode the
captions (frozen), draw timesteps and noise, UNet forward, epsilon MSE, backward to the motion modules only,
global-norm clipping at 1, AdamW, EMA of the trainable parameters (config.train's settings).
- vdjax: `vdjax.train.step.Trainer` (one jitted step, state donated), `train.remat` in none | full | dots.
- reference: eager PyTorch; `remat` none = plain autograd, full and dots = diffusers' gradient checkpointing
  (`enable_gradient_checkpointing`: every block recomputed in the backward pass; torch has no `dots` policy).

Workloads:
- cpu: the tiny AnimateDiff model of the tests (UNet channels (32, 64), tiny VAE and text encoder), batch 2,
  8 frames of 64x64 px, float32.
- gpu: full-size SD 1.5 + motion module v2, batch 2, 16 frames of 256x256 px (AnimateDiff's training size),
  float32 parameters with bfloat16 compute (torch: autocast), frozen VAE and text encoder in bfloat16.
- smoke: the tiny model, batch 2, 2 frames of 16x16 px, remat full only (one compile), 1 timed run.
"""
from __future__ import annotations

import dataclasses
import time

import common
import numpy as np
from common import SD15, UNetSpec

TINY = UNetSpec((32, 64), 1, 2, 32, 8, 2)


@dataclasses.dataclass(frozen=True)
class Workload:
    spec: UNetSpec
    tiny_parts: bool
    batch: int
    frames: int
    size: int  # pixels
    dtype: str  # compute dtype; trainable parameters are float32
    remats: tuple[str, ...] = ("none", "full", "dots")

    def describe(self) -> str:
        parts = "tiny VAE and text encoder" if self.tiny_parts else "SD 1.5 VAE and CLIP ViT-L/14 text encoder"
        return (f"UNet: {self.spec.describe()}; {parts}; batch {self.batch}, {self.frames} frames of "
                f"{self.size}x{self.size} px, {self.dtype} compute, motion modules trainable")


WORKLOADS = {
    "smoke": Workload(TINY, True, 2, 2, 16, "float32", ("full",)),
    "cpu": Workload(TINY, True, 2, 8, 64, "float32"),
    "gpu": Workload(SD15, False, 2, 16, 256, "bfloat16"),
}


class TorchStep:
    """The reference step, eager PyTorch, mirroring vdjax.train.step.Trainer._step_fn."""

    def __init__(self, cfg, unet, vae, text, alphas_cumprod, device, dtype: str, checkpointing: bool):
        import torch

        self.torch, self.device, self.cfg = torch, device, cfg
        self.unet, self.vae, self.text = unet, vae, text
        self.autocast = dtype != "float32"
        self.dtype = common.torch_dtype(dtype)
        self.alphas_cumprod = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float32, device=device)
        self.params = []
        for name, p in unet.named_parameters():
            p.requires_grad_("motion_modules" in name)
            if p.requires_grad:
                self.params.append(p)
        t = cfg.train
        self.opt = torch.optim.AdamW(self.params, lr=t.learning_rate, betas=(t.adam_b1, t.adam_b2),
                                     weight_decay=t.weight_decay, foreach=True)
        self.ema = [p.detach().clone() for p in self.params]
        self.checkpointing = checkpointing
        self.gen = torch.Generator(device=device).manual_seed(0)

    def __call__(self, video, ids):
        torch = self.torch
        if self.checkpointing:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        self.unet.train()
        b, f = video.shape[:2]
        with torch.no_grad(), torch.autocast(self.device.type, self.dtype, enabled=self.autocast):
            frames = video.reshape(b * f, *video.shape[2:]).permute(0, 3, 1, 2).to(self.vae.dtype)
            z = self.vae.encode(frames).latent_dist.sample(self.gen).float() * self.vae.config.scaling_factor
            z = z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, F, h, w)
            context = self.text(ids).last_hidden_state
        t = torch.randint(0, len(self.alphas_cumprod), (b,), device=self.device, generator=self.gen)
        noise = torch.randn(z.shape, device=self.device, generator=self.gen)
        a = self.alphas_cumprod[t].view(b, 1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        with torch.autocast(self.device.type, self.dtype, enabled=self.autocast):
            pred = self.unet(noisy, t, context.repeat_interleave(f, 0)).sample
        loss = torch.mean(torch.square(pred.float() - noise))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip, foreach=True)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1 - self.cfg.train.ema_decay)
        common.torch_sync(self.device)
        return loss


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--attention", default=None, choices=("xla", "blocked", "cudnn", "auto"),
                   help="vdjax's attention implementation (default: cuDNN flash on a GPU where it takes every head "
                        "width, else xla)")
    p.add_argument("--remat", default=None, help="comma-separated subset of none,full,dots (default: the workload's)")
    args = common.parse(p, argv)
    w = WORKLOADS[args.size]
    remats = tuple(args.remat.split(",")) if args.remat else w.remats
    attention = common.attention_impl(args.attention, w.dtype, w.spec.head_dims, training=True)

    import jax
    import torch

    from vdjax.pipelines.t2v import make_schedule
    from vdjax.train.step import Trainer

    device = common.torch_device()
    print(f"train_step ({args.size}): {w.describe()}\nbuilding diffusers models and converting them ...")
    start = time.perf_counter()
    cfg = common.animatediff_config(w.spec, w.dtype, attention, tiny_parts=w.tiny_parts)
    ref_unet = common.diffusers_motion_unet(w.spec)
    ref_vae, ref_text = common.diffusers_vae(cfg.vae), common.transformers_text(cfg.text_encoder)
    frozen_dtype = common.jax_dtype(w.dtype)  # the frozen VAE and text encoder: weights in the compute dtype
    unet = common.load_vdjax("unet", cfg, common.state_dict_numpy(ref_unet))  # float32 master weights
    vae = common.load_vdjax("vae", cfg, common.state_dict_numpy(ref_vae), dtype=frozen_dtype)
    text = common.load_vdjax("text_encoder", cfg, common.state_dict_numpy(ref_text), dtype=frozen_dtype)
    ref_unet = ref_unet.to(device)
    ref_vae = ref_vae.to(device=device, dtype=common.torch_dtype(w.dtype))
    ref_text = ref_text.to(device=device, dtype=common.torch_dtype(w.dtype))
    print(f"  built and converted in {time.perf_counter() - start:.1f} s")

    rng = np.random.default_rng(0)
    batch = {"video": rng.uniform(-1, 1, (w.batch, w.frames, w.size, w.size, 3)).astype(np.float32),
             "input_ids": rng.integers(0, cfg.text_encoder.vocab_size - 1, (w.batch, 77)).astype(np.int32)}
    video_t = torch.from_numpy(batch["video"]).to(device)
    ids_t = torch.from_numpy(batch["input_ids"]).long().to(device)
    alphas = make_schedule(cfg.schedule).alphas_cumprod

    def measure(remat: str) -> list[list[str]]:
        cfg.train.remat = remat
        out = []  # table rows
        trainer = Trainer(cfg, unet, vae, text)
        box = {"state": trainer.init(0)}
        ref_step = TorchStep(cfg, ref_unet, ref_vae, ref_text, alphas, device, w.dtype,
                             checkpointing=remat != "none")
        ref_name = "diffusers" + (" (gradient checkpointing)" if remat != "none" else "")

        def run_vdjax(trainer=trainer, box=box):
            box["state"], metrics = trainer.step(box["state"], batch)
            jax.block_until_ready((box["state"], metrics))

        def run_torch(ref_step=ref_step):
            return ref_step(video_t, ids_t)

        print(f"remat={remat}:")
        compiled_before = common.compile_seconds()
        times = common.interleaved({"vdjax": run_vdjax, ref_name: run_torch}, warmup=args.warmup,
                                   repeats=args.repeats, settle=args.settle)
        compile_s = common.compile_seconds() - compiled_before
        compiled = next(iter(trainer._compiled.values()))  # the step Trainer compiled for this batch's shapes
        flops = common.flops_of(compiled)
        mem = {"vdjax": common.peak_memory(run_vdjax, compiled=compiled),
               ref_name: common.peak_memory(run_torch, torch_device=device if common.accelerator() else None)}
        temp = common.fmt_gib(common.xla_bytes(compiled)["temp"])
        ratio = times["vdjax"].median / times[ref_name].median
        for name, timing in times.items():
            gflop, rate, util = common.flops_cells(flops, timing.median)
            first = f"{compile_s:.1f} (compile)" if name == "vdjax" else f"{timing.first:.2f} (first call)"
            out.append([remat, name, common.fmt_s(timing.median), timing.spread,
                         f"{ratio:.2f}" if name == "vdjax" else "1", first, gflop, rate, util,
                         common.fmt_gib(mem[name]), temp if name == "vdjax" else ""])
        return out

    rows = []
    for remat in remats:
        try:
            rows += measure(remat)
        except Exception as e:  # noqa: BLE001
            if not common.out_of_memory(e):
                raise
            print(f"remat={remat}: out of memory ({str(e).splitlines()[0][:200]})")
            rows.append([remat, "vdjax and reference", "out of memory", *[""] * 8])
            common.free_memory()
    motion = sum(p.numel() for n, p in ref_unet.named_parameters() if "motion_modules" in n)
    total = sum(p.numel() for p in ref_unet.parameters())
    common.report(
        args, f"train_step: one optimiser step, motion modules trainable, vs PyTorch ({args.size} workload)",
        [f"workload: {w.describe()} ({motion / 1e6:.2f}M of {total / 1e6:.1f}M UNet parameters train); vdjax "
         f"attention `{attention}`; reference eager PyTorch with SDPA",
         "remat: vdjax `config.train.remat` (a jax.checkpoint policy on each UNet layer); reference: diffusers' "
         "per-block gradient checkpointing for `full` and `dots`",
         "FLOPs: XLA's cost analysis of vdjax's compiled step (the reference's TFLOP/s uses the same count); "
         "compile: JAX's trace + lower + compile seconds during the first step (jax.monitoring)"],
        ["remat", "implementation", "median s", "min–max s", "vdjax / reference", "compile or first call s",
         "GFLOP / step", "TFLOP/s", "MFU", "peak memory GiB", "XLA temporaries GiB"], rows)


if __name__ == "__main__":
    main()
