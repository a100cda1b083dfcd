"""Generated malformed images for the fuzz tests: truncations, byte flips, huge declared sizes, many frames,
extreme shapes and formats Pillow recognises but cannot decode. Deterministic (seeded) and small on disk."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HUGE = 65_000  # a side that makes any declared size far over every pixel limit


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def base_images() -> dict[str, bytes]:
    """Small valid files, one per format and variant, that the malformed ones are made from."""
    rgb = _noise(12, 9, 0)
    frames = [_noise(8, 8, s).convert("P") for s in range(3)]
    return {
        "rgb.png": _encode(rgb, "PNG"),
        "palette.png": _encode(rgb.convert("P"), "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "gray16.png": _encode(Image.fromarray(np.arange(96, dtype=np.uint16).reshape(8, 12) * 600), "PNG"),
        "baseline.jpg": _encode(rgb, "JPEG", quality=80),
        "progressive.jpg": _encode(_noise(16, 16, 1), "JPEG", progressive=True),
        "anim.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "pages.tif": _encode(rgb, "TIFF", save_all=True, append_images=[rgb.convert("L")]),
        "lzw.tif": _encode(rgb, "TIFF", compression="tiff_lzw"),
        "lossy.webp": _encode(rgb, "WEBP", quality=50),
        "lossless.webp": _encode(rgb, "WEBP", lossless=True),
        "rgb.bmp": _encode(rgb, "BMP"),
        "icon.ico": _encode(_noise(16, 16, 2).convert("RGBA"), "ICO", sizes=[(16, 16)]),
    }


def truncations(name: str, data: bytes) -> dict[str, bytes]:
    """Every prefix of the file, from 1 byte to one byte short."""
    return {f"trunc{n:05d}-{name}": data[:n] for n in range(1, len(data))}


def byte_flips(name: str, data: bytes, count: int, seed: int) -> dict[str, bytes]:
    """Copies with 1-4 random bytes replaced: headers, chunk lengths and coded data alike."""
    rng = np.random.default_rng(seed)
    flipped = {}
    for k in range(count):
        mutated = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            mutated[int(rng.integers(0, len(mutated)))] = int(rng.integers(0, 256))
        flipped[f"flip{k:03d}-{name}"] = bytes(mutated)
    return flipped


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_declared(base: dict[str, bytes]) -> dict[str, bytes]:
    """Tiny files whose headers declare enormous images (decompression bombs by declaration)."""
    png = bytearray(base["rgb.png"])
    png[16:24] = struct.pack(">II", HUGE, HUGE)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    gif = base["anim.gif"]
    screen = bytearray(gif)
    screen[6:10] = struct.pack("<HH", HUGE, HUGE)
    descriptor = bytearray(gif)
    at = descriptor.index(b",", 13)
    descriptor[at + 5 : at + 9] = struct.pack("<HH", HUGE, HUGE)
    both = bytearray(screen)
    both[at + 5 : at + 9] = struct.pack("<HH", HUGE, HUGE)
    bmp = bytearray(base["rgb.bmp"])
    bmp[18:26] = struct.pack("<ii", HUGE, HUGE)
    jpeg = bytearray(base["baseline.jpg"])
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", HUGE, HUGE)
    # A 1-bit PNG that really is 20000 x 20000 (400 million pixels) in ~50 KB.
    real_bomb = _encode(Image.new("1", (20_000, 20_000)), "PNG", optimize=True)
    return {
        "huge-header.png": bytes(png),
        "huge-screen.gif": bytes(screen),
        "huge-frame.gif": bytes(descriptor),
        "huge-both.gif": bytes(both),
        "huge.bmp": bytes(bmp),
        "huge-sof.jpg": bytes(jpeg),
        "bomb-20000.png": real_bomb,
    }


def multipage_tiff(pages: int) -> bytes:
    """A little-endian TIFF of ``pages`` uncompressed 1x1 grayscale pages, written directly (Pillow's writer
    takes minutes for this many)."""
    entry_count, ifd_size = 8, 2 + 8 * 12 + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for page in range(pages):
        start = 8 + page * (ifd_size + 2)  # each page: its directory, then its one pixel (+1 pad byte)
        pixel = start + ifd_size
        following = start + ifd_size + 2 if page + 1 < pages else 0
        tags = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, pixel), (278, 3, 1)]
        tags.append((279, 4, 1))
        out += struct.pack("<H", entry_count)
        for tag, kind, value in tags:
            out += struct.pack("<HHII", tag, kind, 1, value)
        out += struct.pack("<I", following) + bytes([page % 256, 0])
    return bytes(out)


def many_frames() -> dict[str, bytes]:
    """Multi-page files whose frame count is expensive to walk: 80,000 one-pixel TIFF pages, 3,000 GIF frames."""
    tiff = multipage_tiff(80_000)
    frames = [Image.new("P", (2, 2), i % 256) for i in range(3_000)]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    return {"pages-80000.tif": tiff, "frames-3000.gif": gif}


def extreme_shapes() -> dict[str, bytes]:
    """1xN and Nx1 images: tiny files whose short-side resize would be millions of pixels long."""
    return {
        "tall-1x20000.png": _encode(Image.new("RGB", (1, 20_000), (200, 30, 30)), "PNG"),
        "wide-100000x1.png": _encode(Image.new("RGB", (100_000, 1), (30, 30, 200)), "PNG"),
        "tall-3x60000.jpg": _encode(Image.new("RGB", (3, 60_000), (30, 200, 30)), "JPEG"),
        "one-pixel.png": _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
    }


def undecodable_variants(base: dict[str, bytes]) -> dict[str, bytes]:
    """Formats Pillow identifies but cannot decode here: each must be skipped with that reason."""
    bmp = bytearray(base["rgb.bmp"])
    bmp[30:34] = struct.pack("<I", 4)  # BI_JPEG compression
    dds = bytearray(b"DDS " + struct.pack("<I", 124) + bytes(120))
    struct.pack_into("<III", dds, 8, 0x1007, 4, 4)
    struct.pack_into("<II", dds, 76, 32, 0x4)
    dds[84:88] = b"ZZZZ"  # an unknown FourCC
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    # A TIFF whose second page lacks its dimensions: walking the pages (n_frames) raised TypeError.
    tiff = bytearray(base["pages.tif"])
    first = struct.unpack("<I", tiff[4:8])[0]
    entries = struct.unpack("<H", tiff[first : first + 2])[0]
    second = struct.unpack("<I", tiff[first + 2 + 12 * entries : first + 6 + 12 * entries])[0]
    for k in range(struct.unpack("<H", tiff[second : second + 2])[0]):
        at = second + 2 + 12 * k
        if struct.unpack("<H", tiff[at : at + 2])[0] in (256, 257):
            tiff[at : at + 2] = struct.pack("<H", 60_000)
    return {
        "jpeg-compressed.bmp": bytes(bmp),
        "unknown-fourcc.dds": bytes(dds) + bytes(64),
        "needs-ghostscript.eps": eps,
        "page2-no-dims.tif": bytes(tiff),
        "stub.h5": b"\x89HDF\r\n\x1a\n" + bytes(100),  # Pillow's HDF5 and GRIB plugins are stubs
        "stub.grib": b"GRIB" + bytes(3) + b"\x01" + bytes(100),
    }


def write_corpus(folder: Path, flips_per_file: int = 40) -> dict[str, Path]:
    """Every generated file written under ``folder``; returns name -> path."""
    base = base_images()
    files: dict[str, bytes] = dict(base)
    for name, data in base.items():
        files |= truncations(name, data)
        files |= byte_flips(name, data, flips_per_file, seed=len(name))
    files |= huge_declared(base) | many_frames() | extreme_shapes() | undecodable_variants(base)
    files |= {"empty.png": b"", "text.jpg": b"not an image at all\n"}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths[name] = path
    return paths
