"""Which cell of each Mitosis image is the mitosis, from image labels: a linear model on few
features per cell (the default scorer of the cell model, and the start of the fine-tuning).

A network with millions of weights learns little from a maximum over 60-odd cells per image
and a hundred images: many directions of its features single out *some* cell of every Mitosis
image. Few features do not leave that freedom, so the first answer comes from a linear
multiple-instance model on few features per cell: the frozen network's features reduced to
their main components, and intensity statistics of the cell and its rim per channel (what
condensed DNA changes). Its best cell of each Mitosis image is that image's pseudo-positive.
Fine-tuning the network itself on a hundred images memorised the training cells (README,
Results), so this linear model is what the cell model scores with unless asked otherwise.
"""

from __future__ import annotations

import numpy as np

# Principal components of the frozen features the linear multiple-instance model sees.
COMPONENTS = 8
# Linear models from this many random starts, averaged (the multiple-instance fit is not convex).
RESTARTS = 5


def intensity_features(crops: np.ndarray, chunk: int = 512) -> np.ndarray:
    """(n, 6 x channels) log statistics of each crop's centre disc and rim: mean, spread, 90th
    percentile, maximum of the disc; mean and spread of the rim. ``chunk`` crops at a time, so
    that the float copy stays small whatever the number of cells (a slide's can be millions)."""
    size = crops.shape[1]
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    disc, ring = radius < size * 0.3, (radius >= size * 0.3) & (radius < size * 0.45)
    out = []
    for start in range(0, len(crops), chunk):
        pixels = np.asarray(crops[start:start + chunk]).astype(np.float32)
        inner, rim = pixels[:, disc], pixels[:, ring]
        stats = [inner.mean(1), inner.std(1), np.percentile(inner, 90, axis=1), inner.max(1), rim.mean(1), rim.std(1)]
        out.append(np.log1p(np.concatenate(stats, axis=1)))
    return np.concatenate(out) if out else np.zeros((0, 6 * crops.shape[-1]), dtype=np.float32)


class LinearInstanceHead:
    """A linear instance scorer on few features, trained from bag labels (multiple-instance).

    Features of a crop: the frozen network's pooled features reduced to ``components`` whitened
    principal components, and its :func:`intensity_features` (``stats``, computed once per crop by
    the caller); standardised, then one linear layer.
    Trained with max pooling over each bag plus every instance of a negative bag against 0, from
    ``restarts`` random starts whose weights are averaged.
    The learned state (``*_`` arrays) is plain numpy: it serves without PyTorch or scikit-learn.
    """

    def __init__(self, components: int = COMPONENTS, epochs: int = 60, negative_weight: float = 1.0,
                 seed: int = 0, restarts: int = RESTARTS) -> None:
        self.components = components
        self.restarts = restarts
        self.epochs = epochs
        self.negative_weight = negative_weight
        self.seed = seed

    def _features(self, cnn_features: np.ndarray, stats: np.ndarray) -> np.ndarray:
        reduced = (cnn_features - self.pca_mean_) @ self.pca_components_.T / self.pca_scale_
        raw = np.concatenate([reduced, stats], axis=1)
        return ((raw - self.mean_) / self.scale_).astype(np.float32)

    def fit(self, cnn_features: np.ndarray, stats: np.ndarray, offsets: np.ndarray,
            labels: np.ndarray) -> "LinearInstanceHead":
        """``cnn_features`` (n, d) and ``stats`` (n, k) (:func:`intensity_features`) of the n crops of
        every bag, one bag after the other (``offsets``, as :class:`~mitoscope.cells.training.Bags`)."""
        from sklearn.decomposition import PCA

        if len(cnn_features) != len(stats):
            raise ValueError(f"expected one row of intensity statistics per feature row, got {len(stats)} for "
                             f"{len(cnn_features)}")
        components = min(self.components, cnn_features.shape[1], max(1, len(cnn_features) - 1))
        pca = PCA(components, random_state=self.seed).fit(cnn_features)
        self.pca_mean_ = pca.mean_.astype(np.float64)
        self.pca_components_ = pca.components_.astype(np.float64)
        self.pca_scale_ = np.sqrt(np.maximum(pca.explained_variance_, 1e-12))
        reduced = (cnn_features - self.pca_mean_) @ self.pca_components_.T / self.pca_scale_
        raw = np.concatenate([reduced, stats], axis=1)
        self.mean_, self.scale_ = raw.mean(0), raw.std(0) + 1e-6
        x = ((raw - self.mean_) / self.scale_).astype(np.float32)
        # The average of linear models is the linear model of the averaged weights.
        fits = [_linear_mil(x, offsets, np.asarray(labels), self.seed * 1000 + start, self.epochs, self.negative_weight)
                for start in range(max(1, self.restarts))]
        self.weight_ = np.mean([w for w, _ in fits], axis=0)
        self.bias_ = float(np.mean([b for _, b in fits]))
        return self

    def decision_function(self, cnn_features: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """One logit per crop, from its features and :func:`intensity_features`."""
        if not len(stats):
            return np.zeros(0, dtype=np.float64)
        return self._features(cnn_features, stats).astype(np.float64) @ self.weight_ + self.bias_

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(getattr(self, name), dtype=np.float64) for name in ARRAYS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "LinearInstanceHead":
        missing = sorted(set(ARRAYS) - set(arrays))
        if missing:
            raise ValueError(f"expected the arrays {', '.join(ARRAYS)}; missing {', '.join(missing)}")
        head = cls()
        for name in ARRAYS:
            setattr(head, name, np.asarray(arrays[name], dtype=np.float64))
        head.bias_ = float(np.asarray(arrays["bias_"]).reshape(-1)[0])
        return head


ARRAYS = ("pca_mean_", "pca_components_", "pca_scale_", "mean_", "scale_", "weight_", "bias_")


def _linear_mil(x_np: np.ndarray, offsets: np.ndarray, labels: np.ndarray, seed: int, epochs: int,
                negative_weight: float) -> tuple[np.ndarray, float]:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(x_np)
    sizes = np.diff(offsets)
    usable = np.flatnonzero(sizes > 0)
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        bound = 1 / np.sqrt(x.shape[1])
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.zero_()
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for chosen in np.array_split(rng.permutation(usable), max(1, len(usable) // 8)):
            logits = head(torch.cat([x[offsets[i]:offsets[i + 1]] for i in chosen])).squeeze(-1)
            parts = torch.split(logits, sizes[chosen].tolist())
            bag = torch.stack([p.max() for p in parts])
            target = torch.from_numpy(labels[chosen].astype(np.float32))
            loss = F.binary_cross_entropy_with_logits(bag, target)
            negatives = [p for p, y in zip(parts, labels[chosen]) if y == 0]
            if negatives and negative_weight > 0:
                instances = torch.cat(negatives)
                loss = loss + negative_weight * F.binary_cross_entropy_with_logits(instances, torch.zeros_like(instances))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return head.weight.detach().double().numpy().reshape(-1), float(head.bias.detach())
