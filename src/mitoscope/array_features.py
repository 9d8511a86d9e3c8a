"""Window features from an exported backbone with numpy alone: the CPU path, without PyTorch.

:class:`mitoscope.features.FeatureExtractor` hands its work here whenever its backbone runs in
OpenVINO or ONNX Runtime and windows need no resizing, and :mod:`mitoscope.inference` uses it
to predict without importing PyTorch (importing torch alone takes about 4 s on a 2-core CPU).
The arithmetic is PyTorch's: the same float32 normalisation, and a box average that gives
``grid_sample``'s (and so torchvision ``roi_align``'s) numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .cache import ImageFeatures, extractor_fingerprint
from .errors import InputError
from .tiling import crop_windows, make_grid, pad_to, validate_tiling

# windows: each window cropped and embedded on its own (the write-up's way, exact);
# fullconv: one pass over the whole image, window vectors pooled from the feature map (fast).
EXTRACTION_MODES = ("windows", "fullconv")


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 ``(x - 255 mean) / (255 std)``, as the
    PyTorch path computes it (float32 throughout, so the same bits). The channels are moved
    first while still uint8, so the float work runs on contiguous planes, in place."""
    shape = (3, 1, 1)
    mean255 = (np.asarray(mean, dtype=np.float32) * np.float32(255.0)).reshape(shape)
    std255 = (np.asarray(std, dtype=np.float32) * np.float32(255.0)).reshape(shape)
    out = np.ascontiguousarray(np.moveaxis(pixels, -1, -3)).astype(np.float32)
    out -= mean255
    out /= std255
    return out


def _sample_weights(starts: np.ndarray, sizes: np.ndarray, length: int, samples: int) -> np.ndarray:
    """(N, length): the average bilinear weight each feature-map row (or column) gets from
    ``samples`` points spread over each box, edges clamped (grid_sample's border padding)."""
    offsets = (np.arange(samples, dtype=np.float32) + np.float32(0.5)) / np.float32(samples)
    points = np.clip(starts[:, None] + offsets * sizes[:, None], 0, length - 1)  # (N, S) index coordinates
    low = np.floor(points).astype(np.int64)
    high_weight = points - low
    weights = np.zeros((len(starts), length + 1), dtype=np.float64)
    rows = np.repeat(np.arange(len(starts)), samples)
    np.add.at(weights, (rows, low.ravel()), (1 - high_weight).ravel())
    np.add.at(weights, (rows, low.ravel() + 1), high_weight.ravel())  # past the edge only with weight 0
    return weights[:, :length] / samples


def box_average(fmap: np.ndarray, boxes: np.ndarray, spatial_scale: float, samples: int = 4) -> np.ndarray:
    """(N, C) average of a (C, h, w) feature map over N boxes ``[x0, y0, x1, y1]`` (input pixels):
    the mean of ``samples`` x ``samples`` bilinear samples spread over each box, edges clamped,
    as :func:`mitoscope.features.box_average` (and torchvision ``roi_align(output_size=1,
    sampling_ratio=samples, aligned=True)``) compute it."""
    channels, height, width = fmap.shape
    boxes = np.asarray(boxes, dtype=np.float32)
    starts = boxes[:, :2] * np.float32(spatial_scale) - np.float32(0.5)
    sizes = (boxes[:, 2:] - boxes[:, :2]) * np.float32(spatial_scale)
    weight_x = _sample_weights(starts[:, 0], sizes[:, 0], width, samples)
    weight_y = _sample_weights(starts[:, 1], sizes[:, 1], height, samples)
    positions_last = np.ascontiguousarray(np.moveaxis(fmap, 0, -1))  # (h, w, C): each box reads a small block
    out = np.empty((len(boxes), channels), dtype=np.float32)
    for index in range(len(boxes)):
        ys = np.flatnonzero(weight_y[index])
        xs = np.flatnonzero(weight_x[index])
        block = positions_last[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]  # (ny, nx, C)
        wy = weight_y[index, ys[0] : ys[-1] + 1].astype(np.float32)
        wx = weight_x[index, xs[0] : xs[-1] + 1].astype(np.float32)
        rows = wy @ block.reshape(len(wy), -1)  # (nx * C,): the rows weighted, then the columns
        out[index] = wx @ rows.reshape(len(wx), channels)
    return out


