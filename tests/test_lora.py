"""LoRA merging vs diffusers' own LoRA loading (PEFT layers, not merged), float32 on CPU, everything randomised.

One kohya-layout file (UNet attention q/k/v/out, proj_in/out, ff, a 3x3 LoCon conv; text encoder q/k/v/out and
mlp; alpha != rank) is loaded by diffusers' `StableDiffusionLoraLoaderMixin` classmethods, which need no pipeline
and no network, into a tiny `UNet2DConditionModel` and a transformers `CLIPTextModel`; the adapter weight is the
LoRA scale. vdjax merges the same file, the PEFT export of the adapter diffusers built, and diffusers' older
attention-processor layout, and must give the same outputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import load_config, max_abs_error, randomize_torch
from vdjax.convert.diffusers import unet_ignored, unet_key
from vdjax.convert.hf_clip import load_text
from vdjax.convert.keymap import load_params
from vdjax.convert.lora import LoraError, merge_lora, merge_loras
from vdjax.models.clip import CLIPTextModel, text_config
from vdjax.models.unet3d import UNet3D
from vdjax.layers.primitives import InitKeys

pytest.importorskip("peft")  # diffusers' LoRA loading, the reference, runs on peft

TOL = 1e-4
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8)
TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
               "layer_norm_eps", "projection_dim", "vocab_size", "max_position_embeddings", "eos_token_id")
SCALE_A, SCALE_B = 0.7, -0.5
HEADS = (2, 4)


def _layers(model, keep) -> dict[str, tuple[int, ...]]:
    """torch module name -> weight shape, for the Linear/Conv2d layers `keep` accepts."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and keep(n)}


def _kohya(layers, prefix, rank, alpha, seed) -> dict[str, np.ndarray]:
    """A random kohya LoRA; conv layers as LoCon (down (r, I, kh, kw), up (O, r, 1, 1)). Deltas ~ the weights."""
    rng, out = np.random.default_rng(seed), {}
    for name, shape in layers.items():
        key = prefix + name.replace(".", "_")
        fan_in = int(np.prod(shape[1:]))
        out[key + ".lora_down.weight"] = (rng.standard_normal((rank, *shape[1:])) / np.sqrt(fan_in)).astype("f4")
        up = rng.standard_normal((shape[0], rank, *([1, 1] if len(shape) == 4 else []))) / np.sqrt(rank)
        out[key + ".lora_up.weight"] = up.astype("f4")
        if alpha is not None:
            out[key + ".alpha"] = np.asarray(alpha, "f4")
    return out


