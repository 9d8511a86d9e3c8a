"""Tests for mitoscope.io: image decoding to 8-bit RGB, bad inputs, label layouts."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from mitoscope.errors import InputError
from mitoscope.io import (
    DEFAULT_MAX_PIXELS,
    ImageHeader,
    LabelledImages,
    ReadOptions,
    SourceProfile,
    find_images,
    load_labelled_images,
    parse_channels,
    read_header,
    read_image,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
FULL_RANGE = ReadOptions(percentiles=(0.0, 100.0))


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _rgb8(height: int = 17, width: int = 23) -> np.ndarray:
    return _rng().integers(0, 256, (height, width, 3), dtype=np.uint8)


def _stack16(channels: int = 3, height: int = 12, width: int = 9) -> np.ndarray:
    """Channels-first uint16 stack with distinct ranges per channel."""
    rng = _rng()
    return np.stack(
        [rng.integers(100 * (c + 1), 1000 * (c + 1) + 5000, (height, width)) for c in range(channels)]
    ).astype(np.uint16)


def _expected_scaled(channel: np.ndarray, low_pct: float = 0.0, high_pct: float = 100.0) -> np.ndarray:
    low, high = np.percentile(channel.astype(np.float64), [low_pct, high_pct])
    return np.rint(np.clip((channel - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG built by hand, so the header can claim any size whatever the data holds."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- 8-bit formats


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_8bit_rgb_is_kept_exactly(tmp_path, suffix):
    pixels = _rgb8()
    path = tmp_path / f"rgb{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, pixels, photometric="rgb")
    else:
        Image.fromarray(pixels).save(path)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (17, 23, 3)
    np.testing.assert_array_equal(image, pixels)


def test_grayscale_png_becomes_grey_rgb(tmp_path):
    grey = _rgb8()[:, :, 0]
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    image = read_image(tmp_path / "grey.png")
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], grey)


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.dstack([_rgb8(), np.full((17, 23), 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgba[:, :, :3])


def test_grey_alpha_png_becomes_grey(tmp_path):
    grey = _rgb8()[:, :, 1]
    Image.fromarray(np.dstack([grey, 255 - grey]), mode="LA").save(tmp_path / "la.png")
    image = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(image, np.dstack([grey] * 3))


def test_palette_png_becomes_rgb(tmp_path):
    palette = _rng().integers(0, 256, 256 * 3).astype(np.uint8)
    index = _rng().integers(0, 256, (10, 14)).astype(np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(palette.tolist())
    img.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), palette.reshape(256, 3)[index])


def test_one_bit_png_becomes_0_and_255(tmp_path):
    mask = _rng().random((9, 16)) > 0.5
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image = read_image(tmp_path / "mask.png")
    np.testing.assert_array_equal(image[:, :, 2], np.where(mask, 255, 0))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_is_decoded_close_to_source(tmp_path, mode):
    yy, xx = np.mgrid[0:64, 0:48]
    smooth = np.dstack([yy * 3, xx * 4, (yy + xx) * 2]).astype(np.uint8)
    source = smooth if mode == "RGB" else smooth[:, :, 0]
    Image.fromarray(source, mode=mode).save(tmp_path / "smooth.jpg", quality=95)
    image = read_image(tmp_path / "smooth.jpg")
    assert image.shape == (64, 48, 3)
    expected = smooth if mode == "RGB" else np.dstack([source] * 3)
    assert np.abs(image.astype(int) - expected).mean() < 3


def test_any_image_size(tmp_path):
    for height, width in [(1, 1), (1, 513), (300, 2)]:
        pixels = _rgb8(height, width)
        Image.fromarray(pixels).save(tmp_path / "x.png")
        np.testing.assert_array_equal(read_image(tmp_path / "x.png"), pixels)


# --------------------------------------------------------------------------- 16-bit and float


def test_16bit_png_ramp_maps_to_full_range(tmp_path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    image = read_image(tmp_path / "ramp16.png", FULL_RANGE)
    np.testing.assert_array_equal(image[:, :, 0], np.rint(ramp / 65535 * 255).astype(np.uint8))
    np.testing.assert_array_equal(image[:, :, 0], image[:, :, 2])


def test_16bit_ramp_default_percentiles_clip_tails(tmp_path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    tifffile.imwrite(tmp_path / "ramp16.tif", ramp)
    red = read_image(tmp_path / "ramp16.tif")[:, :, 0].ravel()
    values = ramp.ravel()
    # 0.5 % of a 0..65535 ramp is 327.675; 99.5 % is 65207.325
    assert (red[values <= 327] == 0).all() and red[values == 328] == 0 and red[values == 700] > 0
    assert (red[values >= 65208] == 255).all() and red[values == 65000] < 255
    assert (np.diff(red.astype(int)) >= 0).all()
    mid = 32768
    assert red[mid] == round((mid - 327.675) / (65207.325 - 327.675) * 255)


def test_channels_first_and_last_tiffs_read_identically(tmp_path):
    stack = _stack16()
    tifffile.imwrite(tmp_path / "cyx.tif", stack, photometric="minisblack", metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "qyx.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "iyx.tif", stack, photometric="minisblack", metadata=None)
    tifffile.imwrite(tmp_path / "imagej.tif", stack, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "ome.tif", stack, ome=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "syx.tif", stack, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "yxs.tif", np.moveaxis(stack, 0, -1), photometric="rgb")
    with tifffile.TiffFile(tmp_path / "yxs.tif") as tif:
        assert tif.series[0].axes == "YXS"
    with tifffile.TiffFile(tmp_path / "iyx.tif") as tif:
        assert tif.series[0].axes == "IYX"
    expected = np.dstack([_expected_scaled(c, 0.5, 99.5) for c in stack])
    for name in ["cyx", "qyx", "iyx", "imagej", "ome", "syx", "yxs"]:
        np.testing.assert_array_equal(read_image(tmp_path / f"{name}.tif"), expected, err_msg=name)


def test_channels_option_reorders(tmp_path):
    stack = _stack16()
    tifffile.imwrite(tmp_path / "cyx.tif", stack, photometric="minisblack", metadata={"axes": "CYX"})
    default = read_image(tmp_path / "cyx.tif", FULL_RANGE)
    reordered = read_image(tmp_path / "cyx.tif", ReadOptions(channels=(1, 0, 2), percentiles=(0, 100)))
    np.testing.assert_array_equal(reordered, default[:, :, [1, 0, 2]])
    np.testing.assert_array_equal(reordered[:, :, 0], _expected_scaled(stack[1]))
    repeated = read_image(tmp_path / "cyx.tif", ReadOptions(channels=(2, 2, 2), percentiles=(0, 100)))
    np.testing.assert_array_equal(repeated, default[:, :, [2, 2, 2]])


def test_channels_option_on_8bit_rgb(tmp_path):
    pixels = _rgb8()
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png", ReadOptions(channels=(2, 1, 0)))
    np.testing.assert_array_equal(image, pixels[:, :, ::-1])


def test_two_channels_fill_blue_with_zeros(tmp_path):
    stack = _stack16(channels=2)
    tifffile.imwrite(tmp_path / "two.tif", stack, photometric="minisblack", metadata={"axes": "CYX"})
    image = read_image(tmp_path / "two.tif", FULL_RANGE)
    np.testing.assert_array_equal(image[:, :, 0], _expected_scaled(stack[0]))
    np.testing.assert_array_equal(image[:, :, 1], _expected_scaled(stack[1]))
    assert (image[:, :, 2] == 0).all()


def test_rgba_tiff_drops_alpha(tmp_path):
    rgba = np.dstack([_rgb8(), np.full((17, 23), 9, np.uint8)])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif"), rgba[:, :, :3])


def test_many_channels_need_channels_option(tmp_path):
    stack = _stack16(channels=6)
    path = tmp_path / "six.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "CYX"})
    with pytest.raises(InputError, match=r"six\.tif.*6 channels.*--channels"):
        read_image(path)
    image = read_image(path, ReadOptions(channels=(5, 3, 0), percentiles=(0, 100)))
    np.testing.assert_array_equal(image[:, :, 0], _expected_scaled(stack[5]))
    np.testing.assert_array_equal(image[:, :, 2], _expected_scaled(stack[0]))


@pytest.mark.parametrize("kind", ["tif", "png"])
def test_channel_index_out_of_range_names_file_and_count(tmp_path, kind):
    path = tmp_path / f"cell.{kind}"
    if kind == "tif":
        tifffile.imwrite(path, _stack16(), photometric="minisblack", metadata={"axes": "CYX"})
        count = "3 channels"
    else:
        Image.fromarray(_rgb8()[:, :, 0]).save(path)
        count = "1 channel"
    with pytest.raises(InputError, match=rf"cell\.{kind}: channel index 3 is out of range.*has {count}"):
        read_image(path, ReadOptions(channels=(0, 3, 0)))


def test_float_tiff_scaled_with_nan_and_constant_channel(tmp_path):
    data = _rng().normal(0, 1, (3, 20, 30)).astype(np.float32)
    data[1] = 4.25  # constant channel
    data[0, 0, 0] = np.nan
    tifffile.imwrite(tmp_path / "float.tif", data, photometric="minisblack", metadata={"axes": "CYX"})
    image = read_image(tmp_path / "float.tif", FULL_RANGE)
    assert image[0, 0, 0] == 0
    finite = data[0][np.isfinite(data[0])]
    expected = np.rint(np.clip((data[0] - finite.min()) / (finite.max() - finite.min()), 0, 1) * 255)
    np.testing.assert_array_equal(image[1:, :, 0], expected[1:].astype(np.uint8))
    assert (image[:, :, 1] == 0).all()
    np.testing.assert_array_equal(image[:, :, 2], _expected_scaled(data[2]))


def test_int16_tiff_is_scaled(tmp_path):
    data = _rng().integers(-3000, 3000, (15, 15)).astype(np.int16)
    tifffile.imwrite(tmp_path / "int16.tif", data)
    np.testing.assert_array_equal(read_image(tmp_path / "int16.tif", FULL_RANGE)[:, :, 1], _expected_scaled(data))


def test_palette_tiff_becomes_rgb(tmp_path):
    colormap = _rng().integers(0, 256, (3, 256)).astype(np.uint16) * 257
    index = _rng().integers(0, 256, (8, 11)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "palette.tif", index, photometric="palette", colormap=colormap)
    expected = np.moveaxis(colormap // 257, 0, -1)[index].astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "palette.tif"), expected)


def test_min_is_white_tiff_is_inverted(tmp_path):
    grey = _rgb8()[:, :, 0]
    tifffile.imwrite(tmp_path / "white.tif", grey, photometric="miniswhite")
    np.testing.assert_array_equal(read_image(tmp_path / "white.tif")[:, :, 0], 255 - grey)


def test_bilevel_tiff_becomes_0_and_255(tmp_path):
    mask = _rng().random((9, 16)) > 0.5
    tifffile.imwrite(tmp_path / "black.tif", mask, photometric="minisblack")
    np.testing.assert_array_equal(read_image(tmp_path / "black.tif")[:, :, 0], np.where(mask, 255, 0))
    # tifffile's default for bool data is min-is-white: set bits are black, as Pillow shows them
    tifffile.imwrite(tmp_path / "white.tif", mask)
    image = read_image(tmp_path / "white.tif")
    np.testing.assert_array_equal(image[:, :, 0], np.where(mask, 0, 255))
    np.testing.assert_array_equal(image[:, :, 0], np.asarray(Image.open(tmp_path / "white.tif").convert("L")))


def test_tiff_is_recognised_by_content_not_suffix(tmp_path):
    stack = _stack16()
    tifffile.imwrite(tmp_path / "stack.png", stack, photometric="minisblack", metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "stack.png", FULL_RANGE)[:, :, 0], _expected_scaled(stack[0]))


# --------------------------------------------------------------------------- TIFF layouts refused


def test_z_stack_tiff_is_refused(tmp_path):
    path = tmp_path / "zstack.tif"
    tifffile.imwrite(path, _stack16(channels=4), photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(InputError, match=r"zstack\.tif.*4 Z-slices"):
        read_image(path)


def test_time_series_of_channel_stacks_is_refused(tmp_path):
    path = tmp_path / "tcyx.tif"
    data = np.zeros((2, 3, 8, 8), np.uint16)
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(InputError, match=r"tcyx\.tif.*2 time points"):
        read_image(path)


def test_multipage_rgb_tiff_is_refused(tmp_path):
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match=r"pages\.tif.*several pages of multi-channel"):
        read_image(path)


def test_tiff_with_separate_images_is_refused(tmp_path):
    path = tmp_path / "two_images.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(np.zeros((8, 8), np.uint8))
        writer.write(np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"two_images\.tif.*2 separate images"):
        read_image(path)


@pytest.mark.parametrize("dtype", [np.complex64, np.uint64])
def test_unsupported_dtype(tmp_path, dtype):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.ones((8, 8), dtype=dtype))
    with pytest.raises(InputError, match=rf"odd\.tif.*unsupported pixel type {np.dtype(dtype).name}"):
        read_image(path)


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.png: file does not exist"):
        read_image(tmp_path / "nothere.png")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.png: file is empty"):
        read_image(tmp_path / "empty.png")


def test_text_renamed_png(tmp_path):
    (tmp_path / "notes.png").write_text("label,mitosis\nthis is not an image\n")
    with pytest.raises(InputError, match=r"notes\.png: not an image file"):
        read_image(tmp_path / "notes.png")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    Image.fromarray(_rgb8(120, 160)).save(full)
    cut = tmp_path / f"cut{suffix}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"cut\{suffix}: cannot decode image.*truncated"):
        read_image(cut)


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_tiff(tmp_path, compression, fraction):
    # Cutting a 3-page file loses pages; tifffile would fall back to fewer pages.
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, _stack16(height=64, width=64), photometric="minisblack", compression=compression)
    cut = tmp_path / "cut.tif"
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputError, match=r"cut\.tif: cannot read TIFF.*truncated"):
        read_image(cut)


def test_tiff_header_only(tmp_path):
    (tmp_path / "stub.tif").write_bytes(b"II*\x00\x08\x00")
    with pytest.raises(InputError, match=r"stub\.tif: cannot read TIFF"):
        read_image(tmp_path / "stub.tif")


def test_png_over_pixel_limit_refused_from_header(tmp_path):
    # The header claims 30000 x 30000 pixels; the data holds a few bytes, so only a
    # header check can give the size error (decoding would fail as truncated).
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(30000, 30000, 8, 0, b"\x00" * 10))
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match=r"bomb\.png: image is over the limit of 250,000,000 pixels"):
        read_image(path)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit != DEFAULT_MAX_PIXELS  # Pillow's own limit restored


def test_pixel_limit_is_configurable(tmp_path):
    Image.fromarray(_rgb8(20, 30)).save(tmp_path / "small.png")
    tifffile.imwrite(tmp_path / "small.tif", _rgb8(20, 30), photometric="rgb")
    for name in ["small.png", "small.tif"]:
        with pytest.raises(InputError, match=rf"{name}.*over the limit of 599 pixels"):
            read_image(tmp_path / name, ReadOptions(max_pixels=599))
        assert read_image(tmp_path / name, ReadOptions(max_pixels=600)).shape == (20, 30, 3)


def test_our_limit_replaces_pillows_lower_default(tmp_path):
    # 15000 x 13000 = 195 M pixels: over twice Pillow's default limit (Pillow would raise
    # DecompressionBombError) but under ours, so reading proceeds to decoding, which fails
    # because the 1-bit data is cut short.
    path = tmp_path / "large.png"
    path.write_bytes(_png_bytes(15000, 13000, 1, 0, b"\x00" * 10))
    with pytest.raises(InputError, match=r"large\.png: cannot decode image"):
        read_image(path)


def test_tiff_over_pixel_limit_refused_from_header(tmp_path):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), metadata=None)
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(30000)
        tif.pages[0].tags["ImageLength"].overwrite(30000)
    assert path.stat().st_size < 1000
    with pytest.raises(InputError, match=r"huge\.tif: image is 30000x30000 = 900,000,000 pixels"):
        read_image(path)


def test_animated_gif_is_refused(tmp_path):
    frames = [Image.fromarray(_rgb8()[:, :, 0] // (k + 1)) for k in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match=r"anim\.gif.*3 frames"):
        read_image(tmp_path / "anim.gif")


# --------------------------------------------------------------------------- headers and source profiles


def _header_cases(tmp_path: Path) -> list[tuple[Path, int, int, ReadOptions]]:
    """(file, source channels, bits per sample, options) for every layout the reading rule knows."""
    rgb, stack = _rgb8(), _stack16()
    cases = []

    def pillow(name: str, image: Image.Image, channels: int, bits: int) -> None:
        image.save(tmp_path / name)
        cases.append((tmp_path / name, channels, bits, ReadOptions()))

    def tiff(name: str, data: np.ndarray, channels: int, bits: int, options: ReadOptions = ReadOptions(),
             **kwargs) -> None:
        tifffile.imwrite(tmp_path / name, data, **kwargs)
        cases.append((tmp_path / name, channels, bits, options))

    pillow("rgb.png", Image.fromarray(rgb), 3, 8)
    pillow("rgb.jpg", Image.fromarray(rgb), 3, 8)
    pillow("rgba.png", Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])), 4, 8)
    pillow("grey.png", Image.fromarray(rgb[:, :, 0]), 1, 8)
    pillow("grey_alpha.png", Image.fromarray(rgb[:, :, :2].copy(), mode="LA"), 1, 8)
    pillow("palette.png", Image.fromarray(rgb).convert("P"), 3, 8)
    pillow("bilevel.png", Image.fromarray(rgb[:, :, 0] > 128), 1, 1)
    pillow("grey16.png", Image.fromarray(stack[0]), 1, 16)
    tiff("cyx16.tif", stack, 3, 16, photometric="minisblack", metadata={"axes": "CYX"})
    tiff("yxs16.tif", np.moveaxis(stack, 0, -1), 3, 16, photometric="rgb")
    tiff("five.tif", _stack16(5), 5, 16, ReadOptions(channels=(4, 0, 2)), photometric="minisblack",
         metadata={"axes": "CYX"})
    tiff("float.tif", stack[:2].astype(np.float32), 2, 32, photometric="minisblack", metadata={"axes": "CYX"})
    tiff("palette.tif", rgb[:, :, 0] // 32, 3, 8, photometric="palette",
         colormap=_rng().integers(0, 65536, (3, 256)).astype(np.uint16))
    tiff("mask.tif", rgb[:, :, 0] > 100, 1, 1, photometric="minisblack")
    return cases


def test_the_header_tells_the_channels_and_bit_depth_the_reading_rule_sees(tmp_path, monkeypatch):
    seen: dict[Path, tuple[int, bool]] = {}
    from mitoscope.io import images as io_module  # where read_image and read_header decide

    decode = io_module._to_rgb8

    def spy(pixels, is_8bit, options, path):  # the channels and 8-bit-ness read_image decides on
        seen[path] = (pixels.shape[2], is_8bit)
        return decode(pixels, is_8bit, options, path)

    monkeypatch.setattr(io_module, "_to_rgb8", spy)
    for path, channels, bits, options in _header_cases(tmp_path):
        header = read_header(path, options)
        image = read_image(path, options)
        assert header == ImageHeader(path, image.shape[0], image.shape[1], channels, bits), path.name
        assert seen[path] == (channels, not header.scaled), path.name


def test_the_header_is_read_without_decoding_and_refuses_what_read_image_refuses(tmp_path):
    raw = tmp_path / "whole.png"
    Image.fromarray(_rgb8(64, 64)).save(raw)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(raw.read_bytes()[:200])
    assert read_header(truncated) == ImageHeader(truncated, 64, 64, 3, 8)  # only decoding finds it out
    with pytest.raises(InputError, match="truncated"):
        read_image(truncated)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not pixels")
    tifffile.imwrite(tmp_path / "five.tif", _stack16(5), photometric="minisblack", metadata={"axes": "CYX"})
    for name, message in [("missing.png", "does not exist"), ("empty.png", "file is empty"),
                          ("text.png", "not an image file"), ("five.tif", "5 channels; choose three")]:
        with pytest.raises(InputError, match=message):
            read_header(tmp_path / name)
    with pytest.raises(InputError, match=r"whole\.png: image is .*over the limit of 4,095 pixels"):
        read_header(raw, ReadOptions(max_pixels=4095))


def test_a_source_profile_refuses_other_channel_counts_and_warns_across_the_8_bit_line(tmp_path):
    profile = SourceProfile.of([ImageHeader(Path("a.png"), 9, 9, 3, 8), ImageHeader(Path("b.png"), 9, 9, 4, 8)])
    assert profile == SourceProfile(bit_depths=(8,), channel_counts=(3, 4), n_images=2)
    assert SourceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    assert SourceProfile.from_dict(None) is None  # a model saved before profiles were recorded

    assert profile.check(ImageHeader(Path("same.png"), 5, 5, 3, 8)) == ""
    assert profile.check(ImageHeader(Path("bilevel.png"), 5, 5, 4, 1)) == ""  # kept as is, as 8-bit data
    with pytest.raises(InputError, match=r"grey\.png: image has 1 channel\(s\), the model was trained on images of "
                                         r"3 or 4 channel\(s\).*--channels r,g,b \(indices 0\.\.0\)"):
        profile.check(ImageHeader(Path("grey.png"), 5, 5, 1, 8))
    assert profile.check(ImageHeader(Path("grey.png"), 5, 5, 1, 8), channels_chosen=True) == ""
    deep = profile.check(ImageHeader(Path("deep.tif"), 5, 5, 3, 16))
    assert deep.startswith("16-bit image, the model was trained on 8-bit images: percentile scaling")

    scaled = SourceProfile(bit_depths=(16, 32), channel_counts=(3,), n_images=4)
    assert scaled.check(ImageHeader(Path("float.tif"), 5, 5, 3, 32)) == ""
    shallow = scaled.check(ImageHeader(Path("rgb.png"), 5, 5, 3, 8))
    assert shallow.startswith("8-bit image, the model was trained on 16-bit and 32-bit images: its values are used")
    assert SourceProfile(bit_depths=(8, 16), channel_counts=(3,), n_images=2).check(ImageHeader(
        Path("x.tif"), 5, 5, 3, 16)) == ""


# --------------------------------------------------------------------------- options


def test_read_options_round_trip_through_json():
    options = ReadOptions(channels=(1, 0, 2), percentiles=(1, 99), max_pixels=1000)
    restored = ReadOptions.from_dict(json.loads(json.dumps(options.to_dict())))
    assert restored == options and restored.channels == (1, 0, 2) and restored.percentiles == (1.0, 99.0)
    assert ReadOptions.from_dict({}) == ReadOptions()
    assert ReadOptions().to_dict() == {"channels": None, "percentiles": [0.5, 99.5], "max_pixels": 250_000_000}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels": (1, 0)}, "three non-negative"),
        ({"channels": (1, -1, 0)}, "three non-negative"),
        ({"channels": (1.5, 0, 2)}, "three non-negative"),
        ({"percentiles": (50, 10)}, "low < high"),
        ({"percentiles": (-1, 99)}, "low < high"),
        ({"max_pixels": 0}, "positive integer"),
    ],
)
def test_read_options_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        ReadOptions(**kwargs)


def test_read_options_from_dict_rejects_unknown_keys():
    with pytest.raises(InputError, match="unknown reading option.*'gamma'"):
        ReadOptions.from_dict({"gamma": 2})


def test_parse_channels():
    assert parse_channels("1,0,2") == (1, 0, 2)
    assert parse_channels(" 2, 2 ,0 ") == (2, 2, 0)
    for bad in ["1,0", "1,0,2,3", "a,b,c", "1,-1,0", ""]:
        with pytest.raises(InputError, match="three comma-separated"):
            parse_channels(bad)


# --------------------------------------------------------------------------- find_images


def test_find_images_files_and_folders(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for name in ["b.png", "a.TIF", "c.jpeg", "notes.txt", ".hidden.png"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.png").write_bytes(b"x")
    single = tmp_path / "single.bmp"
    single.write_bytes(b"x")
    found = find_images([single, folder, folder / "b.png"])
    assert found == [single, folder / "a.TIF", folder / "b.png", folder / "c.jpeg"]
    assert find_images(str(folder)) == found[1:]


def test_find_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(InputError, match=r"empty: folder contains no images"):
        find_images([tmp_path / "empty"])
    with pytest.raises(InputError, match=r"missing\.png: no such file"):
        find_images([tmp_path / "missing.png"])
    with pytest.raises(InputError, match="no images given"):
        find_images([])


# --------------------------------------------------------------------------- labels


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def _touch_images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")


def test_competition_csv_as_written_by_compose_scenes(tmp_path):
    # compose_scenes.py writes bare file names in labels.csv and the files in images/.
    _touch_images(tmp_path / "images", ["s0.png", "s1.png", "s2.png"])
    labels = _write_csv(
        tmp_path / "labels.csv", [["Image", "Label"], ["s0.png", "Mitosis"], ["s1.png", "Normal"], ["s2.png", "Mitosis"]]
    )
    data = load_labelled_images(tmp_path, labels)
    assert isinstance(data, LabelledImages) and len(data) == 3
    assert data.paths == [tmp_path / "images" / n for n in ["s0.png", "s1.png", "s2.png"]]
    assert data.labels == ["Mitosis", "Normal", "Mitosis"]
    assert data.classes == ("Normal", "Mitosis")
    np.testing.assert_array_equal(data.y, [1, 0, 1])
    assert data.groups is None
    # the same file found from a relative CSV name inside data_dir
    assert load_labelled_images(tmp_path, "labels.csv").paths == data.paths


def test_competition_csv_with_paths_relative_to_data_dir(tmp_path):
    _touch_images(tmp_path, ["images/a.tif", "other/b.tif"])
    labels = _write_csv(tmp_path / "l.csv", [["image", "LABEL"], ["images/a.tif", "Normal"], ["other/b.tif", "Mitosis"]])
    data = load_labelled_images(tmp_path, labels)
    assert data.paths == [tmp_path / "images" / "a.tif", tmp_path / "other" / "b.tif"]


def test_generic_csv_with_extra_columns_and_groups(tmp_path):
    _touch_images(tmp_path, ["x/1.png", "x/2.png", "y/3.png", "y/4.png"])
    labels = _write_csv(
        tmp_path / "labels.csv",
        [
            ["Path", "Label", "phase", "Slide"],
            ["x/1.png", "no_mitosis", "G1", "s1"],
            ["x/2.png", "mitosis", "Anaphase", "s1"],
            ["y/3.png", "no_mitosis", "S", "s2"],
            ["y/4.png", "mitosis", "Prophase", "s3"],
        ],
    )
    data = load_labelled_images(tmp_path, labels)
    assert data.classes == ("no_mitosis", "mitosis")
    np.testing.assert_array_equal(data.y, [0, 1, 0, 1])
    assert data.groups == ["s1", "s1", "s2", "s3"]


def test_group_column_is_preferred_to_slide(tmp_path):
    _touch_images(tmp_path, ["1.png", "2.png"])
    labels = _write_csv(
        tmp_path / "labels.csv",
        [["path", "label", "slide", "group"], ["1.png", "mitosis", "s1", "g1"], ["2.png", "normal", "s2", "g2"]],
    )
    assert load_labelled_images(tmp_path, labels).groups == ["g1", "g2"]


def test_csv_with_byte_order_mark(tmp_path):
    _touch_images(tmp_path, ["1.png", "2.png"])
    (tmp_path / "labels.csv").write_text("\ufeffImage,Label\n1.png,Mitosis\n2.png,Normal\n", encoding="utf-8")
    assert load_labelled_images(tmp_path, tmp_path / "labels.csv").classes == ("Normal", "Mitosis")


def test_class_folders(tmp_path):
    _touch_images(tmp_path, ["Normal/b.png", "Normal/a.jpg", "Mitosis/c.tif", "Normal/readme.txt"])
    (tmp_path / "empty_folder").mkdir()
    data = load_labelled_images(tmp_path)
    assert data.classes == ("Normal", "Mitosis")
    assert data.paths == [tmp_path / "Mitosis" / "c.tif", tmp_path / "Normal" / "a.jpg", tmp_path / "Normal" / "b.png"]
    assert data.labels == ["Mitosis", "Normal", "Normal"]
    np.testing.assert_array_equal(data.y, [1, 0, 0])


def test_class_folders_need_exactly_two_and_hint_at_csv(tmp_path):
    _touch_images(tmp_path, ["images/a.png", "images/b.png"])
    _write_csv(tmp_path / "labels.csv", [["Image", "Label"]])
    with pytest.raises(InputError, match=r"exactly two class sub-folders.*found 1 \('images'\).*--labels .*labels\.csv"):
        load_labelled_images(tmp_path)


def test_positive_rules(tmp_path):
    _touch_images(tmp_path, ["1.png", "2.png"])
    upper = _write_csv(tmp_path / "upper.csv", [["path", "label"], ["1.png", "MITOSIS"], ["2.png", "interphase"]])
    assert load_labelled_images(tmp_path, upper).classes == ("interphase", "MITOSIS")

    other = _write_csv(tmp_path / "other.csv", [["path", "label"], ["1.png", "atypical"], ["2.png", "normal"]])
    with pytest.raises(InputError, match=r"other\.csv: cannot tell which class is positive.*--positive.*'atypical', 'normal'"):
        load_labelled_images(tmp_path, other)
    data = load_labelled_images(tmp_path, other, positive="atypical")
    assert data.classes == ("normal", "atypical")
    np.testing.assert_array_equal(data.y, [1, 0])
    # the positive class may be named in another case; the CSV's own word is kept
    assert load_labelled_images(tmp_path, other, positive="Normal").classes == ("atypical", "normal")
    # a positive that overrides the 'mitosis' default
    assert load_labelled_images(tmp_path, upper, positive="interphase").classes == ("MITOSIS", "interphase")
    with pytest.raises(InputError, match=r"other\.csv: positive class 'tumour' is not one of.*'atypical', 'normal'"):
        load_labelled_images(tmp_path, other, positive="tumour")


def test_not_mitosis_in_words_is_not_positive(tmp_path):
    _touch_images(tmp_path, ["1.png", "2.png"])
    labels = _write_csv(tmp_path / "l.csv", [["path", "label"], ["1.png", "no mitosis"], ["2.png", "mitosis "]])
    assert load_labelled_images(tmp_path, labels).classes == ("no mitosis", "mitosis")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["file", "class", "extra"], ["1.png", "Mitosis"]], r"expected columns 'path,label' or 'Image,Label'; found 'file', 'class', 'extra'"),
        ([["Image", "Label"], ["1.png", "Mitosis"], ["2.png", "Mitosis"]], r"exactly two classes; found 1 \('Mitosis'\)"),
        (
            [["Image", "Label"], ["1.png", "Mitosis"], ["2.png", "Normal"], ["3.png", "Unsure"]],
            r"exactly two classes; found 3 \('Mitosis', 'Normal', 'Unsure'\)",
        ),
        ([["Image", "Label"], ["1.png", "Mitosis"], ["2.png", "Normal"], ["./1.png", "Normal"]], r"line 4 lists './1.png' again \(already on line 2\)"),
        ([["Image", "Label"], ["1.png", "Mitosis"], ["2.png", ""]], r"line 3 has an empty 'Label'"),
        ([["Image", "Label"], ["1.png", "Mitosis"], ["2.png"]], r"line 3 has 1 fields; expected 2"),
        ([["Image", "Label"]], r"header but no rows"),
    ],
)
def test_bad_csv(tmp_path, rows, message):
    _touch_images(tmp_path, ["1.png", "2.png", "3.png"])
    labels = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(InputError, match=r"bad\.csv: .*" + message):
        load_labelled_images(tmp_path, labels)


def test_empty_csv_file(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.csv: labels file is empty"):
        load_labelled_images(tmp_path, tmp_path / "empty.csv")


def test_csv_with_missing_images_lists_first_few(tmp_path):
    _touch_images(tmp_path, ["ok.png"])
    rows = [["path", "label"], ["ok.png", "mitosis"]] + [[f"gone{k}.png", "normal"] for k in range(5)]
    labels = _write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(InputError) as info:
        load_labelled_images(tmp_path, labels)
    message = str(info.value)
    assert "labels.csv: 5 listed image(s) not found" in message
    assert "line 3: 'gone0.png'" in message and "line 5: 'gone2.png'" in message and "and 2 more" in message
    assert "gone3.png" not in message and "\n" not in message


def test_missing_csv_and_data_dir(tmp_path):
    with pytest.raises(InputError, match=r"nope\.csv: labels file does not exist"):
        load_labelled_images(tmp_path, tmp_path / "nope.csv")
    with pytest.raises(InputError, match=r"nodir: data folder does not exist"):
        load_labelled_images(tmp_path / "nodir")


# --------------------------------------------------------------------------- real data


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.mark.realdata
def test_real_jurkat_cell():
    cells = _need(DATA / "jurkat-cells" / "cells")
    path = sorted(cells.glob("*.tif"))[0]
    raw = tifffile.imread(path)
    assert raw.shape == (3, 40, 40) and raw.dtype == np.uint16
    image = read_image(path)
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    for channel in range(3):
        out, source = image[:, :, channel].ravel(), raw[channel].ravel()
        order = np.argsort(source, kind="stable")
        assert (np.diff(out[order].astype(int)) >= 0).all()  # scaling keeps the order of values
        assert out.min() == 0 and out.max() == 255
    dna_first = read_image(path, ReadOptions(channels=(1, 0, 2)))
    np.testing.assert_array_equal(dna_first, image[:, :, [1, 0, 2]])


@pytest.mark.realdata
def test_real_he_labels_with_groups():
    root = _need(DATA / "he-mitotic-figures")
    with open(root / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with pytest.raises(InputError, match="--positive"):
        load_labelled_images(root, root / "labels.csv")
    data = load_labelled_images(root, root / "labels.csv", positive="atypical")
    assert len(data) == len(rows)
    assert data.classes == ("normal", "atypical")
    assert int(data.y.sum()) == sum(row["label"] == "atypical" for row in rows)
    assert data.groups == [row["slide"] for row in rows]
    assert data.paths[0] == root / rows[0]["path"]
    image = read_image(data.paths[0])
    np.testing.assert_array_equal(image, np.asarray(Image.open(data.paths[0]).convert("RGB")))


@pytest.mark.realdata
def test_real_jurkat_labels_default_positive():
    root = _need(DATA / "jurkat-cells")
    data = load_labelled_images(root, root / "labels.csv")
    assert data.classes == ("no_mitosis", "mitosis")
    assert data.groups is None
    assert len(data) == len(data.labels) == len(data.y)
    assert all(label == ("mitosis" if y else "no_mitosis") for label, y in zip(data.labels, data.y))


@pytest.mark.realdata
@pytest.mark.slow
def test_real_compose_scenes_output_loads_directly(tmp_path):
    tool = _need(SHARED / "tools" / "compose_scenes.py")
    cells = _need(DATA / "jurkat-cells")
    out = tmp_path / "scenes"
    subprocess.run(
        [sys.executable, str(tool), str(cells), str(out), "--n", "4", "--size", "200x160",
         "--cells", "3,5", "--format", "tiff16", "--seed", "3"],
        check=True, capture_output=True,
    )
    data = load_labelled_images(out, out / "labels.csv")
    assert data.classes == ("Normal", "Mitosis") and len(data) == 4
    assert all(path.parent == out / "images" for path in data.paths)
    image = read_image(data.paths[0])
    assert image.shape == (160, 200, 3) and image.dtype == np.uint8
