"""Which cell of each Mitosis image is the mitosis: a first answer from image labels, to start
the fine-tuning from.

A network with millions of weights learns little from a maximum over 60-odd cells per image
and a hundred images: many directions of its features single out *some* cell of every Mitosis
image. Few features do not leave that freedom, so the first answer comes from a linear
multiple-instance model on few features per cell: the frozen network's features reduced to
their main components, and intensity statistics of the cell and its rim per channel (what
condensed DNA changes). Its best cell of each Mitosis image is that image's pseudo-positive.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Principal components of the frozen features the linear multiple-instance model sees.
COMPONENTS = 32


def intensity_features(crops: np.ndarray) -> np.ndarray:
    """(n, 6 x channels) log statistics of each crop's centre disc and rim: mean, spread, 90th
    percentile, maximum of the disc; mean and spread of the rim."""
    pixels = crops.astype(np.float32)
    size = crops.shape[1]
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    inner = pixels[:, radius < size * 0.3]
    rim = pixels[:, (radius >= size * 0.3) & (radius < size * 0.45)]
    stats = [inner.mean(1), inner.std(1), np.percentile(inner, 90, axis=1), inner.max(1), rim.mean(1), rim.std(1)]
    return np.log1p(np.concatenate(stats, axis=1))


def linear_mil_scores(features: np.ndarray, offsets: np.ndarray, labels: np.ndarray, seed: int = 0,
                      epochs: int = 60, negative_weight: float = 1.0) -> np.ndarray:
    """Scores of every instance from a linear model trained on bag labels: max pooling over each
    bag, plus every instance of a negative bag against 0."""
    import torch
    import torch.nn.functional as F

    mean, spread = features.mean(0), features.std(0) + 1e-6
    x = torch.from_numpy(((features - mean) / spread).astype(np.float32))
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
    with torch.no_grad():
        return head(x).squeeze(-1).numpy()


def pseudo_positives(cnn_features: np.ndarray, crops: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                     seed: int = 0) -> dict[str, Any]:
    """The best instance of each positive bag under the linear model on few features:
    ``{"index": global instance indices, "scores": every instance's score}``."""
    from sklearn.decomposition import PCA

    components = min(COMPONENTS, cnn_features.shape[1], max(1, len(cnn_features) - 1))
    reduced = PCA(components, whiten=True, random_state=seed).fit_transform(cnn_features)
    scores = linear_mil_scores(np.concatenate([reduced, intensity_features(crops)], axis=1), offsets, labels, seed)
    best = [int(offsets[i] + np.argmax(scores[offsets[i]:offsets[i + 1]]))
            for i in range(len(labels)) if labels[i] == 1 and offsets[i + 1] > offsets[i]]
    return {"index": np.asarray(best, dtype=np.int64), "scores": scores}
