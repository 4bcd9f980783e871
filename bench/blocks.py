"""The UNet's building blocks one at a time, vdjax (XLA) vs PyTorch: where a whole-model gap (bench/unet.py) comes from.

    python bench/blocks.py                       # the workload of this machine's backend; appends to BENCHMARKS.md
    python bench/blocks.py --size=smoke --no-append

Each kernel is the vdjax layer the UNet runs (vdjax.layers: primitives.conv2d, GroupNorm + SiLU, LayerNorm + Linear
through primitives.biased_dot as the GEGLU's proj_in runs, attention with attention_impl 'auto' or bench's GPU pick),
jitted alone, against the torch ops diffusers calls for it (F.conv2d, F.group_norm + F.silu, F.layer_norm + F.linear,
F.scaled_dot_product_attention), on the same inputs and weights. Shapes are the largest of each kind in
bench/unet.py's workload, at its 32 frames (batch 2 x 16):
- cpu: 32x32 latents, 64 channels (128 into the first conv of the last up block, which takes the skip), 8 heads of
  width 8, float32;
- gpu: SD 1.5 at 64x64 latents, 320 channels (640 in), 8 heads of width 40, bfloat16;
- smoke: 8x8, 32 channels, 1 timed run (tests/test_bench.py).
"""
from __future__ import annotations

import dataclasses

import common
import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    frames: int
    size: int  # latent pixels per side
    channels: int
    heads: int
    dtype: str

    def describe(self) -> str:
        return (f"{self.frames} frames of {self.size}x{self.size} latents, {self.channels} channels, {self.heads} "
                f"heads of width {self.channels // self.heads}, {self.dtype}")


WORKLOADS = {
    "smoke": Workload(2, 8, 32, 2, "float32"),
    "cpu": Workload(32, 32, 64, 8, "float32"),
    "gpu": Workload(32, 64, 320, 8, "bfloat16"),
}


def blocks(w: Workload, attention: str):
    """name -> (vdjax fn, torch fn, (vdjax inputs, torch inputs), FLOPs or None, the axes that put vdjax's output in
    torch's layout: NHWC -> NCHW, attention's (n, tokens, heads, width) -> (n, heads, tokens, width))."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F
    from flax import nnx

    from vdjax.layers import primitives
    from vdjax.layers.attention import attention as attend

    n, s, c, h = w.frames, w.size, w.channels, w.heads
    rng = np.random.default_rng(0)
    jdt, tdt = common.jax_dtype(w.dtype), common.torch_dtype(w.dtype)
    device = common.torch_device()
    rngs = nnx.Rngs(0)

    def randn(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def nhwc_to_torch(x):
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device, tdt)

    def to_torch(x):
        return torch.from_numpy(x).to(device, tdt)

    out = {}
    for cin in (c, 2 * c):
        conv = primitives.conv2d(cin, c, 3, dtype=jdt, rngs=rngs)
        conv.kernel.set_value(jnp.asarray(randn(3, 3, cin, c) / np.sqrt(9 * cin)))
        conv.bias.set_value(jnp.asarray(randn(c)))
        weight = nhwc_to_torch(np.array(conv.kernel[...]).transpose(3, 0, 1, 2))  # HWIO -> OIHW
        bias = to_torch(np.array(conv.bias[...]))
        x = randn(n, s, s, cin)
        out[f"conv 3x3 {cin}->{c}"] = (
            nnx.jit(lambda m, x: m(x.astype(jdt))), lambda x, wt=weight, b=bias: F.conv2d(x, wt, b, padding=1),
            ((conv, jnp.asarray(x)), (nhwc_to_torch(x),)), 2 * n * s * s * 9 * cin * c, (0, 3, 1, 2))
    norm = primitives.GroupNorm(32 if c % 32 == 0 else c // 4, c, eps=1e-5, dtype=jdt, rngs=rngs)
    groups = norm.num_groups
    x = randn(n, s, s, c)
    out["GroupNorm + SiLU"] = (nnx.jit(lambda m, x: jax.nn.silu(m(x.astype(jdt)))),
                               lambda x: F.silu(F.group_norm(x, groups, eps=1e-5)),
                               ((norm, jnp.asarray(x)), (nhwc_to_torch(x),)), None, (0, 3, 1, 2))
    ln = primitives.layer_norm(c, dtype=jdt, rngs=rngs)
    proj = primitives.dense(c, 8 * c, dtype=jdt, rngs=rngs)  # GEGLU's input projection: 2 x 4c
    weight, bias = to_torch(np.array(proj.kernel[...]).T.copy()), to_torch(np.array(proj.bias[...]))
    x = randn(n, s * s, c)
    out[f"LayerNorm + Linear {c}->{8 * c}"] = (
        nnx.jit(lambda m, x: primitives.biased_dot(m[1], m[0](x.astype(jdt)))),  # as FeedForward runs it
        lambda x: F.linear(F.layer_norm(x, (c,), eps=1e-5), weight, bias),
        ((nnx.List([ln, proj]), jnp.asarray(x)), (to_torch(x),)), 2 * n * s * s * c * 8 * c, (0, 1, 2))
    q, k, v = (randn(n, s * s, h, c // h) for _ in range(3))
    out[f"self-attention ({attention})"] = (
        jax.jit(lambda q, k, v: attend(q.astype(jdt), k.astype(jdt), v.astype(jdt), impl=attention)),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        ((jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)),
         tuple(to_torch(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (q, k, v))),
        4 * n * h * (s * s) ** 2 * (c // h), (0, 2, 1, 3))
    return out, device


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--attention", default=None, choices=("xla", "blocked", "cudnn", "auto"),
                   help="vdjax's attention implementation (default: as bench/unet.py picks it)")
    args = common.parse(p, argv)
    w = WORKLOADS[args.size]
    attention = common.attention_impl(args.attention, w.dtype, [w.channels // w.heads])

    import torch

    print(f"blocks ({args.size}): {w.describe()}")
    rows, errors = [], []
    table, device = blocks(w, attention)
    for name, (ours, theirs, (jax_in, torch_in), flop, axes) in table.items():
        def run_vdjax():
            return ours(*jax_in).block_until_ready()

        def run_torch():
            with torch.inference_mode():
                result = theirs(*torch_in)
            common.torch_sync(device)
            return result

        print(name)
        times = common.interleaved({"vdjax": run_vdjax, "torch": run_torch}, warmup=args.warmup, repeats=args.repeats,
                                   settle=args.settle)
        a, b = np.asarray(run_vdjax(), np.float32).transpose(axes), run_torch().float().cpu().numpy()
        errors.append(f"{name} {float(np.max(np.abs(a - b))):.1e}")
        ratio = times["vdjax"].median / times["torch"].median
        for impl, timing in times.items():
            rate = "n/a" if flop is None else f"{flop / timing.median / 1e9:.0f}"
            rows.append([name, impl, f"{1e3 * timing.median:.2f}", f"{1e3 * min(timing.times):.2f}–"
                         f"{1e3 * max(timing.times):.2f}", f"{ratio:.2f}" if impl == "vdjax" else "1", rate])
    common.report(
        args, f"blocks: the UNet's building blocks, vdjax vs torch ({args.size} workload)",
        [f"workload: {w.describe()}; vdjax attention `{attention}`, torch SDPA",
         "each kernel jitted alone (vdjax) or eager (torch); GFLOP/s from the kernel's own FLOP count (dots and "
         "convolutions only)", "check (max abs difference): " + "; ".join(errors)],
        ["kernel", "implementation", "median ms", "min–max ms", "vdjax / torch", "GFLOP/s"], rows, memory=False)


if __name__ == "__main__":
    main()
