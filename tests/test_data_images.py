"""Decoding images of every kind to RGB, with a note per conversion, and refusing unusable files."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resfit.data.images import DEFAULT_MAX_PIXELS, check_image, open_rgb
from resfit.errors import ImageReadError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def noisy_jpeg(path: Path, size=(64, 48), seed=0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height: a decompression bomb as far as the header goes."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def two_colour_jpeg(path: Path, orientation: int | None) -> Path:
    """40x20: left half red, right half blue, optionally tagged with an EXIF orientation."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = image.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif)
    return path


def close_to(pixel, expected, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def decode_both(path: Path) -> tuple[Image.Image, list[str]]:
    """open_rgb's result, after checking that check_image predicts the same notes and size."""
    image, notes = open_rgb(path)
    check = check_image(path)
    assert check.ok and check.reason is None
    assert list(check.notes) == notes
    assert (check.width, check.height) == image.size
    assert image.mode == "RGB"
    return image, notes


def test_plain_rgb_jpeg_has_no_notes(tmp_path):
    image, notes = decode_both(noisy_jpeg(tmp_path / "a.jpg"))
    assert notes == []
    assert image.size == (64, 48)


@pytest.mark.parametrize(
    ("orientation", "top_left", "bottom_right", "size", "words"),
    [
        # 6: the camera was turned clockwise; displaying means rotating 90° clockwise, so left goes on top.
        (6, RED, BLUE, (20, 40), "rotated 90° clockwise"),
        (8, BLUE, RED, (20, 40), "rotated 90° counter-clockwise"),
        (3, BLUE, RED, (40, 20), "rotated 180°"),
        (2, BLUE, RED, (40, 20), "mirrored left-right"),
    ],
)
def test_exif_orientation_is_applied_and_noted(tmp_path, orientation, top_left, bottom_right, size, words):
    image, notes = decode_both(two_colour_jpeg(tmp_path / "phone.jpg", orientation))
    assert image.size == size
    assert close_to(image.getpixel((2, 2)), top_left)
    assert close_to(image.getpixel((size[0] - 3, size[1] - 3)), bottom_right)
    assert notes == [f"EXIF orientation {orientation} applied ({words})"]


def test_exif_orientation_1_means_unchanged(tmp_path):
    image, notes = decode_both(two_colour_jpeg(tmp_path / "upright.jpg", 1))
    assert image.size == (40, 20) and notes == []
    assert close_to(image.getpixel((2, 2)), RED)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, "JPEG", quality=95)
    image, notes = decode_both(path)
    assert notes == ["CMYK converted to RGB"]
    assert close_to(image.getpixel((8, 8)), RED)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    image, notes = decode_both(path)
    assert notes == ["16-bit (I;16) scaled to 8-bit RGB"]
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(image)[0, 2].tolist() == [128, 128, 128]


def test_16_bit_big_endian_tiff(tmp_path):
    path = tmp_path / "deep.tif"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=">u2")).save(path)
    mode = Image.open(path).mode
    image, notes = decode_both(path)
    assert notes == [f"16-bit ({mode}) scaled to 8-bit RGB"]
    assert np.asarray(image)[0, :, 1].tolist() == [0, 128, 255]


def test_32_bit_float_and_int_images_use_their_value_range(tmp_path):
    floats = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(floats)
    image, notes = decode_both(floats)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 128, 255]
    assert notes == ["32-bit float (F) values in [0, 1] scaled to 8-bit RGB"]

    ints = tmp_path / "int.tif"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)).save(ints)
    image, notes = decode_both(ints)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 128, 255]
    assert notes == ["32-bit integer (I) 16-bit values scaled to 8-bit RGB"]


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    path = tmp_path / "logo.png"
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(path)
    image, notes = decode_both(path)
    assert notes == ["RGBA composited on white"]
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((3, 3)) == RED


def test_la_half_transparent_black_becomes_mid_gray(tmp_path):
    path = tmp_path / "shadow.png"
    Image.new("LA", (4, 4), (0, 128)).save(path)
    image, notes = decode_both(path)
    assert notes == ["LA composited on white"]
    assert close_to(image.getpixel((1, 1)), (127, 127, 127), tolerance=1)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "icon.png"
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.save(path, transparency=0)
    image, notes = decode_both(path)
    assert notes == ["palette (P) with transparency composited on white"]
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((2, 2)) == RED


