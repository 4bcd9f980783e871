"""What the side-by-side benchmarks share: the backend and workload size, interleaved timing, FLOPs and MFU,
peak memory, identical weights for vdjax and diffusers, and the Markdown section appended to BENCHMARKS.md.

Every script runs `--size=smoke|cpu|gpu` (default: `gpu` on an accelerator, `cpu` otherwise), times vdjax and the
PyTorch reference in one loop that alternates between them (so that whatever else runs on the machine slows both
alike), and reports the median of the timed runs after the warm-up, their min-max, the vdjax/reference ratio and
compile time separately.

Peak memory:
- GPU: torch's `max_memory_allocated` (reset before the call); vdjax's compiled program from XLA's memory analysis
  (arguments + outputs + temporaries, aliased buffers once), the same scope (weights, inputs, activations).
- CPU: the process's peak RSS during one call above its RSS just before it (sampled by a thread, and the kernel's
  high-water mark reset through /proc/self/clear_refs; free heap pages returned first with malloc_trim), for both
  sides alike; XLA's temporaries are printed next to it.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import platform
import shlex
import sys
import time
from typing import Callable, Sequence

# JAX and torch share one GPU in these scripts: JAX must not take 75% of its memory at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python bench/<name>.py` from a checkout, installed or not
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")
SIZES = ("smoke", "cpu", "gpu")


# ---- backend, arguments ------------------------------------------------------------------------------------------
def accelerator() -> bool:
    return jax.default_backend() != "cpu"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default=None,
                   help="workload: 'gpu' (full size, bfloat16), 'cpu' (small, float32) or 'smoke' (tiny, 1 timed "
                        "run: for tests). Default: gpu on an accelerator, cpu otherwise.")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per implementation (default 5; smoke 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per implementation before the timed ones")
    p.add_argument("--no-append", action="store_true", help="print the table only; do not append to BENCHMARKS.md")
    # The pause lets the other side's idle worker threads stop spinning: torch's OpenMP workers busy-wait after a
    # call, which took CPU from the XLA call timed next (2 cores: the tiny train step 1.72 s after torch's, 1.19 s
    # alone, 1.24 s with the pause).
    p.add_argument("--settle", type=float, default=None,
                   help="seconds to pause before each timed call (default 0.5; smoke 0)")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = p.parse_args(argv)
    args.size = args.size or ("gpu" if accelerator() else "cpu")
    if args.repeats is None:
        args.repeats = 1 if args.size == "smoke" else 5
    if args.settle is None:
        args.settle = 0.0 if args.size == "smoke" else 0.5
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    args.command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    return args


def torch_device():
    """Where the reference runs: CUDA when JAX runs on a GPU, else the CPU (threads: one per core, as XLA's CPU
    backend uses). Comparing a JAX accelerator with torch on the host would say nothing, so that is refused."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # e.g. the float32-modules note of `.to(dtype)`
    if accelerator():
        if not torch.cuda.is_available():
            raise SystemExit(f"JAX runs on {jax.devices()[0].device_kind} but this torch ({torch.__version__}) has no "
                             "CUDA: install a CUDA build of torch, or run with JAX_PLATFORMS=cpu --size=cpu.")
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu")


def torch_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_impl(requested: str | None, dtype: str, head_dims, *, training: bool = False) -> str:
    """vdjax's attention implementation for a run: `requested` if given; on a CPU the cache-blocked one; on a GPU in
    a 16-bit dtype cuDNN flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`) when a probe
    compiles for every head width (Hopper takes up to 256, earlier chips 128: SD 1.5's deepest level has 160), else
    XLA's."""
    if requested:
        return requested
    if jax.default_backend() == "cpu":
        from vdjax.layers.attention import resolve
        return resolve("auto")  # what the default runs here, named in the report
    if jax.default_backend() != "gpu" or dtype == "float32":
        return "xla"
    import jax.numpy as jnp

    def probe(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32).sum()

    try:
        for h in sorted(set(head_dims)):
            q, kv = jnp.zeros((1, 128, 2, h), jnp.bfloat16), jnp.zeros((1, 77, 2, h), jnp.bfloat16)
            jax.jit(jax.grad(probe) if training else probe).lower(q, kv, kv).compile()
    except Exception as e:  # noqa: BLE001 - any refusal means: not on this chip / cuDNN
        print(f"cuDNN flash attention does not take head widths {sorted(set(head_dims))} here ({e}); using XLA's")
        return "xla"
    return "cudnn"


# ---- timing ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    times: list[float]
    first: float | None = None  # the first (warm-up) call, torch's compile-or-first-call time

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def spread(self) -> str:
        return f"{fmt_s(min(self.times))}–{fmt_s(max(self.times))}"


