"""Preprocessing helpers: grayscale and RGBA are converted, wrong shapes are refused with what is expected."""
from __future__ import annotations

import numpy as np
import pytest

from vdjax.models.clip import clip_preprocess
from vdjax.models.imaging import to_rgb
from vdjax.models.openclip import videocrafter_preprocess


def test_grayscale_and_rgba_become_rgb():
    rgb = np.random.default_rng(0).uniform(-1, 1, (2, 20, 30, 3)).astype(np.float32)
    gray = rgb[..., :1]
    np.testing.assert_array_equal(to_rgb(gray, batched=True), np.repeat(gray, 3, -1))
    np.testing.assert_array_equal(to_rgb(gray[0, ..., 0]), np.repeat(gray[0], 3, -1))
    rgba = np.concatenate([rgb, np.ones_like(gray)], -1)
    np.testing.assert_array_equal(videocrafter_preprocess(rgba), videocrafter_preprocess(rgb))
    assert videocrafter_preprocess(gray).shape == (2, 224, 224, 3)
    assert clip_preprocess(rgba[0] * 0.5 + 0.5).shape == (224, 224, 3)


@pytest.mark.parametrize("shape", [(20, 30, 2), (20, 30, 5), (1, 2, 20, 30, 3)])
def test_other_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="RGBA"):
        videocrafter_preprocess(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="RGBA"):
        clip_preprocess(np.zeros(shape, np.float32))
