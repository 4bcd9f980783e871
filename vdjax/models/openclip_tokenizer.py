"""OpenCLIP's tokenizer (the one SD 2.x and VideoCrafter condition on), from the bundled BPE merges.

Text is cleaned (ftfy, HTML entities, whitespace, lower case), split by CLIP's word pattern, byte-pair encoded,
and framed as [start] + tokens + [end], padded with 0 to the context length. A longer prompt is cut and its last
token set to [end], with a warning.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import logging
from typing import Sequence

import numpy as np

START, END, PAD = 49406, 49407, 0
_NUM_MERGES = 49152 - 256 - 2  # the merges the released vocabulary uses (the file holds more)


@functools.lru_cache(maxsize=None)
def _byte_alphabet() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes map to themselves, the rest to 256 + n.

    The order matters: it is the vocabulary's order (printable bytes first, then the others).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


class OpenCLIPTokenizer:
    def __init__(self, merges_path: str | None = None, context_length: int = 77):
        import regex  # the `regex` module: \p{L} / \p{N} classes

        if merges_path is None:
            merges_path = importlib.resources.files("vdjax.assets") / "bpe_simple_vocab_16e6.txt.gz"
        with open(merges_path, "rb") as f:
            lines = gzip.decompress(f.read()).decode("utf-8").split("\n")[1: _NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        # Vocabulary order: single byte-characters, the same as word ends, the merges, then the two specials.
        symbols = list(_byte_alphabet().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.ids = {token: i for i, token in enumerate(vocab)}
        assert self.ids["<start_of_text>"] == START and self.ids["<end_of_text>"] == END
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.context_length = context_length
        self._pattern = regex.compile(
            r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {}

    @staticmethod
    def clean(text: str) -> str:
        import ftfy
        import regex

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start/end tokens."""
        alphabet = _byte_alphabet()
        ids = []
        for word in self._pattern.findall(self.clean(text)):
            ids += [self.ids[p] for p in self._bpe("".join(alphabet[b] for b in word.encode("utf-8")))]
        return ids

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts -> (N, context_length) int64 ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts given; pass a string or a non-empty list of strings ('' for unconditional)")
        out = np.full((len(prompts), self.context_length), PAD, np.int64)
        for row, prompt in enumerate(prompts):
            ids = [START] + self.encode(prompt) + [END]
            if len(ids) > self.context_length:
                logging.warning("prompt cut to %d tokens (it has %d): %.60r...", self.context_length, len(ids), prompt)
                ids = ids[: self.context_length]
                ids[-1] = END
            out[row, : len(ids)] = ids
        return out
