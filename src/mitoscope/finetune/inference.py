"""Inference on resized uint8 images: probabilities, per-position maps, test-time augmentation.

Position ``(i, j)`` of the final feature map is reported as the cell ``image_size / map_size``
it covers, mapped back to the image as read (:func:`position_boxes`; the receptive field is
larger than the cell).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..augment import dihedral, invert_dihedral
from .network import FineTuneNetwork

# The 8 symmetries of the square used by test-time augmentation: (quarter turns, flip).
TTA_TRANSFORMS = tuple((k, flip) for flip in (False, True) for k in range(4))


@torch.inference_mode()
def forward_images(
    network: FineTuneNetwork,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    tta: bool = False,
    positions: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (B,) of (B, S, S, 3) uint8 images and, with ``positions``, (B, h, w) maps.

    Test-time augmentation averages the probabilities (and the maps, turned back) over the
    8 flips and quarter turns of the square.
    """
    # NHWC on CPU too: depthwise convolutions run much faster (and the same on every call).
    network.eval().to(memory_format=torch.channels_last)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    transforms = TTA_TRANSFORMS if tta else ((0, False),)
    proba_sum = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
    maps_sum = None
    for k, flip in transforms:
        view = dihedral(x, k, flip).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if positions:
                logits, maps = network.forward_positions(view)
            else:
                logits, maps = network(view), None
        proba_sum += torch.sigmoid(logits.double())
        if maps is not None:
            maps = invert_dihedral(maps.double(), k, flip)
            maps_sum = maps if maps_sum is None else maps_sum + maps
    proba = (proba_sum / len(transforms)).cpu().numpy()
    maps_out = None if maps_sum is None else (maps_sum / len(transforms)).cpu().numpy()
    return proba, maps_out


def predict_arrays(network: FineTuneNetwork, images: np.ndarray, indices: np.ndarray, mean: Sequence[float],
                   std: Sequence[float], device: torch.device, tta: bool, batch_size: int = 16) -> np.ndarray:
    """Probabilities of ``images[indices]`` in batches."""
    network.to(device)
    out = [forward_images(network, images[indices[i:i + batch_size]], mean, std, device, tta)[0]
           for i in range(0, len(indices), batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


def position_boxes(image_size: tuple[int, int], map_shape: tuple[int, int]) -> np.ndarray:
    """(h*w, 4) int64 ``[x0, y0, x1, y1]``: the cell of each feature-map position, row-major,
    in the coordinates of the image as read (cell = image size / map size); they tile the image."""
    height, width = image_size
    rows, cols = map_shape
    ys = np.round(np.arange(rows + 1) * height / rows).astype(np.int64)
    xs = np.round(np.arange(cols + 1) * width / cols).astype(np.int64)
    yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    return np.stack([xs[xx], ys[yy], xs[xx + 1], ys[yy + 1]], axis=1)