def _diffusers_load(state_dict, unet=None, text_encoder=None, name="a"):
    """diffusers' own kohya -> diffusers conversion and PEFT injection; returns the converted (old-layout) dict."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    converted, alphas = Loader.lora_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    if unet is not None:
        Loader.load_lora_into_unet(converted, alphas, unet, adapter_name=name)
    if text_encoder is not None:
        Loader.load_lora_into_text_encoder(converted, alphas, text_encoder, prefix="text_encoder", adapter_name=name)
    return {k: v.numpy() for k, v in converted.items()}


def _adapted(model, name) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(f".lora_A.{name}")}


@pytest.fixture(scope="module")
def lora_case():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    reference = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=HEADS, **TINY).eval()
    state = randomize_torch(reference)
    cfg = load_config("configs/animatediff_sd15.py:variant=tiny_sd15").unet
    cfg.num_attention_heads = HEADS  # diffusers' `attention_head_dim` is the head count (its naming quirk)
    base = UNet3D(cfg, rngs=InitKeys(0))
    load_params(base, state, unet_key, ignore=unet_ignored, source="UNet2DConditionModel")

    # A: every layer of the transformer blocks (1x1-conv proj_in/out, q/k/v/out, ff) and a 3x3 conv, alpha 2 of
    # rank 4, plus a text-encoder half (a real SD 1.5 file has both). B: other layers, no alpha (scale 1).
    a_layers = _layers(reference, lambda n: ".attentions." in n or n == "down_blocks.0.resnets.0.conv1")
    b_layers = _layers(reference, lambda n: n.endswith(("attn1.to_q", "attn2.to_out.0")) or n.endswith("conv2"))
    text, text_state = _text_reference()
    lora_a = {**_kohya(a_layers, "lora_unet_", 4, 2.0, seed=1),
              **_kohya(_layers(text, lambda n: ".layers." in n), "lora_te_text_model_", 2, 1.0, seed=2)}
    lora_b = _kohya(b_layers, "lora_unet_", 3, None, seed=3)
    lora_a_old = _diffusers_load(lora_a, unet=reference, text_encoder=text, name="a")
    lora_b_old = _diffusers_load(lora_b, unet=reference, name="b")  # processor / `.lora.down` layout
    # The reference is only as good as what diffusers actually injected: every layer, nothing silently dropped.
    assert _adapted(reference, "a") == set(a_layers) and _adapted(reference, "b") == set(b_layers)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 16, 16, 4)).astype(np.float32)
    t, context = np.array([981, 250]), rng.standard_normal((2, 7, 32)).astype(np.float32)

    def ref(adapters):  # diffusers' forward with these adapters active at these weights
        reference.set_adapters(list(adapters), weights=list(adapters.values()))
        with torch.no_grad():
            return reference(torch.from_numpy(x[:, 0].transpose(0, 3, 1, 2)), torch.from_numpy(t),
                             torch.from_numpy(context)).sample.numpy()

    jitted = nnx.jit(lambda m, x, t, c: m(x, t, c))
    forward = lambda m: np.asarray(jitted(m, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)))[:, 0]
    refs = {"base": ref({"a": 0.0}), "a": ref({"a": SCALE_A}), "ab": ref({"a": SCALE_A, "b": SCALE_B})}
    return dict(base=base, forward=forward, refs=refs, lora_a=lora_a, lora_b_old=lora_b_old, lora_a_old=lora_a_old,
                text=(text, text_state),
                n_a=len(a_layers), n_te=len(_adapted(text, "a")), peft_a=_peft_export(reference, "a", lora_a))


def _peft_export(reference, name, kohya) -> dict[str, np.ndarray]:
    """The adapter as diffusers/PEFT save it (`unet.<module>.lora_A.weight`), with kohya's alphas as `.alpha`."""
    from peft.utils import get_peft_model_state_dict

    out = {"unet." + k: v.numpy() for k, v in get_peft_model_state_dict(reference, adapter_name=name).items()}
    modules = {k.rsplit(".lora_A.", 1)[0] for k in out if ".lora_A." in k}
    out.update({m + ".alpha": kohya["lora_unet_" + m[len("unet."):].replace(".", "_") + ".alpha"] for m in modules})
    return out


def _text_reference():
    """A randomised transformers CLIPTextModel and its state dict, taken before diffusers injects LoRA layers."""
    from transformers import CLIPTextConfig, CLIPTextModel as HFText

    cfg = text_config("tiny")
    torch.manual_seed(0)
    model = HFText(CLIPTextConfig(**{k: cfg[k] for k in TEXT_FIELDS}, bos_token_id=0, pad_token_id=1)).eval()
    return model, randomize_torch(model, seed=4)


def _check(name, ours, ref, base):
    err = max_abs_error(ours, ref)
    print(f"{name}: max abs error {err:.2e} (LoRA moved the output by {max_abs_error(ref, base):.2f})")
    assert max_abs_error(ref, base) > 0.1, "the LoRA should change the output"
    assert err <= TOL, (name, err)


