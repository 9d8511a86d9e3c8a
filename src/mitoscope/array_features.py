"""Window features from an exported backbone with numpy alone: the CPU path, without PyTorch.

:class:`mitoscope.features.FeatureExtractor` hands its work here whenever its backbone runs in
OpenVINO or ONNX Runtime and windows need no resizing, and :mod:`mitoscope.inference` uses it
to predict without importing PyTorch (importing torch alone takes about 4 s on a 2-core CPU).
The arithmetic is PyTorch's: the same float32 normalisation, and a box average that gives
torchvision ``roi_align``'s numbers, its weights (:func:`box_sample_weights`) shared with
:func:`mitoscope.features.box_average`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .cache import ImageFeatures, extractor_fingerprint
from .errors import InputError
from .tiling import WindowGrid, crop_windows, make_grid, pad_to, validate_tiling

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
    ``samples`` points spread over each box, edges clamped (as roi_align's ``aligned=True``)."""
    offsets = (np.arange(samples, dtype=np.float32) + np.float32(0.5)) / np.float32(samples)
    points = np.clip(starts[:, None] + offsets * sizes[:, None], 0, length - 1)  # (N, S) index coordinates
    low = np.floor(points).astype(np.int64)
    high_weight = points - low
    weights = np.zeros((len(starts), length + 1), dtype=np.float64)
    rows = np.repeat(np.arange(len(starts)), samples)
    np.add.at(weights, (rows, low.ravel()), (1 - high_weight).ravel())
    np.add.at(weights, (rows, low.ravel() + 1), high_weight.ravel())  # past the edge only with weight 0
    return weights[:, :length] / samples


