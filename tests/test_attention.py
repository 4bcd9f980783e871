"""Every attention implementation computes the same thing: the cache-blocked CPU path ('blocked', the default
'auto' on CPU) against jax.nn.dot_product_attention's XLA path and against torch's SDPA, on shapes that take one
block, several sequences per block, and query chunks within a sequence; causal too; and its gradients. The Pallas
TPU splash kernel ('splash') runs here in Pallas' interpreter, with its padding of tokens and head widths."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from vdjax.layers import attention as attn

SHAPES = {  # (batch, queries, keys, heads, head_dim)
    "one block": (2, 16, 16, 2, 8),
    "temporal, many sequences per block": (1024, 16, 16, 8, 40),
    "cross, a few sequences per block": (4, 1024, 77, 8, 8),
    "query chunks within a sequence": (1, 2048, 2048, 2, 8),
    "long sequences, head width 40 (row sums from the PV product)": (2, 256, 640, 2, 40),
}


def _qkv(b, t, s, n, d, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for shape in ((b, t, n, d), (b, s, n, d),
                                                                                    (b, s, n, d))]


@pytest.mark.parametrize("name", list(SHAPES))
def test_blocked_matches_xla_and_torch(name, monkeypatch):
    import torch
    b, t, s, n, d = SHAPES[name]
    q, k, v = _qkv(b, t, s, n, d)
    ref = attn.attention(q, k, v, impl="xla")
    out = jax.jit(lambda q, k, v: attn.attention(q, k, v, impl="blocked"))(q, k, v)
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5
    qt, kt, vt = (torch.from_numpy(np.array(x)).transpose(1, 2) for x in (q, k, v))
    theirs = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).numpy()
    assert float(np.max(np.abs(np.asarray(out) - theirs))) <= 1e-5
    monkeypatch.setattr(attn, "BLOCK_BYTES", 1 << 12)  # force loops even where one block would do
    small = jax.jit(lambda q, k, v: attn.attention(q, k, v, impl="blocked"))(q, k, v)
    assert float(jnp.max(jnp.abs(small - ref))) <= 1e-5


GRADIENT_SHAPES = {  # (batch, queries, keys, heads, head_dim, BLOCK_BYTES or None for the default, causal)
    "query chunks and a loop over sequences, causal": (3, 32, 32, 2, 8, 1 << 10, True),
    "cross-attention, more keys than queries, loop": (2, 24, 40, 2, 8, 1 << 10, False),
    "frames: short sequences, one block (broadcast products)": (4, 16, 16, 2, 8, None, False),
    "one block of 256-token sequences": (2, 256, 256, 2, 16, None, False),
    "long sequences, causal, query chunks (row sums from the PV product)": (1, 520, 520, 2, 8, 1 << 16, True),
}


def test_blocked_causal_forward(monkeypatch):
    monkeypatch.setattr(attn, "BLOCK_BYTES", 1 << 10)  # 8 query rows x 32 keys per block: chunks and a loop
    q, k, v = _qkv(3, 32, 32, 2, 8, seed=1)
    for causal in (False, True):
        ref = attn.attention(q, k, v, causal=causal, impl="xla")
        out = attn.attention(q, k, v, causal=causal, impl="blocked")
        assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5, causal


@pytest.mark.parametrize("name", list(GRADIENT_SHAPES))
def test_blocked_gradients_match_xla_and_torch(name, monkeypatch):
    """The blocked path's own backward (logits recomputed from the saved logsumexp, dK and dV accumulated per query
    chunk) against JAX's autodiff of XLA's path and torch's SDPA backward."""
    import torch
    b, t, s, n, d, block, causal = GRADIENT_SHAPES[name]
    if block is not None:
        monkeypatch.setattr(attn, "BLOCK_BYTES", block)
    q, k, v = _qkv(b, t, s, n, d, seed=2)
    cotangent = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape).astype(np.float32))

    def grads(impl):
        _, vjp = jax.vjp(lambda q, k, v: attn.attention(q, k, v, causal=causal, impl=impl), q, k, v)
        return jax.jit(vjp)(cotangent)

    ours, ref = grads("blocked"), grads("xla")
    qt, kt, vt = (torch.from_numpy(np.array(x)).transpose(1, 2).requires_grad_(True) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    theirs = torch.autograd.grad(out, (qt, kt, vt), torch.from_numpy(np.array(cotangent)).transpose(1, 2))
    for g, r, th, what in zip(ours, ref, theirs, "qkv"):
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-5, what
        assert float(np.max(np.abs(np.asarray(g) - th.transpose(1, 2).numpy()))) <= 1e-5, what


SPLASH_SHAPES = {  # (batch, queries, keys, heads, head_dim, causal)
    "whole blocks, head width 64": (2, 256, 256, 2, 64, False),
    "cross-attention: 77 keys padded and masked, head width 40": (2, 200, 77, 2, 40, False),
    "causal, padded queries and keys": (1, 100, 100, 2, 8, True),
}


@pytest.mark.parametrize("name", list(SPLASH_SHAPES))
def test_splash_matches_xla(name):
    b, t, s, n, d, causal = SPLASH_SHAPES[name]
    q, k, v = _qkv(b, t, s, n, d, seed=3)
    out = jax.jit(lambda q, k, v: attn.attention(q, k, v, causal=causal, impl="splash"))(q, k, v)
    ref = attn.attention(q, k, v, causal=causal, impl="xla")
    assert out.shape == ref.shape and float(jnp.max(jnp.abs(out - ref))) <= 1e-5


def test_splash_gradients_and_bfloat16():
    q, k, v = _qkv(1, 100, 100, 2, 8, seed=4)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attn.attention(q, k, v, causal=True, impl=impl)))

    for g, r in zip(jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-5
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = attn.attention(qb, kb, vb, impl="splash")
    assert out.dtype == jnp.bfloat16
    ref = attn.attention(qb, kb, vb, impl="xla").astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) <= 2e-2