@pytest.mark.parametrize("layout", ["kohya", "peft", "peft_unprefixed"])
def test_unet_lora_matches_diffusers(lora_case, layout):
    c = lora_case
    lora = c["lora_a"] if layout == "kohya" else c["peft_a"]
    if layout == "peft_unprefixed":  # PEFT's own get_peft_model_state_dict on a bare UNet: no `unet.`
        lora = {k[len("unet."):]: v for k, v in lora.items()}
    model = nnx.clone(c["base"])
    summary = merge_lora(model, lora, SCALE_A, source=layout)
    assert summary["layers"] == c["n_a"]
    assert summary["skipped"] == [c["n_te"] if layout == "kohya" else 0]  # the text-encoder half
    _check(f"UNet {layout}", c["forward"](model).transpose(0, 3, 1, 2), c["refs"]["a"], c["refs"]["base"])


def test_two_loras_add(lora_case):
    """kohya A and B in diffusers' old attention-processor layout, at their scales, = diffusers with both active."""
    c = lora_case
    model = nnx.clone(c["base"])
    summary = merge_loras(model, [(c["lora_a"], SCALE_A, "A"), (c["lora_b_old"], SCALE_B, "B")])
    assert summary["modules"][1] > 0 and summary["layers"] < sum(summary["modules"])  # some layers in both
    _check("UNet A + B", c["forward"](model).transpose(0, 3, 1, 2), c["refs"]["ab"], c["refs"]["base"])


def test_lora_for_another_model_is_refused(lora_case):
    """An SDXL LoRA (LDM block names, second text encoder) and a mis-shaped layer: one error, model unchanged."""
    c = lora_case
    good = {k: v for k, v in c["lora_a"].items() if "down_blocks_0_resnets_0_conv1" in k}
    bad = {**good,
           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": np.zeros((4, 640), "f4"),
           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": np.zeros((640, 4), "f4"),
           "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 1280), "f4"),
           "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros((1280, 4), "f4"),
           "lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": np.zeros((4, 32, 1, 1), "f4"),
           "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight": np.zeros((64, 4, 1, 1), "f4"),
           "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": np.zeros((64, 4), "f4")}
    model = nnx.clone(c["base"])
    before = nnx.state(model, nnx.Param)
    with pytest.raises(LoraError) as err:
        merge_lora(model, bad, 1.0, source="sdxl_style.safetensors")
    msg = str(err.value)
    print(msg)
    for part in ("sdxl_style.safetensors", "input_blocks_4_1_transformer_blocks_0_attn1_to_q", "no part 'te2'",
                 "mid_block_attentions_0_proj_out", "(64, 64, 1, 1)", "hada_w1_a", "4 problem(s)"):
        assert part in msg, part
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                                                    jax.tree.leaves(before)))


@pytest.mark.parametrize("layout", ["kohya", "diffusers_old"])
def test_text_encoder_lora_matches_transformers(lora_case, layout):
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    c = lora_case
    reference, state = c["text"]
    cfg = text_config("tiny")
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size - 1, (2, cfg.max_position_embeddings))
    ids[:, -3:] = cfg.vocab_size - 1

    def ref(weight):
        set_weights_and_activate_adapters(reference, ["a"], [weight])
        with torch.no_grad():
            return reference(torch.from_numpy(ids)).last_hidden_state.numpy()

    model = CLIPTextModel(cfg, rngs=InitKeys(0))
    load_text(model, state)
    base_ref, lora_ref = ref(0.0), ref(SCALE_A)
    # diffusers' converted dict (`self_attn.to_q_lora.down`, `mlp.fc1.lora_linear_layer.down`) lost the alphas
    # (1 of rank 2) to a side dict: they go into the scale.
    lora, scale = (c["lora_a"], SCALE_A) if layout == "kohya" else (c["lora_a_old"], SCALE_A * 0.5)
    summary = merge_lora(model, lora, scale, part="text_encoder", source=layout)
    assert summary["layers"] == c["n_te"] == 6 * cfg.num_hidden_layers
    _check(f"CLIPTextModel {layout}", model(jnp.asarray(ids)).last_hidden_state, lora_ref, base_ref)
