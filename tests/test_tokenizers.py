"""Tokenisers: OpenCLIP's (bundled merges) and transformers' CLIPTokenizer from a local folder."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from vdjax.models.clip_tokenizer import load_tokenizer, tokenize, write_tokenizer_folder
from vdjax.models.openclip_tokenizer import END, PAD, START, OpenCLIPTokenizer

PROMPTS = ["a photo of a cat sitting on a windowsill", "A Corgi RUNNING on the beach, at sunset!! It's 4K & HDR.",
           "café crème brûlée — naïve résumé 😀 x2", ""]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return load_tokenizer(write_tokenizer_folder(str(tmp_path_factory.mktemp("tokenizer"))))


def test_hf_and_openclip_tokenizers_agree_on_the_bpe(hf_tokenizer):
    """Same vocabulary, same byte-pair encoding; only the padding differs (HF: end token, OpenCLIP: 0)."""
    ours, hf = OpenCLIPTokenizer()(PROMPTS), tokenize(hf_tokenizer, PROMPTS)
    for a, b in zip(ours, hf):
        n = int(np.argmax(a == END)) + 1
        np.testing.assert_array_equal(a[:n], b[:n])
        assert (a[n:] == PAD).all() and (b[n:] == END).all()


@pytest.mark.parametrize("make", ["openclip", "hf"])
def test_long_prompts_are_cut_with_a_warning(make, hf_tokenizer, caplog):
    long = "a very long prompt " * 40
    with caplog.at_level(logging.WARNING):
        ids = OpenCLIPTokenizer()([long]) if make == "openclip" else tokenize(hf_tokenizer, [long])
    assert ids.shape == (1, 77) and ids[0, 0] == START and ids[0, -1] == END
    assert "prompt cut to 77 tokens" in caplog.text


@pytest.mark.parametrize("make", ["openclip", "hf"])
def test_an_empty_prompt_list_is_refused(make, hf_tokenizer):
    with pytest.raises(ValueError, match="no prompts given"):
        OpenCLIPTokenizer()([]) if make == "openclip" else tokenize(hf_tokenizer, [])


def test_a_folder_without_tokenizer_files_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json, merges.txt missing"):
        load_tokenizer(str(tmp_path))
