"""read_image on the awkward files real datasets contain, checked pixel by pixel."""
import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from part_distill.data.image_io import SkipCounter, UnreadableImageError, read_image, read_image_or_skip


def _rgb(h=6, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_png_in_both_channel_orders(tmp_path):
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    rgb = read_image(tmp_path / "a.png", format="RGB")
    bgr = read_image(tmp_path / "a.png", format="BGR")
    assert rgb.dtype == np.uint8 and rgb.flags["C_CONTIGUOUS"] and bgr.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(rgb, arr)
    np.testing.assert_array_equal(bgr, arr[:, :, ::-1])
    with pytest.raises(ValueError, match="format"):
        read_image(tmp_path / "a.png", format="L")


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = _rgb()[:, :, 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png", format="RGB")
    assert out.shape == gray.shape + (3,)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_cmyk_tiff_and_jpeg(tmp_path):
    # Pure inks: cyan, magenta, yellow, black, paper white -> their RGB, whatever the conversion formula.
    cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], np.uint8)
    expected = np.array([[[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0], [255, 255, 255]]], np.uint8)
    img = Image.fromarray(cmyk, mode="CMYK")
    img.save(tmp_path / "c.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif", format="RGB"), expected)
    # JPEG stores CMYK (Adobe-inverted); use 8x8 blocks so compression keeps the flat colours.
    big = Image.fromarray(np.kron(cmyk, np.ones((8, 8, 1), np.uint8)), mode="CMYK")
    big.save(tmp_path / "c.jpg", quality=100)
    out = read_image(tmp_path / "c.jpg", format="RGB")[4::8, 4::8]
    assert np.abs(out.astype(int) - expected).max() <= 8


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    vals = np.array([[0, 255, 256, 30000, 32768, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), vals)
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really a 16-bit file
    out = read_image(tmp_path / "g16.png", format="RGB")[:, :, 0]
    np.testing.assert_array_equal(out, [[0, 0, 1, 117, 128, 255]])  # v >> 8; clipping would give 255s


def test_16bit_color_is_scaled(tmp_path):
    rgb16 = np.random.default_rng(1).integers(0, 65536, size=(5, 7, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[:, :, ::-1])
    out = read_image(tmp_path / "c16.png", format="RGB")
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8))


def test_rgba_and_palette(tmp_path):
    arr = _rgb()
    alpha = np.full(arr.shape[:2] + (1,), 7, np.uint8)
    Image.fromarray(np.concatenate([arr, alpha], 2), mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", format="RGB"), arr)  # alpha ignored

    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    lut = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png", format="RGB"), lut[idx])


@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation(tmp_path, orientation, k):
    arr = _rgb(4, 9)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.png", exif=exif)
    out = read_image(tmp_path / "o.png", format="RGB")
    # 6: the camera was turned, the viewer turns the stored pixels 90 degrees clockwise.
    np.testing.assert_array_equal(out, np.rot90(arr, k=k))


def test_exif_rotated_jpeg(tmp_path):
    small = _rgb(3, 5)
    img = Image.fromarray(np.kron(small, np.ones((16, 16, 1), np.uint8)))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "o.jpg", format="RGB")
    assert out.shape == (80, 48, 3)
    # Block centres survive JPEG's chroma subsampling; compare them with the rotated colours.
    assert np.abs(out[8::16, 8::16].astype(int) - np.rot90(small, k=-1)).max() <= 6


def test_corrupt_truncated_and_missing_files_raise_and_count(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image" * 10)
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    counter = SkipCounter("test images")
    for name in ("junk.jpg", "trunc.jpg", "missing.png"):
        with pytest.raises(UnreadableImageError) as e:
            read_image(tmp_path / name)
        assert isinstance(e.value, OSError) and name in str(e.value)
        assert read_image_or_skip(tmp_path / name, counter) is None
    ok = read_image_or_skip(tmp_path / "full.jpg", counter)
    assert ok.shape == (64, 64, 3)
    assert counter["unreadable_image"] == 3 and counter.total == 3


def test_skip_counter_reports_once_with_counts(caplog):
    counter = SkipCounter("demo set", max_examples=2)
    for i in range(5):
        counter.skip("empty_mask", f"ann {i}")
    counter.skip("bad_class")
    other = SkipCounter("worker")
    other.skip("empty_mask", "ann 9", n=2)
    counter.merge(other)
    assert counter.as_dict() == {"empty_mask": 7, "bad_class": 1}
    with caplog.at_level(logging.WARNING):
        assert counter.warn_summary() == 8
        assert SkipCounter("clean").warn_summary() == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "demo set" in msg and "empty_mask: 7" in msg and "bad_class: 1" in msg
    assert "ann 0" in msg and "ann 4" not in msg  # at most max_examples examples
