"""Images of any size: a pixel limit checked from the header, band-by-band decoding that
segments like the whole image, and a flow process whose memory does not grow with the image."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import emdask
import pipelines.image
from pipelines import errors
from pipelines.cli import main
from pipelines.image import segment_image
from pipelines.partitions import image_bands, image_features, open_image, streams_bands
from pipeline_data import image_array, published_dir

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind, data=b""):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width, height, scanlines, colour_type=2, idat=None, depth=8):
    """A PNG file of ``depth``-bit samples from its filtered scanlines (one filter byte each),
    or with the compressed data ``idat`` as it is."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    idat = zlib.compress(scanlines) if idat is None else idat
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND")


def _png_with_every_filter(pixels, depth=8):
    """``pixels`` (height, width[, channels]) as a PNG of 8- or 16-bit samples whose rows use
    the five PNG filters in turn (None, Sub, Up, Average, Paeth), as encoders choose them row
    by row; the filters work on bytes, a pixel's bytes apart."""
    h, w = pixels.shape[:2]
    c = pixels.shape[2] if pixels.ndim == 3 else 1
    samples = pixels.astype(">u2" if depth == 16 else np.uint8)
    bpp = c * depth // 8
    rows = samples.view(np.uint8).reshape(h, w * bpp).astype(np.int32)
    up = np.zeros(w * bpp, np.int32)
    out = bytearray()
    for y in range(h):
        row = rows[y]
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        kind = y % 5
        if kind == 0:
            pred = np.zeros_like(row)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = up
        elif kind == 3:
            pred = (left + up) // 2
        else:
            pa, pb, pc = np.abs(up - upleft), np.abs(left - upleft), np.abs(left + up - 2 * upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        out += bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes()
        up = row
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    return _png(w, h, bytes(out), colour_type=colour_type, depth=depth)


def _huge_header_png(path, width=100_000, height=100_000):
    """A valid PNG header claiming width × height RGB pixels, followed by almost no data."""
    path.write_bytes(_png(width, height, b"\0" * 16))
    return path


def _one_line_error(capsys, command="segment-image"):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"emdask {command}: error: ")
    return err


# -- the pixel limit -----------------------------------------------------------------------------


def test_an_image_whose_header_claims_too_many_pixels_is_refused_at_once(tmp_path):
    png = _huge_header_png(tmp_path / "bomb.png")
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api",  # nothing may reach it
           "DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:9"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "segment-image", str(png), str(out), "-k", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err  # no traceback
    assert str(png) in err and "10,000,000,000 pixels" in err and "100000x100000" in err
    assert f"{Image.MAX_IMAGE_PIXELS:,}" in err and "--max-pixels" in err
    assert time.perf_counter() - started < 60
    assert not out.exists()


def test_the_limit_is_checked_before_prefect_or_dask_in_process(tmp_path, capsys):
    png = _huge_header_png(tmp_path / "bomb.png", 20_000, 20_000)
    started = time.perf_counter()
    assert main(["segment-image", str(png), str(tmp_path / "out"), "--max-pixels", "1000000"]) == 2
    err = _one_line_error(capsys)
    assert "400,000,000 pixels" in err and "limit of 1,000,000 pixels" in err
    assert time.perf_counter() - started < 5  # the header only: nothing decoded, no cluster
    # the flow's own check says the same
    with pytest.raises(errors.InputError, match="more than the limit of 1,000,000 pixels"):
        pipelines.image.check_inputs(str(png), str(tmp_path / "out"), max_pixels=1_000_000)
    assert not (tmp_path / "out").exists()


def test_raising_max_pixels_lets_a_bigger_image_through(api, dask_address, tmp_path, capsys,
                                                        monkeypatch):
    png = tmp_path / "picture.png"
    Image.fromarray(image_array(64, 48)).save(png)  # 3,072 pixels
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # the default limit is Pillow's, read at run time
        assert main(["segment-image", str(png), str(out), "-k", "2"]) == 2
        err = _one_line_error(capsys)
        assert "3,072 pixels (64x48), more than the limit of 3,000 pixels" in err
        assert not out.exists()
        status = main(["segment-image", str(png), str(out), "-k", "2", "--max-pixels", "4000",
                       "--dask-address", dask_address])
        text = capsys.readouterr()
        assert status == 0, text.err
    labels = np.load(published_dir(out) / "labels.npy")
    assert labels.shape == (48, 64) and set(np.unique(labels)) == {0, 1}


def test_damaged_files_fail_as_bad_input_naming_the_file(api, dask_address, tmp_path, capsys):
    good = _png_with_every_filter(image_array(40, 30))
    out = tmp_path / "out"
    # a flipped byte: the PNG's checksums catch it from the file alone, before any work
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    # right checksums over broken compressed data: found when the image is decoded
    broken = _png(40, 30, b"", idat=b"x\x9c" + b"\xff" * 40)
    (tmp_path / "broken.png").write_bytes(broken)
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    for name in ("flipped.png", "truncated.png", "broken.png"):
        status = main(["segment-image", str(tmp_path / name), str(out), "-k", "2",
                       "--dask-address", dask_address])
        err = _one_line_error(capsys)
        assert status == 2, (name, err)
        assert f"image {tmp_path / name} is damaged: " in err, err
        assert published_dir(out) is None


