"""Tokenising for Hugging Face-layout CLIP text encoders (SD 1.x) with transformers' `CLIPTokenizer`.

`load_tokenizer(folder)` reads a snapshot's `tokenizer/` folder (vocab.json + merges.txt) without the network;
`write_tokenizer_folder(folder)` writes one from the BPE merges bundled with vdjax (the same vocabulary as
openai/clip-vit-large-patch14), so that a fresh machine can tokenise offline.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np

from vdjax.models.openclip_tokenizer import OpenCLIPTokenizer, _byte_alphabet


def write_tokenizer_folder(folder: str, model_max_length: int = 77) -> str:
    """Write vocab.json, merges.txt and the tokenizer config of CLIP's BPE tokenizer into `folder`."""
    base = OpenCLIPTokenizer()
    vocab = {token: i for token, i in base.ids.items()}
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(base.ranks, key=base.ranks.get)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": model_max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True}, f)
    assert len(_byte_alphabet()) == 256
    return folder


def load_tokenizer(folder: str):
    """transformers' CLIPTokenizer from a local folder (a snapshot's `tokenizer/`), never from the hub."""
    from transformers import CLIPTokenizer

    missing = [f for f in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder: {', '.join(missing)} missing. Point to a "
                                "Hugging Face snapshot's tokenizer/ folder, or write one with "
                                "vdjax.models.clip_tokenizer.write_tokenizer_folder.")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer, prompts: str | Sequence[str], length: int = 77) -> np.ndarray:
    """Prompts -> (N, length) int64 ids, padded to `length`; a longer prompt is cut (with a warning)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompts given; pass a string or a non-empty list of strings ('' for unconditional)")
    for prompt in prompts:
        n = len(tokenizer(prompt).input_ids)
        if n > length:
            logging.warning("prompt cut to %d tokens (it has %d): %.60r...", length, n, prompt)
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True).input_ids
    return np.asarray(ids, np.int64)
