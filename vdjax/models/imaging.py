"""Image conversions and resamplers shared by the encoders' preprocessing.

`to_rgb` makes grayscale and RGBA images RGB. The resamplers reproduce the PyTorch pipelines exactly, as per-axis
weight matrices applied with einsum.

`jax.image.resize` is a different resampler (it antialiases with its kernel and uses half-pixel centres), so the
preprocessing of models trained with torch/kornia resizing is reproduced here:
- `bicubic_align_corners`: torch's `F.interpolate(mode='bicubic', align_corners=True)` (A = -0.75, edge taps
  clamped, source coordinates computed in float32);
- `kornia_resize`: `kornia.geometry.resize(..., 'bicubic', align_corners=True, antialias=True)` — when shrinking
  along either axis, first a separable Gaussian blur (sigma = max((in/out - 1)/2, 0.001) per axis, kernel
  int(max(4 sigma, 3)) made odd, reflect padding), then the bicubic step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_A = -0.75


def to_rgb(images, *, batched: bool = False) -> jax.Array:
    """Channels-last image(s) -> RGB: C=1 grayscale replicated, C=4 RGBA's alpha dropped (as PIL's convert('RGB')),
    anything else refused. One image is (H, W, C) or (H, W); with `batched`, (N, H, W, C) — there a 3-D array would
    be ambiguous, so the channel axis is required."""
    x = jnp.asarray(images)
    if not batched and x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 + batched or x.shape[-1] not in (1, 3, 4):
        expected = ("(N, H, W, C) images with C = 1 (grayscale), 3 (RGB) or 4 (RGBA)" if batched else
                    "one (H, W, C) image with C = 1 (grayscale), 3 (RGB) or 4 (RGBA), or (H, W) grayscale")
        raise ValueError(f"expected channels-last {expected}; got shape {tuple(np.shape(images))}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x[..., :3]


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The four Keys-cubic tap weights for fractional offsets t (float32, as torch's kernel evaluates them)."""
    t = t.astype(np.float32)
    a = np.float32(_A)
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1).astype(np.float32)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch's align_corners=True bicubic interpolation along one axis."""
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    src = np.arange(out_size, dtype=np.float32) * scale
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size), np.float32)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), weights[:, tap])
    return m


def gaussian_matrix(size: int, sigma: float, kernel: int) -> np.ndarray:
    """(size, size) matrix of a normalised Gaussian blur along one axis with reflect padding (no edge repeat)."""
    x = np.arange(kernel, dtype=np.float32) - kernel // 2
    g = np.exp(-(x ** 2) / np.float32(2 * sigma ** 2)).astype(np.float32)
    g /= g.sum()
    m = np.zeros((size, size), np.float32)
    for i in range(size):
        for tap, w in zip(range(-(kernel // 2), kernel // 2 + 1), g):
            j = i + tap
            j = -j if j < 0 else (2 * (size - 1) - j if j >= size else j)  # reflect
            m[i, j] += w
    return m


def _apply(images: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """images (N, H, W, C); rows (H', H), cols (W', W) -> (N, H', W', C), float32 throughout."""
    x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(rows), images.astype(jnp.float32), precision="highest")
    return jnp.einsum("pw,nowc->nopc", jnp.asarray(cols), x, precision="highest")


def bicubic_align_corners(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    return _apply(images, bicubic_matrix(images.shape[1], size[0]), bicubic_matrix(images.shape[2], size[1]))


def kornia_resize(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(N, H, W, C) -> (N, size[0], size[1], C) as kornia's antialiased bicubic resize."""
    h, w = images.shape[1:3]
    if (h, w) == tuple(size):
        return images.astype(jnp.float32)
    if max(h / size[0], w / size[1]) > 1:  # kornia blurs (both axes) only when shrinking along some axis
        blur = []
        for n, out in ((h, size[0]), (w, size[1])):
            sigma = max((n / out - 1.0) / 2.0, 0.001)
            kernel = int(max(4.0 * sigma, 3))
            blur.append(gaussian_matrix(n, sigma, kernel + 1 - kernel % 2))
        images = _apply(images, *blur)
    return bicubic_align_corners(images, size)


# ---- colour matching (I2V-Adapter's post-processing) ---------------------------------------------------------
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.950456, 1.0, 1.088754])  # D65, as OpenCV


def _lab_f(t):
    return np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB (..., 3) -> float64 CIE L*a*b* (L in [0, 100]), D65 white, as OpenCV's float conversion."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    fx, fy, fz = np.moveaxis(_lab_f((linear @ _RGB_TO_XYZ.T) / _WHITE), -1, 0)
    return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float CIE L*a*b* (..., 3) -> uint8 sRGB (rounded, clipped)."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 0.206893, f ** 3, (f - 16 / 116) / 7.787) * _WHITE
    linear = np.clip(xyz @ np.linalg.inv(_RGB_TO_XYZ).T, 0, 1)
    c = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return np.clip(np.round(c * 255), 0, 255).astype(np.uint8)


def match_histogram(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """`source`'s values remapped so that their cumulative histogram follows `template`'s (same shape out)."""
    values, index, counts = np.unique(source.ravel(), return_inverse=True, return_counts=True)
    t_values, t_counts = np.unique(template.ravel(), return_counts=True)
    quantiles = np.cumsum(counts) / source.size
    t_quantiles = np.cumsum(t_counts) / template.size
    return np.interp(quantiles, t_quantiles, t_values)[index].reshape(source.shape)


def match_colors(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """uint8 frames (F, H, W, 3): each frame's a* and b* histograms matched to `reference`'s, its lightness kept
    (I2V-Adapter's post-processing; the released code runs it on 8-bit LAB of RGB data read as BGR — here the
    conversion is the correct RGB one). Values are quantised to the 8-bit LAB grid as in the released code."""
    ref = np.round(rgb_to_lab(reference))
    out = []
    for frame in frames:
        lab = np.round(rgb_to_lab(frame))
        for ch in (1, 2):
            lab[..., ch] = np.round(match_histogram(lab[..., ch], ref[..., ch]))
        out.append(lab_to_rgb(lab))
    return np.stack(out)