SPLASH_ON_A_MESH = """
import json
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vdjax.layers import attention as attn
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((4, 128, 4, 16)), jnp.float32) for _ in range(3))
def loss(impl):
    return lambda q, k, v: jnp.sum(jnp.sin(attn.attention(q, k, v, impl=impl)))
with jax.set_mesh(mesh):
    qs, ks, vs = (jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v))
    run = jax.jit(lambda q, k, v: attn.attention(q, k, v, impl="splash"))
    out = run(qs, ks, vs)
    hlo = run.lower(qs, ks, vs).compile().as_text()
    grads = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(qs, ks, vs)
ref, ref_grads = attn.attention(q, k, v, impl="xla"), jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
print(json.dumps({"error": float(jnp.max(jnp.abs(out - ref))), "spec": str(out.sharding.spec),
                  "all_gathers": hlo.count("all-gather("),
                  "grad_error": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, ref_grads))}))
"""


def test_splash_runs_per_device_on_a_mesh():
    """Under a mesh set as context (4 fake devices: data 2 x tensor 2) the kernel runs per device on its batch rows
    and heads (shard_map): the output stays sharded, nothing is gathered, and it equals the unsharded XLA path."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SPLASH_ON_A_MESH], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] <= 1e-5 and report["grad_error"] <= 1e-5, report
    assert report["spec"] == "P('data', None, 'tensor')" and report["all_gathers"] == 0, report


def test_bfloat16_and_the_default():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, 64, 64, 2, 16, seed=2))
    out = attn.attention(q, k, v, impl="blocked")
    assert out.dtype == jnp.bfloat16
    ref = attn.attention(q, k, v, impl="xla").astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) <= 2e-2  # bfloat16 rounding of the output
    default = attn.attention(q, k, v)  # 'auto': the blocked path on a CPU, XLA's elsewhere
    expected = attn.attention(q, k, v, impl="blocked" if jax.default_backend() == "cpu" else "xla")
    np.testing.assert_array_equal(np.asarray(default, np.float32), np.asarray(expected, np.float32))
    with pytest.raises(ValueError, match="choose one of"):
        attn.attention(q, k, v, impl="flash")


def test_a_resumed_run_may_change_the_attention_implementation(tmp_path):
    """attention_impl is how layers compute, not what the weights are: a workdir accepts a config that differs only
    there, and still refuses one whose model differs."""
    import ml_collections
    from vdjax.train.checkpoints import Checkpoints

    def config(impl, channels=(32, 64)):
        return ml_collections.ConfigDict(dict(unet=dict(attention_impl=impl, block_out_channels=channels),
                                              text_encoder=dict(attention_impl=impl, hidden_size=32)))

    Checkpoints._check_config(str(tmp_path), config("xla"))  # writes tmp_path/config.json
    Checkpoints._check_config(str(tmp_path), config("auto"))
    with pytest.raises(ValueError, match="another model config .*unet"):
        Checkpoints._check_config(str(tmp_path), config("auto", (32, 128)))
