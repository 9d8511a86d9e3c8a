"""Reading images and image-level labels (``from mitoscope.io import X``).

- :mod:`.images`: :func:`read_image`, the one rule by which every file becomes an (H, W, 3)
  uint8 array (its docstring states it), and :func:`read_header`, what that rule starts from,
  from the header alone;
- :mod:`.reading`: :class:`ReadOptions` (channels, percentiles, pixel limit),
  :func:`parse_channels`, :class:`ImageHeader` and the checks every decoder runs;
- :mod:`.decode`: TIFF (tifffile) and every other format (Pillow) into pixels as stored;
- :mod:`.source_profile`: :class:`SourceProfile`, the bit depths and channel counts a model
  was trained on, and the check of new images against it;
- :mod:`.labels`: :func:`find_images` (for prediction) and :func:`load_labelled_images`
  (a CSV, the competition's ``Image,Label`` or a generic ``path,label``, or one sub-folder
  per class);
- :mod:`.tables`: :func:`read_csv_table`, the CSV reading shared by the labels and the true
  cell boxes (:func:`mitoscope.localization.load_boxes`).
"""

from __future__ import annotations

from .images import read_header, read_image
from .labels import IMAGE_SUFFIXES, LabelledImages, find_images, load_labelled_images, locate_labels, present_images
from .reading import DEFAULT_MAX_PIXELS, DEFAULT_PERCENTILES, ImageHeader, ReadOptions, parse_channels
from .source_profile import SourceProfile
from .tables import CsvTable, read_csv_table

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_PERCENTILES",
    "IMAGE_SUFFIXES",
    "present_images",
    "CsvTable",
    "ImageHeader",
    "LabelledImages",
    "ReadOptions",
    "SourceProfile",
    "find_images",
    "load_labelled_images",
    "locate_labels",
    "parse_channels",
    "read_csv_table",
    "read_header",
    "read_image",
]