def box_sample_weights(boxes: np.ndarray, spatial_scale: float, height: int, width: int,
                       samples: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The separable weights of :func:`box_average`: ``(wy (N, height), wx (N, width))``, float64,
    so that box ``n``'s average of a (C, height, width) map is ``sum_yx wy[n, y] wx[n, x] map[:, y, x]``.

    Box ``n`` = ``[x0, y0, x1, y1]`` in input pixels; ``samples`` x ``samples`` bilinear samples are
    spread over it (``spatial_scale`` takes pixels to feature-map cells), edges clamped: torchvision
    ``roi_align(output_size=1, sampling_ratio=samples, aligned=True)``. This is the one place the
    weights are computed; :func:`mitoscope.features.box_average` applies them with PyTorch.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    starts = boxes[:, :2] * np.float32(spatial_scale) - np.float32(0.5)
    sizes = (boxes[:, 2:] - boxes[:, :2]) * np.float32(spatial_scale)
    return (_sample_weights(starts[:, 1], sizes[:, 1], height, samples),
            _sample_weights(starts[:, 0], sizes[:, 0], width, samples))


def box_weight_entries(weight_y: np.ndarray, weight_x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nonzero entries of the (N, height * width) matrix ``wy[n, y] * wx[n, x]`` (the weights of
    :func:`box_sample_weights` as one sparse matrix): ``(rows, columns, values)``, sorted by row then
    column, column = ``y * width + x``. A box touches few cells, so this has about
    ``N (samples + 1)^2`` entries where the dense matrix has ``N height width``."""
    width = weight_x.shape[1]
    box_y, ys = np.nonzero(weight_y)  # row-major: by box, then y
    box_x, xs = np.nonzero(weight_x)
    count_x = np.bincount(box_x, minlength=len(weight_x))
    first_x = np.cumsum(count_x) - count_x  # where each box's x entries start
    repeats = count_x[box_y]  # each (box, y) pairs with every x of its box
    rows = np.repeat(box_y, repeats)
    y_of = np.repeat(ys, repeats)
    within = np.arange(len(rows)) - np.repeat(np.cumsum(repeats) - repeats, repeats)
    x_entry = first_x[rows] + within
    values = np.repeat(weight_y[box_y, ys], repeats) * weight_x[box_x[x_entry], xs[x_entry]]
    return rows, y_of * width + xs[x_entry], values


def box_average(fmap: np.ndarray, boxes: np.ndarray, spatial_scale: float, samples: int = 4) -> np.ndarray:
    """(N, C) average of a (C, h, w) feature map over N boxes ``[x0, y0, x1, y1]`` (input pixels):
    the mean of ``samples`` x ``samples`` bilinear samples spread over each box, edges clamped,
    as :func:`mitoscope.features.box_average` (and torchvision ``roi_align(output_size=1,
    sampling_ratio=samples, aligned=True)``) compute it, with :func:`box_sample_weights`."""
    channels, height, width = fmap.shape
    weight_y, weight_x = box_sample_weights(boxes, spatial_scale, height, width, samples)
    positions_last = np.ascontiguousarray(np.moveaxis(fmap, 0, -1))  # (h, w, C): each box reads a small block
    out = np.empty((len(weight_y), channels), dtype=np.float32)
    for index in range(len(weight_y)):
        ys = np.flatnonzero(weight_y[index])
        xs = np.flatnonzero(weight_x[index])
        block = positions_last[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]  # (ny, nx, C)
        wy = weight_y[index, ys[0] : ys[-1] + 1].astype(np.float32)
        wx = weight_x[index, xs[0] : xs[-1] + 1].astype(np.float32)
        rows = wy @ block.reshape(len(wy), -1)  # (nx * C,): the rows weighted, then the columns
        out[index] = wx @ rows.reshape(len(wx), channels)
    return out


def embed_images(
    images: Sequence[np.ndarray],
    grids: Sequence[WindowGrid],
    mode: str,
    batch_size: int,
    embed_windows: Callable[[np.ndarray], np.ndarray],
    embed_fullconv: Callable[[np.ndarray, Sequence[np.ndarray]], list[np.ndarray]],
) -> list[np.ndarray]:
    """Each image's (N_i, D) window features, several images sharing backbone batches.

    The batching both extractors use (numpy here, PyTorch in :mod:`mitoscope.features`): in
    ``windows`` mode the windows of all ``images`` go to ``embed_windows`` ((N, w, w, 3) uint8
    -> (N, D), which runs them ``batch_size`` at a time); in ``fullconv`` mode images of the
    same padded size are stacked, up to ``batch_size`` windows' worth at a time (at least one
    image), into ``embed_fullconv`` ((B, H, W, 3) uint8 and the B images' window boxes -> B
    feature arrays). Many small images, e.g. single-cell crops of one window each, thus run as
    a few large batches instead of one forward each; every image gets the features it gets on
    its own, to float32 rounding.
    """
    if mode == "windows":
        counts = [grid.n_windows for grid in grids]
        windows = [crop_windows(image, grid) for image, grid in zip(images, grids)]
        crops = windows[0] if len(windows) == 1 else np.concatenate(windows)  # one large image: no copy
        return [np.ascontiguousarray(part) for part in np.split(embed_windows(crops), np.cumsum(counts)[:-1])]
    padded = [pad_to(image, *grid.padded_size) for image, grid in zip(images, grids)]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(padded):
        by_size.setdefault(image.shape, []).append(index)
    out: dict[int, np.ndarray] = {}
    for indices in by_size.values():
        step = max(1, batch_size // grids[indices[0]].n_windows)
        for start in range(0, len(indices), step):
            chunk = indices[start : start + step]
            stack = np.stack([padded[i] for i in chunk])
            for index, features in zip(chunk, embed_fullconv(stack, [grids[i].boxes() for i in chunk])):
                out[index] = features
    return [out[index] for index in range(len(images))]


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

    def embed_fullconv(self, padded: np.ndarray, boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One pass over a stack of (B, H, W, 3) images padded to one size; each window's vector
        is the average of the final feature map under its box, instead of re-computing
        overlapping windows."""
        fmap = np.asarray(self.runner.feature_map(normalise(padded, self.mean, self.std)))
        if fmap.ndim != 4:
            raise InputError(f"backbone {self.backbone_name} has no spatial feature map: use --extraction windows")
        stride = padded.shape[2] / fmap.shape[-1]
        return [box_average(fmap[i], image_boxes, 1.0 / stride).astype(np.float32, copy=False)
                for i, image_boxes in enumerate(boxes)]

    def embed_many(self, images: Sequence[np.ndarray], grids: Sequence[WindowGrid]) -> list[np.ndarray]:
        """Window features of several images on their grids, sharing batches (:func:`embed_images`)."""
        return embed_images(images, grids, self.mode, self.batch_size, self.embed_windows, self.embed_fullconv)

    def extract(self, image: np.ndarray, resize_to: tuple[int, int] | None = None) -> ImageFeatures:
        """Features of an image at its own size (resizing, ``resize_to``, is the PyTorch path's)."""
        return self.extract_many([image], resize_to)[0]

    def extract_many(self, images: Sequence[np.ndarray],
                     resize_to: tuple[int, int] | None = None) -> list[ImageFeatures]:
        """Features of several images, their windows sharing backbone batches; each image's are
        :meth:`extract`'s (to float32 rounding)."""
        for image in images:
            if resize_to is not None and tuple(resize_to) != tuple(image.shape[:2]):
                raise InputError(f"resizing {image.shape[1]}x{image.shape[0]} images to {resize_to[1]}x{resize_to[0]} "
                                 "runs in PyTorch (mitoscope.features.FeatureExtractor)")
        grids = [make_grid(image.shape[0], image.shape[1], self.window, self.overlap) for image in images]
        return [ImageFeatures(features=features, boxes=grid.boxes().astype(np.int64), grid_shape=grid.shape,
                              image_size=(image.shape[0], image.shape[1]))
                for image, grid, features in zip(images, grids, self.embed_many(images, grids))]