def interleaved(runs: dict[str, Callable[[], object]], *, warmup: int, repeats: int, settle: float = 0.0,
                log=print) -> dict[str, Timing]:
    """Time each callable (which must return only once its work is done), alternating between them: warm-up
    rounds first, then `repeats` timed rounds, each calling every callable once in order, `settle` seconds after
    the previous call."""
    out = {name: Timing([]) for name in runs}
    for r in range(warmup + repeats):
        for name, fn in runs.items():
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if r == 0:
                out[name].first = elapsed
            if r >= warmup:
                out[name].times.append(elapsed)
            log(f"  {'warm-up' if r < warmup else 'run'} {r + 1 - (warmup if r >= warmup else 0)}: {name} "
                f"{fmt_s(elapsed)} s")
    return out


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling with JAX so far (jax.monitoring events):
    the difference across a first call is that call's compile time."""
    return _compile_seconds[0]


def compile_timed(jitted, *args, **kwargs):
    """(compiled, seconds): trace, lower and compile ahead of the timed calls."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def flops_of(compiled) -> float | None:
    from vdjax import flops

    return flops.compiled_flops(compiled)


def mfu(flops_per_call: float | None, seconds: float) -> float | None:
    from vdjax import flops

    return flops.mfu(flops_per_call, 1.0 / seconds)


# ---- memory ------------------------------------------------------------------------------------------------------
def xla_bytes(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"temp": m.temp_size_in_bytes, "total": total}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_peak_during(fn: Callable[[], object], interval: float = 0.002) -> int | None:
    """Peak RSS during `fn` above the RSS just before it (Linux), or None elsewhere.

    The kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) is only brought up to date when
    memory is unmapped, so a thread also samples the RSS every `interval` seconds; the larger of the two counts.
    Free heap pages are returned first (malloc_trim), so memory freed earlier does not hide new allocations."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = rss()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak[0], rss(), _status_bytes("VmHWM")) - before)


def torch_cuda_peak(fn: Callable[[], object], device) -> int:
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def peak_memory(fn: Callable[[], object], *, compiled=None, torch_device=None,
                jax_process_peak: bool = False) -> int | None:
    """Bytes for the table's peak-memory column (see the module docstring): on CPU the RSS peak of one call of
    `fn`; on a GPU torch's peak during `fn` (`torch_device`), XLA's memory analysis of `compiled`, or, for work
    that is not one compiled program (`jax_process_peak`), JAX's peak bytes in use in this process so far."""
    if not accelerator():
        return rss_peak_during(fn)
    if torch_device is not None:
        return torch_cuda_peak(fn, torch_device)
    if compiled is not None:
        return xla_bytes(compiled)["total"]
    if jax_process_peak:
        fn()
        return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return None


def memory_note() -> str:
    if accelerator():
        return ("peak memory: diffusers `torch.cuda.max_memory_allocated` during one call; vdjax XLA's memory "
                "analysis of the compiled program (arguments + outputs + temporaries), or, for several programs in "
                "a row, JAX's peak bytes in use in the process; all include the weights")
    return ("peak memory: peak RSS during one call above the RSS just before it (sampled every 2 ms and the "
            "kernel's VmHWM, reset through /proc/self/clear_refs, after malloc_trim), both sides in this process; "
            "weights are not included")


def out_of_memory(e: BaseException) -> bool:
    """torch's CUDA OOM or XLA's RESOURCE_EXHAUSTED: a workload too large for this device, not a bug."""
    text = f"{type(e).__name__}: {e}"
    return "out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text


def free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---- identical weights -------------------------------------------------------------------------------------------
def randomize_torch(model, seed: int = 0) -> None:
    """Every parameter re-drawn (zero-initialised ones included), on the model's device: fan-in scaled normals for
    matrices, 1 + noise for norm scales, small noise for vectors. Speed does not depend on the values, but
    no parameter is left at exactly zero."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)
            if p.ndim >= 2:
                p.copy_(noise / float(np.sqrt(np.prod(p.shape[1:]))))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def jax_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """An AnimateDiff UNet (SD 1.5 layout: spatial transformers on every level but the last, motion module v2)."""
    channels: tuple[int, ...]
    layers: int
    heads: int  # spatial heads per level
    cross_dim: int
    groups: int
    motion_heads: int

    @property
    def head_dims(self) -> list[int]:
        spatial = [c // self.heads for c in self.channels[:-1]]
        return spatial + [c // self.motion_heads for c in self.channels]

    def describe(self) -> str:
        return (f"block channels {self.channels}, {self.layers} layers per block, {self.heads} heads, cross-attention "
                f"dim {self.cross_dim}, GroupNorm {self.groups} groups, motion modules v2 ({self.motion_heads} heads, "
                "mid-block module)")


SD15 = UNetSpec((320, 640, 1280, 1280), 2, 8, 768, 32, 8)


def family_config(variant: str):
    """configs/animatediff_sd15.py's config for `variant` with diffusers' GroupNorm placement (what the reference
    computes), as absl's config_flags would build it."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("animatediff_sd15",
                                                         os.path.join(ROOT, "configs", "animatediff_sd15.py"))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(f"variant={variant},norms=diffusers")


