"""Peak memory of a 16-frame 512x512 VAE decode, whole clip vs chunked (XLA's compiled memory analysis).

    python bench/vae_memory.py [--frames 16] [--size 512] [--chunks 16,4,1]

No weights and no compute: the full-size decoder is compiled for abstract parameters and XLA reports the
buffers it would allocate (arguments, outputs, temporaries). Runs on CPU or an accelerator.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from vdjax.layers.primitives import InitKeys
from vdjax.models.vae import AutoencoderKL, base_config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--chunks", default="16,4,1")
    args = parser.parse_args()
    abstract = nnx.eval_shape(lambda: AutoencoderKL(base_config(), rngs=InitKeys(0)))
    graphdef, state = nnx.split(abstract)
    f = abstract.downsampling_factor
    latents = jax.ShapeDtypeStruct((1, args.frames, args.size // f, args.size // f, 4), jnp.float32)
    print(f"device: {jax.devices()[0].device_kind}; decode {args.frames} frames of {args.size}x{args.size}")
    print(f"{'chunk':>6} {'temp GiB':>9} {'args GiB':>9} {'out GiB':>8} {'compile s':>10}")
    for chunk in map(int, args.chunks.split(",")):
        start = time.perf_counter()
        fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode_video(z, chunk_size=chunk))
        mem = fn.lower(state, latents).compile().memory_analysis()
        print(f"{chunk:>6} {mem.temp_size_in_bytes / 2**30:>9.2f} {mem.argument_size_in_bytes / 2**30:>9.2f} "
              f"{mem.output_size_in_bytes / 2**30:>8.2f} {time.perf_counter() - start:>10.1f}")


if __name__ == "__main__":
    main()
