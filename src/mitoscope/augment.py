"""Training-time augmentation for microscopy, as batched torch ops on the training device.

Microscopy has no "up": every image may be flipped and turned by 90 degrees. Cells vary a
little in apparent size between scanners and magnifications (small scale jitter), and
illumination varies between fields (brightness and contrast). H&E histology also varies in
staining between labs and batches; :func:`stain_jitter` perturbs each image in the
haematoxylin-eosin-DAB (HED) colour space (Tellez et al. 2018) with the colour
deconvolution of scikit-image (``skimage.color.rgb2hed``/``hed2rgb``) written in torch so
that it runs batched on the GPU. Stain jitter makes no sense for fluorescence images
(their channels are dyes, not absorbing stains): switch it off there.

Everything works on float images in [0, 1] of shape (B, 3, H, W); the random draws of a
batch come from a ``torch.Generator`` so that a seed gives the same augmentation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed

from .errors import InputError

__all__ = ["AugmentConfig", "augment_batch", "dihedral", "hed_to_rgb", "invert_dihedral", "rgb_to_hed", "stain_jitter"]

# skimage's colour deconvolution clips at 1e-6 before the log; the same constant keeps the
# torch version equal to skimage's.
_LOG_EPS = math.log(1e-6)


@dataclass(frozen=True)
class AugmentConfig:
    """What the training augmentation does; stored in the model's ``model.json``.

    Parameters
    ----------
    flips, rot90 : bool
        Random horizontal/vertical flips and quarter turns.
    scale : float
        Zoom factor drawn in ``[1 - scale, 1 + scale]`` (reflection at the borders); 0 = off.
    brightness : float
        Added intensity drawn in ``[-brightness, brightness]`` (images are in [0, 1]).
    contrast : float
        Contrast factor drawn in ``[1 - contrast, 1 + contrast]`` around each image's mean.
    stain_jitter : bool
        H&E stain jitter in HED space (histology only).
    stain_sigma, stain_bias : float
        Each HED channel becomes ``s * a + b`` with ``a`` in ``[1 - sigma, 1 + sigma]`` and
        ``b`` in ``[-bias, bias]``.
    """

    flips: bool = True
    rot90: bool = True
    scale: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1
    stain_jitter: bool = True
    stain_sigma: float = 0.05
    stain_bias: float = 0.005

    def __post_init__(self) -> None:
        for name in ("scale", "brightness", "contrast", "stain_sigma", "stain_bias"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise InputError(f"augmentation {name} must be a number in [0, 1), got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AugmentConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown augmentation setting(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(data))


def _matrix(matrix: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(matrix, dtype=like.dtype, device=like.device)


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HED stain densities, as ``skimage.color.rgb2hed``."""
    optical = torch.log(rgb.clamp_min(1e-6)) / _LOG_EPS
    stains = torch.einsum("bchw,cd->bdhw", optical, _matrix(hed_from_rgb, rgb))
    return stains.clamp_min(0.0)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """HED stain densities -> (B, 3, H, W) RGB in [0, 1], as ``skimage.color.hed2rgb``."""
    log_rgb = torch.einsum("bchw,cd->bdhw", hed * _LOG_EPS, _matrix(rgb_from_hed, hed))
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def stain_jitter(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale (``alpha``) and shift (``beta``), both (B, 3), each image's HED channels."""
    hed = rgb_to_hed(images)
    hed = hed * alpha[:, :, None, None] + beta[:, :, None, None]
    return hed_to_rgb(hed)


def dihedral(images: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """One of the 8 symmetries of the square: ``k`` quarter turns after an optional left-right flip."""
    out = images.flip(-1) if flip else images
    return torch.rot90(out, k, dims=(-2, -1)) if k % 4 else out


def invert_dihedral(maps: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Undo :func:`dihedral` on (..., h, w) maps (e.g. attention over feature-map positions)."""
    out = torch.rot90(maps, -k, dims=(-2, -1)) if k % 4 else maps
    return out.flip(-1) if flip else out


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a (B, 3, H, W) float batch in [0, 1]; random draws come from ``generator`` (CPU).

    Geometric changes first (flips, quarter turns, zoom), then colour (stain, brightness,
    contrast); the result is clipped to [0, 1].
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"augment_batch expects a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    batch = images.shape[0]
    device = images.device
    out = images
    # Draws are made for every option, used or not, so that switching one option off does
    # not change the draws of the others for the same seed.
    flip_lr = torch.rand(batch, generator=generator) < 0.5
    flip_ud = torch.rand(batch, generator=generator) < 0.5
    turns = torch.randint(0, 4, (batch,), generator=generator)
    zoom = _uniform(generator, (batch,), 1.0 - config.scale, 1.0 + config.scale)
    alpha = _uniform(generator, (batch, 3), 1.0 - config.stain_sigma, 1.0 + config.stain_sigma)
    beta = _uniform(generator, (batch, 3), -config.stain_bias, config.stain_bias)
    shift = _uniform(generator, (batch,), -config.brightness, config.brightness)
    gain = _uniform(generator, (batch,), 1.0 - config.contrast, 1.0 + config.contrast)

    if config.flips:
        out = torch.where(flip_lr.to(device)[:, None, None, None], out.flip(-1), out)
        out = torch.where(flip_ud.to(device)[:, None, None, None], out.flip(-2), out)
    if config.rot90 and out.shape[-1] == out.shape[-2]:
        turned = out.clone()
        for k in (1, 2, 3):
            chosen = (turns == k).nonzero().flatten().to(device)
            if chosen.numel():
                turned[chosen] = torch.rot90(out[chosen], k, dims=(-2, -1))
        out = turned
    if config.scale > 0:
        # A zoom about the centre: grid coordinates divided by the zoom factor.
        theta = torch.zeros(batch, 2, 3, dtype=out.dtype, device=device)
        theta[:, 0, 0] = theta[:, 1, 1] = (1.0 / zoom).to(device=device, dtype=out.dtype)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if config.stain_jitter:
        out = stain_jitter(out, alpha.to(device=device, dtype=out.dtype), beta.to(device=device, dtype=out.dtype))
    if config.contrast > 0 or config.brightness > 0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        gain_, shift_ = (v.to(device=device, dtype=out.dtype)[:, None, None, None] for v in (gain, shift))
        out = (out - mean) * gain_ + mean + shift_
    return out.clamp(0.0, 1.0)