def animatediff_config(spec: UNetSpec, dtype: str, attention: str, *, tiny_parts: bool):
    """The family config with the UNet of `spec`, and the VAE and text encoder of the tiny test model or SD 1.5."""
    cfg = family_config("tiny_v2" if tiny_parts else "v2")
    levels = len(spec.channels)
    cfg.unet.update(block_out_channels=spec.channels, layers_per_block=spec.layers,
                    cross_attention_dim=spec.cross_dim, norm_num_groups=spec.groups,
                    num_attention_heads=(spec.heads,) * levels, attention_levels=(True,) * (levels - 1) + (False,),
                    dtype=dtype, attention_impl=attention)
    cfg.unet.motion.num_attention_heads = spec.motion_heads
    cfg.vae.dtype = dtype
    cfg.text_encoder.update(dtype=dtype, attention_impl=attention)
    return cfg


def diffusers_motion_kwargs(spec: UNetSpec) -> dict:
    return dict(block_out_channels=spec.channels, layers_per_block=spec.layers, cross_attention_dim=spec.cross_dim,
                norm_num_groups=spec.groups, motion_num_attention_heads=spec.motion_heads,
                motion_max_seq_length=32, use_motion_mid_block=True)


def diffusers_motion_unet(spec: UNetSpec, seed: int = 0):
    """diffusers' UNetMotionModel for `spec`, randomised, float32 on the CPU."""
    import torch
    from diffusers import UNetMotionModel

    levels = len(spec.channels)
    torch.manual_seed(seed)
    model = UNetMotionModel(
        down_block_types=("CrossAttnDownBlockMotion",) * (levels - 1) + ("DownBlockMotion",),
        up_block_types=("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * (levels - 1),
        num_attention_heads=spec.heads, **diffusers_motion_kwargs(spec))
    randomize_torch(model, seed)
    return model.eval()


def diffusers_vae(v):
    """diffusers' AutoencoderKL for vdjax's VAE config `v`, randomised, float32 on the CPU."""
    from diffusers import AutoencoderKL

    levels = len(v.block_out_channels)
    model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                          up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(v.block_out_channels),
                          layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups,
                          scaling_factor=v.scaling_factor)
    randomize_torch(model, seed=1)
    return model.eval()


def transformers_text(t):
    """transformers' CLIPTextModel for vdjax's text config `t`, randomised, float32 on the CPU."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act, bos_token_id=0,
        eos_token_id=t.eos_token_id))
    randomize_torch(model, seed=2)
    return model.eval()


def load_vdjax(part: str, config, state: dict[str, np.ndarray], *, motion: dict | None = None, dtype=None):
    """A vdjax part ('unet', 'vae', 'text_encoder') from diffusers/transformers state dicts held in memory, through
    vdjax's own converter (layout detection, key map, one parameter at a time onto the device)."""
    import jax.numpy as jnp
    from vdjax.convert import sources

    srcs = {part: state} if motion is None else {part: state, "motion": motion}
    return sources.load_part(part, config, srcs, dtype=dtype or jnp.float32)


# ---- report ------------------------------------------------------------------------------------------------------
def fmt_s(seconds: float) -> str:
    return f"{seconds:.3g}" if seconds < 100 else f"{seconds:.0f}"


def fmt_gib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.3g}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    host = f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    if accelerator():
        import torch

        gpu = jax.devices()[0].device_kind
        ref = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        return f"{gpu} (torch sees {ref}); host {host}"
    import torch

    return f"CPU only: {host}; XLA CPU backend, torch {torch.get_num_threads()} threads"


def versions() -> str:
    import diffusers
    import flax
    import jaxlib
    import torch

    return (f"jax {jax.__version__} (jaxlib {jaxlib.__version__}), flax {flax.__version__}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, python {platform.python_version()}")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def report(args, title: str, bullets: Sequence[str], header: Sequence[str], rows: Sequence[Sequence[str]],
           notes: Sequence[str] = (), memory: bool = True) -> str:
    """Print the section; append it to BENCHMARKS.md unless --no-append. memory: the table has peak memory."""
    lines = [f"### {title}", "", f"- machine: {machine()}", f"- versions: {versions()}",
             f"- command: `{args.command}`",
             f"- timing: median of {args.repeats} timed runs after {args.warmup} warm-up run(s); vdjax and the "
             "reference alternate within one loop, so load from other processes hits both alike, each call "
             f"{args.settle:g} s after the last",
             *(f"- {b}" for b in bullets), *([f"- {memory_note()}"] if memory else []), "", *table(header, rows)]
    if notes:
        lines += ["", *notes]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_append:
        with open(BENCHMARKS_MD, "a") as f:
            f.write("\n" + text)
        print(f"appended to {BENCHMARKS_MD}")
    return text


def flops_cells(flops_per_call: float | None, seconds: float) -> tuple[str, str, str]:
    """(GFLOP per call, achieved TFLOP/s, MFU) — MFU only where the chip's dense bf16 peak is known."""
    if not flops_per_call:
        return "n/a", "n/a", "n/a"
    util = mfu(flops_per_call, seconds)
    return (f"{flops_per_call / 1e9:.1f}", f"{flops_per_call / seconds / 1e12:.3f}",
            "n/a" if util is None else f"{100 * util:.1f}%")