class ArrayExtractor:
    """One feature vector per sliding window, from a runner that takes numpy arrays.

    ``runner`` is an exported engine (:class:`mitoscope.engines.OpenVinoRunner` or
    ``OnnxRunner``); windows are fed at their own size, so ``window`` must equal the
    backbone's ``input_size`` (other windows are resized by the PyTorch path). ``backbone_name``
    and ``weights_id`` make its :meth:`fingerprint`, the feature cache's key.
    """

    def __init__(self, runner: Any, window: int, overlap: float, input_size: int, mean: Sequence[float],
                 std: Sequence[float], batch_size: int = 32, mode: str = "windows", backbone_name: str = "backbone",
                 weights_id: str = "") -> None:
        validate_tiling(window, overlap)
        if mode not in EXTRACTION_MODES:
            raise InputError(f"unknown extraction mode {mode!r}: expected one of {', '.join(EXTRACTION_MODES)}")
        if int(window) != int(input_size):
            raise InputError(f"windows of {window} px need resizing to the backbone's {input_size} px, "
                             "which the PyTorch path does")
        self.runner = runner
        self.window = int(window)
        self.overlap = float(overlap)
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.batch_size = int(batch_size)
        self.mode = mode
        self.backbone_name = backbone_name
        self.weights_id = weights_id

    @property
    def engine(self) -> str:
        return self.runner.name

    def fingerprint(self) -> dict[str, Any]:
        return extractor_fingerprint(self.backbone_name, self.weights_id, self.input_size, self.window, self.overlap,
                                     self.mode, self.mean, self.std, getattr(self.runner, "precision", "f32"))

    def warm_up(self, image_size: tuple[int, int] | None) -> None:
        """Let the runner prepare (OpenVINO: compile) for images of ``image_size`` (None: unknown)."""
        warm_up = getattr(self.runner, "warm_up", None)
        if warm_up is None or (image_size is None and self.mode == "fullconv"):
            return
        if self.mode == "fullconv":
            height, width = (max(int(v), self.window) for v in image_size)
            warm_up((1, 3, height, width))
            return
        count = self.batch_size
        if image_size is not None:
            count = min(count, make_grid(int(image_size[0]), int(image_size[1]), self.window, self.overlap).n_windows)
        warm_up((count, 3, self.window, self.window))

    def embed_windows(self, windows: np.ndarray) -> np.ndarray:
        """(N, w, w, 3) uint8 -> (N, D) float32."""
        out = [np.asarray(self.runner.pooled(normalise(windows[start : start + self.batch_size], self.mean, self.std)))
               for start in range(0, len(windows), self.batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def embed_fullconv(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """One pass over the whole image; each window's vector is the average of the final
        feature map under it, instead of re-computing overlapping windows."""
        padded = pad_to(image, max(image.shape[0], self.window), max(image.shape[1], self.window))
        fmap = np.asarray(self.runner.feature_map(normalise(padded, self.mean, self.std)[None]))
        if fmap.ndim != 4:
            raise InputError(f"backbone {self.backbone_name} has no spatial feature map: use --extraction windows")
        stride = padded.shape[1] / fmap.shape[-1]
        return box_average(fmap[0], boxes, 1.0 / stride).astype(np.float32, copy=False)

    def embed(self, image: np.ndarray, grid: Any) -> np.ndarray:
        if self.mode == "fullconv":
            return self.embed_fullconv(image, grid.boxes())
        return self.embed_windows(crop_windows(image, grid))

    def extract(self, image: np.ndarray, resize_to: tuple[int, int] | None = None) -> ImageFeatures:
        """Features of an image at its own size (resizing, ``resize_to``, is the PyTorch path's)."""
        if resize_to is not None and tuple(resize_to) != tuple(image.shape[:2]):
            raise InputError(f"resizing {image.shape[1]}x{image.shape[0]} images to {resize_to[1]}x{resize_to[0]} "
                             "runs in PyTorch (mitoscope.features.FeatureExtractor)")
        grid = make_grid(image.shape[0], image.shape[1], self.window, self.overlap)
        return ImageFeatures(features=self.embed(image, grid), boxes=grid.boxes().astype(np.int64),
                             grid_shape=grid.shape, image_size=(image.shape[0], image.shape[1]))
