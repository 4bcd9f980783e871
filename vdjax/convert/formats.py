"""Which checkpoint layout a state dict is in, told from its keys alone."""
from __future__ import annotations

import re
from typing import Iterable

# name -> what it is; the order of `detect`'s checks matters (more specific first).
READABLE = {
    "videocrafter": "VideoCrafter1/2 model.ckpt (LVDM 3-D UNet with temporal transformers, init_attn, temopral_conv, "
                    "fps_embedding; I2V: embedder.* OpenCLIP image tower, image_proj_model.* resampler)",
    "ldm_sd1": "original LDM single file, SD 1.x (model.diffusion_model.*, first_stage_model.*, "
               "cond_stage_model.transformer.*) — also community DreamBooth/fine-tuned files",
    "ldm_sd2": "original LDM single file, SD 2.x (cond_stage_model.model.* OpenCLIP text encoder)",
    "ldm_vae": "original LDM VAE file (encoder.down.*, decoder.up.*), e.g. vae-ft-mse-840000-ema-pruned.ckpt",
    "ip_adapter": "IP-Adapter (ip-adapter_sd15 / ip-adapter-plus_sd15 .safetensors or .bin: image_proj.*, "
                  "ip_adapter.<idx>.to_k_ip/to_v_ip)",
    "i2v_adapter_unet": "I2V-Adapter UNet3D state dict (animatediff_v15_v1_ipplus.pth: diffusers-named spatial UNet, "
                        "AnimateDiff motion modules, IP-Adapter attn2.to_k_ip/to_v_ip)",
    "i2v_adapter_module": "I2V-Adapter first-frame attention (i2v_module.pth: attn1.to_q_ff / attn1.to_out_ff)",
    "animatediff_motion": "AnimateDiff motion module (mm_sd_v15.ckpt, mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt)",
    "diffusers_motion_adapter": "diffusers MotionAdapter (down_blocks.*.motion_modules.*)",
    "diffusers_unet": "diffusers UNet2DConditionModel / UNetMotionModel",
    "diffusers_vae": "diffusers AutoencoderKL",
    "hf_clip_text": "transformers CLIPTextModel",
    "hf_clip_vision": "transformers CLIPVisionModelWithProjection",
    "kohya_lora": "kohya/sd-scripts LoRA (lora_unet_*, lora_te_*)",
    "peft_lora": "diffusers/PEFT LoRA (*.lora_A.weight / *.lora_B.weight)",
}
# Recognised, but built by later work: the error says so instead of "unknown".
NOT_YET = {
    "sdxl": (r"^(conditioner\.embedders\.|model\.diffusion_model\.label_emb\.|add_embedding\.)",
             "no issue: SDXL is not a vdjax family"),
}


# openaimodel3d's own keys: a temporal transformer in slot 2 (SD has none there: its input blocks stop at 1, its
# output blocks' slot 2 is the upsampler, its middle block's the second ResBlock), init_attn, the temporal convs
# (spelled so upstream), fps_embedding, relative-position tables; and the I2V image branch.
VIDEOCRAFTER = (r"^model\.diffusion_model\.((input_blocks\.\d+|output_blocks\.\d+|middle_block)\.2\."
                r"transformer_blocks\.|init_attn\.|fps_embedding\.|.*\.temopral_conv\.|.*\.relative_position_[kv]\.)|"
                r"^image_proj_model\.|^embedder\.model\.visual\.")


class UnknownFormatError(ValueError):
    pass


def detect(keys: Iterable[str], source: str = "checkpoint") -> str:
    keys = list(keys)
    has = lambda pattern: any(re.search(pattern, k) for k in keys)
    for name, (pattern, where) in NOT_YET.items():
        if has(pattern):
            raise UnknownFormatError(f"{source} looks like a {name} checkpoint, which vdjax does not read yet: "
                                     f"{where}.")
    if has(r"^lora_(unet|te)\d?_"):
        return "kohya_lora"
    if has(r"\.lora_[AB]\.weight$|\.lora\.(up|down)\.weight$|_lora\.(up|down)\.weight$"):
        return "peft_lora"
    if has(VIDEOCRAFTER):
        return "videocrafter"
    if has(r"^(image_proj\.|ip_adapter\.\d+\.to_[kv]_ip\.)"):
        return "ip_adapter"
    if has(r"^model\.diffusion_model\."):
        return "ldm_sd2" if has(r"^cond_stage_model\.model\.") else "ldm_sd1"
    if has(r"motion_modules\.\d+\.temporal_transformer\."):
        # A whole UNet3D (spatial keys or IP-Adapter projections beside the motion modules) is I2V-Adapter's.
        return ("i2v_adapter_unet" if has(r"\.attn2\.to_[kv]_ip\.weight$|^down_blocks\.\d+\.resnets\.")
                else "animatediff_motion")
    if has(r"\.attn1\.(to_q_ff|to_out_ff)\."):
        return "i2v_adapter_module"
    if has(r"motion_modules\.\d+\.") and not has(r"\.resnets\.\d+\."):
        return "diffusers_motion_adapter"
    if has(r"^(first_stage_model\.)?encoder\.down\.\d+\.block\."):
        return "ldm_vae"
    if has(r"^encoder\.down_blocks\.") and has(r"^decoder\.up_blocks\."):
        return "diffusers_vae"
    if has(r"^down_blocks\.\d+\.resnets\.") and has(r"^time_embedding\."):
        return "diffusers_unet"
    if has(r"^(text_model\.)?encoder\.layers\.\d+\.self_attn\.") and has(r"(^|\.)embeddings\.token_embedding\."):
        return "hf_clip_text"
    if has(r"^(vision_model\.)?embeddings\.patch_embedding\."):
        return "hf_clip_vision"
    sample = ", ".join(keys[:5])
    raise UnknownFormatError(
        f"{source}: unknown checkpoint layout (first keys: {sample}). vdjax reads:\n  - " +
        "\n  - ".join(f"{k}: {v}" for k, v in READABLE.items()))