def test_opaque_palette_gif_is_converted(tmp_path):
    path = tmp_path / "plain.gif"
    Image.new("RGB", (8, 8), RED).convert("P").save(path)
    image, notes = decode_both(path)
    assert notes == ["palette (P) converted to RGB"]
    assert image.getpixel((4, 4)) == RED


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"scan-{mode}.png"
    Image.new("L", (4, 4), 200).convert(mode, dither=Image.Dither.NONE).save(path)
    image, notes = decode_both(path)
    assert notes == [f"grayscale ({mode}) converted to RGB"]
    value = 200 if mode == "L" else 255
    assert image.getpixel((1, 1)) == (value, value, value)


def test_ycbcr_tiff_becomes_rgb(tmp_path):
    path = tmp_path / "video.tif"
    Image.new("RGB", (4, 4), RED).convert("YCbCr").save(path)
    if Image.open(path).mode != "YCbCr":
        pytest.skip("this Pillow stores YCbCr TIFFs as RGB")
    image, notes = decode_both(path)
    assert notes == ["YCbCr converted to RGB"]
    assert close_to(image.getpixel((1, 1)), RED, tolerance=4)


def test_animated_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), colour).convert("P") for colour in (RED, BLUE, (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    image, notes = decode_both(path)
    assert "first frame used (the file holds several)" in notes
    assert image.getpixel((4, 4)) == RED


def test_bytes_and_file_objects_are_accepted(tmp_path):
    data = noisy_jpeg(tmp_path / "a.jpg").read_bytes()
    from_bytes, _ = open_rgb(data)
    from_stream, _ = open_rgb(io.BytesIO(data))
    assert from_bytes.size == from_stream.size == (64, 48)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_stream))
    with pytest.raises(ImageReadError) as caught:
        open_rgb(b"hello")
    assert caught.value.path == "<upload>"


# -- unusable files ----------------------------------------------------------------------------


def expect_unusable(path: Path, reason_start: str, **kwargs) -> str:
    check = check_image(path, **kwargs)
    assert not check.ok and check.notes == ()
    assert check.reason.startswith(reason_start), check.reason
    with pytest.raises(ImageReadError) as caught:
        open_rgb(path, **kwargs)
    assert caught.value.path == str(path)
    assert caught.value.reason == check.reason
    assert str(path) in str(caught.value)
    return check.reason


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert expect_unusable(path, "empty file") == "empty file (0 bytes)"


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture\n")
    assert expect_unusable(path, "not an image") == "not an image: cannot identify image file"


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_jpeg_is_detected_even_by_the_fast_check(tmp_path, keep):
    data = noisy_jpeg(tmp_path / "whole.jpg", size=(128, 96)).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    expect_unusable(path, "truncated or corrupt image data")


def test_truncated_png(tmp_path):
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    path = tmp_path / "cut.png"
    path.write_bytes(whole.read_bytes()[:2000])
    expect_unusable(path, "truncated or corrupt image data")


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)
    assert path.stat().st_size < 200_000  # small on disk, 400 megapixels decoded
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = expect_unusable(path, "too large")
    assert reason == (
        "too large: 20000x20000 = 400,000,000 pixels exceeds the limit of 89,478,485"
        " (decompression-bomb guard)"
    )
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == limit_before
    check = check_image(path)
    assert (check.width, check.height) == (20000, 20000)


def test_max_pixels_is_ours_not_pillows(tmp_path):
    """Our limit decides in both directions: below Pillow's, and above its hard refusal level."""
    small = noisy_jpeg(tmp_path / "small.jpg", size=(100, 100))
    assert expect_unusable(small, "too large", max_pixels=9_999).startswith(
        "too large: 100x100 = 10,000 pixels"
    )
    assert check_image(small, max_pixels=10_000).ok

    claims_huge = png_header_only(tmp_path / "header.png", 20000, 20000)
    assert expect_unusable(claims_huge, "too large").startswith("too large: 20000x20000")
    # With a higher limit the header passes and the (missing) pixel data is what fails.
    expect_unusable(claims_huge, "truncated or corrupt image data", max_pixels=10**9)
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_missing_file_and_folder(tmp_path):
    assert check_image(tmp_path / "nope.jpg").reason == "file not found"
    assert check_image(tmp_path).reason == "not a regular file"
    with pytest.raises(ImageReadError, match="file not found"):
        open_rgb(tmp_path / "nope.jpg")
