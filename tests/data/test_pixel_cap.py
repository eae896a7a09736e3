"""`data.max_image_pixels` is the limit for every format: Pillow's own cap (an error above
2 x Image.MAX_IMAGE_PIXELS = 178,956,970 pixels) no longer decides for PNG and friends.
Only headers are parsed here: a hand-built PNG header claims the size, no pixels are decoded."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from pipelines.data.images import BadImage, ImageSource, open_image

SIDE = 13_400  # 179,560,000 pixels: over Pillow's default hard cap of 178,956,970


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit grey); one empty IDAT, IEND."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def pillow_default_cap():
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default, whatever an earlier test set
    yield
    Image.MAX_IMAGE_PIXELS = saved


def test_pillow_alone_refuses_the_large_png(pillow_default_cap) -> None:
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png_header(SIDE, SIDE)))


def test_max_image_pixels_above_pillows_cap_admits_a_png(pillow_default_cap) -> None:
    data = png_header(SIDE, SIDE)
    img = open_image(data, max_pixels=200_000_000)
    assert img.size == (SIDE, SIDE)
    assert ImageSource.open(data, 200_000_000).width == SIDE


def test_max_image_pixels_still_refuses_above_itself(pillow_default_cap) -> None:
    data = png_header(SIDE, SIDE)
    with pytest.raises(BadImage, match="decompression bomb"):
        open_image(data, max_pixels=SIDE * SIDE - 1)
    with pytest.raises(BadImage, match="decompression bomb"):
        open_image(png_header(1000, 1001), max_pixels=1_000_000)
