"""What a model was trained on (:class:`SourceProfile`: the bit depths and channel counts of its
training images, from their headers) and the check of new images against it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .images import read_header
from .reading import ImageHeader, ReadOptions


@dataclass(frozen=True)
class SourceProfile:
    """The kinds of image file a model was trained on: their bit depths and channel counts.

    ``train`` and ``finetune`` record it in ``model.json`` (``source_images``) from the
    training images' headers; ``predict`` and ``evaluate`` check every image against it
    with :meth:`check`.
    """

    bit_depths: tuple[int, ...]
    channel_counts: tuple[int, ...]
    n_images: int

    @classmethod
    def of(cls, headers: Iterable[ImageHeader]) -> SourceProfile:
        headers = list(headers)
        return cls(tuple(sorted({h.bit_depth for h in headers})), tuple(sorted({h.channels for h in headers})),
                   len(headers))

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike[str]], options: ReadOptions | None = None) -> SourceProfile:
        """The profile of image files, from their headers (see :func:`read_header`)."""
        return cls.of(read_header(path, options) for path in paths)

    def to_dict(self) -> dict[str, Any]:
        return {"bit_depths": list(self.bit_depths), "channel_counts": list(self.channel_counts),
                "n_images": self.n_images}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SourceProfile | None:
        """The profile :meth:`to_dict` wrote; None for a model saved before profiles were recorded."""
        if data is None:
            return None
        try:
            return cls(tuple(int(v) for v in data["bit_depths"]), tuple(int(v) for v in data["channel_counts"]),
                       int(data.get("n_images", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"source image profile: expected bit_depths and channel_counts lists, got {data!r}") from err

    def check(self, header: ImageHeader, channels_chosen: bool = False) -> str:
        """Refuse, or warn about, an image unlike every training image; return the warning ("" if none).

        - A channel count never seen at training is refused (InputError): its R, G and B
          would come from other data than the model learnt from. ``channels_chosen`` (the
          prediction was given its own ``--channels``) accepts it: that choice says which of
          its channels are R, G, B.
        - An image on the other side of the 8-bit line gets a warning: 8-bit data is used as
          it is, deeper data is scaled per channel from its percentiles, so the same scene
          reaches the model with other intensities than at training.
        """
        if not channels_chosen and header.channels not in self.channel_counts:
            seen = " or ".join(str(n) for n in self.channel_counts)
            raise InputError(
                f"{header.path}: image has {header.channels} channel(s), the model was trained on images of {seen} "
                f"channel(s); convert it, or choose its R, G, B channels with --channels r,g,b "
                f"(indices 0..{header.channels - 1})"
            )
        trained_scaled = {depth > 8 for depth in self.bit_depths}
        if header.scaled in trained_scaled:
            return ""
        depths = " and ".join(f"{depth}-bit" for depth in self.bit_depths)
        how = ("percentile scaling gives it other intensities than the training images"
               if header.scaled else "its values are used as they are, the training images were percentile-scaled")
        return (f"{header.bit_depth}-bit image, the model was trained on {depths} images: {how}; "
                f"convert it to the training format for a reliable answer")
