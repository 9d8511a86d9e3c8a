"""The README's picture of the napari plugin: an image and its `predict --geojson` file in napari.

    xvfb-run -a python docs/screenshot_napari.py IMAGE GEOJSON [--out docs/assets/napari_plugin.jpg]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from PIL import Image

warnings.filterwarnings("ignore", message=".*PyQt5.*")  # napari's toast about its Qt5 backend would cover the picture
import napari  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image", type=Path)
    parser.add_argument("geojson", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "napari_plugin.jpg")
    args = parser.parse_args()
    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "error"  # no toast over the picture
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.open(str(args.image))
    viewer.open(str(args.geojson), plugin="mitoscope")
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(shot).convert("RGB").save(args.out, quality=85)
    viewer.close()
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
