"""FLOPs of a compiled program and model FLOP utilisation (MFU) against the chip's dense bf16 peak.

XLA's cost analysis counts the FLOPs of the compiled program one device runs (after SPMD partitioning), so
MFU = flops_per_device x calls_per_second / peak_per_device, whatever the mesh.
"""
from __future__ import annotations

import jax

# Dense bfloat16 peak per device (TFLOP/s), by the start of `jax.Device.device_kind`; longest match wins.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA H800": 989.0, "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0, "NVIDIA A10G": 70.0, "NVIDIA GB200": 2250.0, "NVIDIA B200": 2250.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "TPU7x": 2307.0,
}


def compiled_flops(compiled) -> float | None:
    """FLOPs per call of one device's program (`jax.jit(f).lower(...).compile()`), or None if XLA gives none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (CPUs, unlisted chips)."""
    kind = (device or jax.devices()[0]).device_kind
    matches = [k for k in PEAK_BF16_TFLOPS if kind.startswith(k)]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] * 1e12 if matches else None


def mfu(flops_per_call: float | None, calls_per_second: float, device: jax.Device | None = None) -> float | None:
    """Model FLOP utilisation in [0, 1], or None where the FLOPs or the chip's peak are unknown."""
    peak = peak_flops(device)
    if not flops_per_call or not peak:
        return None
    return flops_per_call * calls_per_second / peak