# -- band by band --------------------------------------------------------------------------------


def _noisy(width, height, seed=0):
    rng = np.random.default_rng(seed)
    rgb = image_array(width, height, seed=seed).astype(np.int16)
    return np.clip(rgb + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)


def _encodings(rgb):
    """The same picture as files of every kind the band reader meets, each with the RGB
    pixels it must decode to (16-bit samples: their high byte)."""
    im = Image.fromarray(rgb)
    grey = np.asarray(im.convert("L"))
    as_grey = np.repeat(grey[:, :, None], 3, axis=2)
    wide = rgb.astype(np.uint16) * 257  # 16-bit samples whose high byte is the 8-bit one
    alpha = np.full(rgb.shape[:2] + (1,), 40000, np.uint16)
    files = {
        "every filter": (_png_with_every_filter(rgb), rgb),
        "16-bit RGB": (_png_with_every_filter(wide, 16), rgb),
        "16-bit RGBA": (_png_with_every_filter(np.concatenate([wide, alpha], axis=2), 16), rgb),
        "16-bit grey": (_png_with_every_filter(grey.astype(np.uint16) * 257, 16), as_grey),
        "16-bit grey+alpha": (_png_with_every_filter(
            np.stack([grey.astype(np.uint16) * 257, alpha[:, :, 0]], axis=2), 16), as_grey),
    }
    for mode in ("RGB", "RGBA", "L", "LA", "P", "1"):
        converted = (im.convert("P", palette=Image.Palette.ADAPTIVE, colors=50) if mode == "P"
                     else im.convert(mode))
        buffer = io.BytesIO()
        converted.save(buffer, "PNG", **({"transparency": 3} if mode == "P" else {}))
        files[f"PNG {mode}"] = (buffer.getvalue(), np.asarray(converted.convert("RGB")))
    for bits, colours in ((2, 4), (4, 16)):  # palettes of 2 and 4 bits a pixel
        converted = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=colours)
        buffer = io.BytesIO()
        converted.save(buffer, "PNG", bits=bits)
        files[f"PNG P {bits}-bit"] = (buffer.getvalue(), np.asarray(converted.convert("RGB")))
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=90)
    files["JPEG"] = (buffer.getvalue(),
                     np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return files


def test_bands_decode_to_the_pixels_of_the_whole_image():
    rgb = _noisy(53, 41)
    streamed = set()
    for name, (data, whole) in _encodings(rgb).items():
        assert whole.shape == (41, 53, 3), name
        for rows in (1, 7, 41):
            bounds = [(a, min(a + rows, 41)) for a in range(0, 41, rows)]
            fp = io.BytesIO(data)
            img = open_image(fp)
            if streams_bands(img):
                streamed.add(name)
            bands = list(image_bands(fp, img, bounds))
            assert [b.shape for b in bands] == [(b - a, 53, 3) for a, b in bounds], name
            assert np.array_equal(np.concatenate(bands), whole), (name, rows)
    assert streamed == set(_encodings(rgb)) - {"JPEG"}


def test_features_of_a_band_are_the_rows_of_the_whole_image_features():
    rgb = _noisy(30, 20)
    whole = image_features(rgb, 0.5)
    band = image_features(rgb[7:13], 0.5, top=7, image_height=20)
    assert np.array_equal(band, whole[7 * 30:13 * 30])


def _whole_image_labels(png, k, position_weight=None, k_range=None):
    """Today's path: the library fitted on the features of the whole decoded image."""
    rgb = np.asarray(Image.open(png).convert("RGB"))
    X = image_features(rgb, position_weight)
    if k_range is None:
        model = emdask.GaussianMixture(k, random_state=0).fit(X)
    else:
        model = emdask.select_components(emdask.GaussianMixture(k_range[0], random_state=0), X,
                                         n_components=list(k_range), criterion="bic").best_estimator_
    return model, model.predict(X).reshape(rgb.shape[:2])


@pytest.mark.parametrize("chunk_pixels", [500_000, 700])  # one band; 7 bands of 9 rows
def test_bands_segment_like_the_whole_image(api, dask_address, tmp_path, monkeypatch,
                                            chunk_pixels):
    monkeypatch.setattr(pipelines.image, "CHUNK_PIXELS", chunk_pixels)
    png = tmp_path / "picture.png"
    png.write_bytes(_png_with_every_filter(image_array(72, 60)))
    s = segment_image(str(png), str(tmp_path / "out"), n_components=3, dask_address=dask_address)
    model, labels = _whole_image_labels(png, 3)
    version = published_dir(tmp_path / "out")
    assert np.array_equal(np.load(version / "labels.npy"), labels)
    colours = np.clip(np.rint(model.means_), 0, 255).astype(np.uint8)
    with Image.open(version / "segments.png") as img:
        assert img.mode == "P"  # palette = segment colours, pixel = label
        assert np.array_equal(np.asarray(img), labels)
        assert np.array_equal(np.asarray(img.convert("RGB")), colours[labels])
    assert s["counts"] == np.bincount(labels.ravel(), minlength=3).tolist()
    assert not (version / "work").exists()  # the staged bands are gone

    s = segment_image(str(png), str(tmp_path / "out-xy"), k_min=2, k_max=4, position=True,
                      position_weight=0.5, dask_address=dask_address)
    model, labels = _whole_image_labels(png, None, 0.5, (2, 3, 4))
    assert s["n_components"] == model.n_components
    assert np.array_equal(np.load(published_dir(tmp_path / "out-xy") / "labels.npy"), labels)


def _two_regions(width=48, height=40, seed=3):
    """A blue top and a green bottom (from row 16, on the JPEG blocks' edge), a little noise."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((height, width, 3), np.float64)
    rgb[:16] = (30, 60, 200)
    rgb[16:] = (40, 170, 50)
    rgb += rng.normal(0, 3, rgb.shape)
    truth = np.zeros((height, width), np.int64)
    truth[16:] = 1
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), truth


def _same_partition(a, b):
    """Whether two labellings split the pixels the same way (labels may be permuted)."""
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(set(a.ravel().tolist())) == len(set(b.ravel().tolist()))


@pytest.mark.parametrize("kind", ["16-bit PNG", "JPEG"])
def test_16_bit_png_and_jpeg_are_segmented_end_to_end(kind, api, dask_address, tmp_path):
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    rgb, truth = _two_regions()
    path = tmp_path / ("picture.png" if kind == "16-bit PNG" else "picture.jpg")
    if kind == "16-bit PNG":
        path.write_bytes(_png_with_every_filter(rgb.astype(np.uint16) * 257, 16))
        pixels = rgb  # the high bytes
    else:
        Image.fromarray(rgb).save(path, "JPEG", quality=95)
        pixels = np.asarray(Image.open(path).convert("RGB"))
    segment_image(str(path), str(tmp_path / "out"), n_components=2, dask_address=dask_address)
    labels = np.load(published_dir(tmp_path / "out") / "labels.npy")
    assert labels.shape == (40, 48)
    assert _same_partition(labels, truth)  # the two colours, separated exactly
    reference = SkGaussianMixture(2, random_state=0).fit(pixels.reshape(-1, 3).astype(float))
    assert _same_partition(labels, reference.predict(pixels.reshape(-1, 3).astype(float)).reshape(40, 48))


# -- memory --------------------------------------------------------------------------------------

_MEASURE = r"""
import json, os, sys, threading, tracemalloc
from pipelines.cli import main

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

small, big, out, address = sys.argv[1:5]
options = ["-k", "2", "--max-iter", "3", "--dask-address", address]
assert main(["segment-image", small, out + "/small", *options]) == 0  # imports, first-run caches
base, high, done = rss(), [0], threading.Event()

def watch():
    while not done.wait(0.005):
        high[0] = max(high[0], rss())

threading.Thread(target=watch, daemon=True).start()
tracemalloc.start()
assert main(["segment-image", big, out + "/big", *options]) == 0
done.set()
print(json.dumps({"traced": tracemalloc.get_traced_memory()[1], "rss": max(high[0], rss()) - base}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm")
def test_the_flow_process_holds_no_copy_of_the_image(api, dask_address, tmp_path):
    """In the flow process of a 1500x1500 run (its workers are elsewhere), neither the pixels
    nor the labels ever are: the memory Python and numpy allocate peaks far below the image's
    float64 pixels (54 MB; labels gathered there as int64 would take 18 MB), and so does
    the process's resident memory (measured: about 3 MB and 8 MB; 21 MB and 40 MB when the
    flow process decoded the image and gathered the labels)."""
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    Image.fromarray(image_array(64, 48)).save(small)
    rng = np.random.default_rng(1)
    rgb = np.repeat(np.repeat(image_array(150, 150), 10, axis=0), 10, axis=1)
    Image.fromarray(np.clip(rgb + rng.integers(-8, 8, rgb.shape), 0, 255).astype(np.uint8)).save(
        big, compress_level=1)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(small), str(big), str(tmp_path), dask_address],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    grown = json.loads(done.stdout.strip().splitlines()[-1])
    pixels64 = 1500 * 1500 * 3 * 8
    assert grown["traced"] < pixels64 / 8, f"numpy and Python peaked at {grown['traced']:,} bytes"
    assert grown["rss"] < pixels64 / 3, f"the flow process grew by {grown['rss']:,} bytes"
    assert np.load(published_dir(tmp_path / "big") / "labels.npy").shape == (1500, 1500)
