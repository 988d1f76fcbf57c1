"""What Dask workers run on each partition or chunk of a flow's data.

These functions live apart from the flow modules so that workers import them by their
package path, however a deployment loads its flow (module path or script path).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["CorruptImage", "filled_marks", "image_bands", "image_features", "image_header",
           "label_band", "label_partition", "open_image", "pixel_band", "rgb_pixels",
           "scaled_table", "segment_frame", "stage_image", "streams_bands", "verify_image",
           "write_segment_files"]


def filled_marks(part, id_column, columns):
    """The id column and, per column, True where the cell is missing (and will be filled)."""
    marks = pd.DataFrame({c: part[c].isna().to_numpy() for c in columns}, index=part.index)
    marks.insert(0, id_column, part[id_column].to_numpy())
    return marks.reset_index(drop=True)


def scaled_table(table, scaling):
    """The table with the scaled features standardized: (x - center) / scale."""
    if not scaling:
        return table
    return table.assign(**{c: (table[c] - m) / s for c, (m, s) in scaling.items()})


def segment_frame(ids, proba, id_column):
    """Ids, most probable segment and membership probabilities ``p_0 .. p_{k-1}``."""
    out = pd.DataFrame({id_column: ids})
    out["segment"] = proba.argmax(axis=1).astype(np.int64) if proba.shape[0] else np.empty(0, np.int64)
    for j in range(proba.shape[1]):
        out[f"p_{j}"] = proba[:, j]
    return out


def label_partition(part, model, id_column, features, scaling):
    """Segment table of one partition: the model's membership probabilities of every row."""
    X = scaled_table(part[features], scaling)
    proba = np.asarray(model.predict_proba(X), dtype=np.float64)
    return segment_frame(part[id_column].to_numpy(), proba, id_column)


# -- images ------------------------------------------------------------------------------------
#
# An image is decoded once, on one worker, band by band (a band: whole rows, about
# CHUNK_PIXELS pixels), and each band's RGB pixels are staged as a file beside the version
# being written; EM passes and labelling read the staged bands. Non-interlaced 8-bit PNGs are
# streamed (memory: one band); other images (JPEG, interlaced, 1/2/4/16-bit PNGs, TIFF, ...)
# are decoded whole, once, by that worker. The outputs are written back band by band too: the
# label array as a .npy file (header, then the rows) and the segment map as a palette PNG
# (palette = segment mean colours, index = label) whose rows are compressed as they come.

#: Bytes per pixel of the 8-bit PNG scanline layouts (Pillow's raw modes, the same names as
#: the image modes) streamed band by band. Each packs back to exactly the bytes it was decoded
#: from, so a band's last row seeds the PNG filters of the next band's first row.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_READ_BLOCK = 1 << 20


class CorruptImage(ValueError):
    """The image's data cannot be decoded (truncated, bad checksum, bad compressed data)."""


def open_image(fp):
    """Pillow's image of the binary file ``fp``: its header read, no pixel decoded.

    Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is not applied: the
    flow applies its ``max_pixels``, whose default is that limit, from the size found here.
    The formats are tried in Pillow's order, as ``Image.open`` does.
    """
    import struct

    from PIL import Image, UnidentifiedImageError

    Image.preinit()
    fp.seek(0)
    prefix = fp.read(16)
    tried = set()
    for load in (None, Image.init):
        if load is not None:
            load()
        for fmt in list(Image.ID):
            if fmt in tried:
                continue
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            accepted = accept(prefix) if accept else True
            if not accepted or isinstance(accepted, str):
                continue
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError("cannot identify image file")


def image_header(url, storage_options=None):
    """``(width, height, mode, format)`` of the image at ``url``, from its header alone."""
    from .sources import filesystem

    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        img = open_image(f)
        return img.width, img.height, img.mode, img.format or ""


def verify_image(url, storage_options=None):
    """Pillow's integrity check of the file (for PNG: every chunk and its checksum), read as a
    stream: nothing is decoded."""
    from .sources import filesystem

    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        open_image(f).verify()


def streams_bands(img):
    """Whether ``img`` (opened, not loaded) is decoded band by band rather than whole: a
    non-interlaced PNG, of any bit depth and colour type."""
    if img.format != "PNG" or img.info.get("interlace") or len(img.tile) != 1:
        return False
    tile = img.tile[0]
    return tile[0] == "zip" and isinstance(tile[3], str)


def image_bands(fp, img, bounds):
    """The RGB pixels of the rows ``a:b`` of every ``(a, b)`` in ``bounds`` (consecutive, from
    row 0), one uint8 array of shape (b - a, width, 3) at a time."""
    bands = _png_bands(fp, img, bounds) if streams_bands(img) else _whole_bands(img, bounds)
    yield from bands


def rgb_pixels(img):
    """The pixels of a Pillow image as uint8 RGB, shape (height, width, 3). 16-bit samples
    keep their high byte (as Pillow reads 16-bit RGB PNGs), not a clip at 255."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def _whole_bands(img, bounds):
    """Bands of an image decoded whole, once (JPEG, interlaced PNG, ...): the decoded image,
    in its own mode, and one band converted at a time."""
    img.load()
    for a, b in bounds:
        yield rgb_pixels(img.crop((0, a, img.width, b)))


def _png_idat(fp):
    """The compressed image data of a PNG file, piece by piece: its IDAT chunks, CRC-checked."""
    import struct
    import zlib

    fp.seek(0)
    if fp.read(8) != _PNG_SIGNATURE:
        raise CorruptImage("not a PNG file")
    seen = False
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise CorruptImage("the file ends before its image data does")
        length, kind = struct.unpack(">I4s", head)
        if kind != b"IDAT":
            if seen:
                return  # the IDAT chunks are consecutive
            fp.seek(length + 4, 1)
            continue
        seen = True
        crc, left = zlib.crc32(kind), length
        while left:
            piece = fp.read(min(left, _READ_BLOCK))
            if not piece:
                raise CorruptImage("the file ends inside its image data")
            crc, left = zlib.crc32(piece, crc), left - len(piece)
            yield piece
        if fp.read(4) != struct.pack(">I", crc & 0xFFFFFFFF):
            raise CorruptImage("an IDAT chunk fails its CRC check")


class _Inflater:
    """Decompressed bytes of a zlib stream given piece by piece, read as much as asked."""

    def __init__(self, pieces):
        import zlib

        self._pieces = pieces
        self._z = zlib.decompressobj()

    def read(self, n):
        out = bytearray()
        while len(out) < n and not self._z.eof:
            data = self._z.unconsumed_tail or next(self._pieces, None)
            if data is None:
                break
            out += self._z.decompress(data, n - len(out))
        return bytes(out)


#: Bytes per pixel (the PNG filters' unit) -> (mode, rawmode) of Pillow's decoder that hands
#: back the unfiltered scanlines' bytes exactly, as the samples of an image of that mode.
_RAW_BYTES = {1: ("L", "L"), 2: ("LA", "LA"), 3: ("RGB", "RGB"), 4: ("RGBA", "RGBA")}
#: 16-bit colour: its high bytes and its low bytes, each decoded by a rawmode of Pillow's.
_RAW_WORDS = {6: ("RGB", "RGB;16B", "RGB;16L"), 8: ("RGBA", "RGBA;16B", "RGBA;16L")}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_bits(fp):
    """Bits per pixel of a PNG file, from its header."""
    import struct

    fp.seek(24)
    depth, colour = struct.unpack(">BB", fp.read(2))
    if colour not in _PNG_CHANNELS:
        raise CorruptImage(f"unknown PNG colour type {colour}")
    return depth * _PNG_CHANNELS[colour]


def _unfiltered(stream, bpp, row_bytes, rows):
    """The unfiltered scanlines (rows, row_bytes) of a zlib stream of filtered scanlines."""
    from PIL import Image

    if bpp in _RAW_BYTES:
        mode, raw = _RAW_BYTES[bpp]
        band = Image.frombytes(mode, (row_bytes // bpp, rows), stream, "zip", raw)
        return np.asarray(band).reshape(rows, row_bytes)
    mode, high, low = _RAW_WORDS[bpp]
    width = row_bytes // bpp
    hi = np.asarray(Image.frombytes(mode, (width, rows), stream, "zip", high))
    lo = np.asarray(Image.frombytes(mode, (width, rows), stream, "zip", low))
    return np.stack([hi, lo], axis=-1).reshape(rows, row_bytes)


def _png_bands(fp, img, bounds):
    """Bands of a non-interlaced PNG (any bit depth and colour type), decoded in bounded memory.

    The scanlines are inflated as a stream; each band's filtered scanlines, led by the previous
    band's last row (unfiltered, filter type 0), are handed to Pillow's own PNG decoder, which
    undoes the filters exactly as it would over the whole image (the filters work on bytes:
    a pixel of 1 to 8 bits counts as one, of 16-bit colour as six or eight, decoded as its high
    and its low bytes). The unfiltered bytes are then read as Pillow reads the file's pixels.
    """
    import zlib

    from PIL import Image

    width, mode, rawmode = img.width, img.mode, img.tile[0][3]
    bits = _png_bits(fp)
    row_bytes = (bits * width + 7) // 8
    bpp = max(1, bits // 8)
    if bpp not in _RAW_BYTES and bpp not in _RAW_WORDS:
        raise CorruptImage(f"a PNG of {bits} bits per pixel")
    stride = 1 + row_bytes
    lines = _Inflater(_png_idat(fp))
    seed = b""
    for a, b in bounds:
        data = lines.read(stride * (b - a))
        if len(data) < stride * (b - a):
            raise CorruptImage(f"the image data ends at row {a + len(data) // stride} of {img.height}")
        rows = b - a + (1 if seed else 0)
        stream = zlib.compress(b"\0" + seed + data if seed else data, 0)
        raw = _unfiltered(stream, bpp, row_bytes, rows)
        seed = raw[-1].tobytes()
        band = Image.frombytes(mode, (width, b - a), raw[rows - (b - a):].tobytes(), "raw", rawmode)
        if mode == "P":
            band.putpalette(img.palette)
        if "transparency" in img.info:
            band.info["transparency"] = img.info["transparency"]
        yield rgb_pixels(band)


def _join(folder, name):
    import os
    import posixpath

    return posixpath.join(folder, name) if "://" in str(folder) else os.path.join(folder, name)


def _write_array(fs, path, array):
    with fs.open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _read_array(url, storage_options=None):
    from .sources import filesystem

    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return np.load(f, allow_pickle=False)


def stage_image(url, bounds, folder, storage_options=None):
    """Decode the image at ``url`` once, band by band, and write every band's RGB pixels to
    ``folder/band-NNNNN.npy`` (uint8, shape (rows, width, 3)); returns their URLs.

    Raises
    ------
    CorruptImage
        The image's data cannot be decoded.
    """
    import struct
    import zlib

    from .sources import filesystem

    fs, path = filesystem(url, storage_options)
    out, root = filesystem(folder, storage_options)
    out.makedirs(root, exist_ok=True)
    urls = []
    with fs.open(path, "rb") as f:
        img = open_image(f)
        try:
            for i, rgb in enumerate(image_bands(f, img, bounds)):
                name = f"band-{i:05d}.npy"
                _write_array(out, _join(root, name), rgb)
                urls.append(_join(folder, name))
        except CorruptImage:
            raise
        except (SyntaxError, EOFError, ValueError, zlib.error, struct.error) as exc:
            raise CorruptImage(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:  # Pillow's decoders report bad data as OSError
            if "image file" in str(exc) or "data stream" in str(exc):
                raise CorruptImage(f"{type(exc).__name__}: {exc}") from None
            raise
    return urls


def image_features(rgb, position_weight=None, top=0, image_height=None):
    """Pixel features: R, G, B and, with a position weight, x and y scaled to 0..255 × weight.

    Parameters
    ----------
    rgb : ndarray of shape (height, width, 3), uint8
        The whole image, or the band of its rows ``top:top + height``.
    position_weight : float or None
    top : int
        Row of the image where ``rgb`` starts.
    image_height : int, optional
        Height of the whole image (default: ``rgb``'s), by which y is scaled.

    Returns
    -------
    ndarray of shape (height * width, 3 or 5), float32
    """
    h, w, _ = rgb.shape
    colour = rgb.reshape(-1, 3).astype(np.float32)
    if not position_weight:
        return colour
    ys, xs = np.mgrid[top:top + h, 0:w].astype(np.float32)
    xs *= 255.0 * position_weight / max(1, w - 1)
    ys *= 255.0 * position_weight / max(1, (image_height or h) - 1)
    return np.concatenate([colour, xs.reshape(-1, 1), ys.reshape(-1, 1)], axis=1)


def pixel_band(url, top, image_height, position_weight=None, storage_options=None):
    """Pixel features (see :func:`image_features`) of a staged band starting at row ``top``."""
    return image_features(_read_array(url, storage_options), position_weight, top, image_height)


def label_band(url, top, image_height, position_weight, model, out_url, storage_options=None):
    """Label the pixels of a staged band, write the labels (uint8, shape (rows, width)) to
    ``out_url``; returns the pixel count of every segment in the band."""
    from .sources import filesystem

    rgb = _read_array(url, storage_options)
    X = image_features(rgb, position_weight, top, image_height)
    labels = np.asarray(model.predict(X)).astype(np.uint8).reshape(rgb.shape[:2])
    fs, path = filesystem(out_url, storage_options)
    _write_array(fs, path, labels)
    return np.bincount(labels.ravel(), minlength=int(model.n_components))


def _png_chunk(kind, data=b""):
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_segment_files(label_urls, width, height, colours, labels_url, image_url,
                        storage_options=None, compress_level=6):
    """Assemble the labelled bands, in order, into the label array ``labels_url`` (.npy, uint8,
    shape (height, width)) and the segment map ``image_url`` (palette PNG: palette = the
    segments' colours, index = label), both written as streams: memory holds one band."""
    import struct
    import zlib

    from .sources import filesystem

    colours = np.asarray(colours, dtype=np.uint8).reshape(-1, 3)
    if not 1 <= len(colours) <= 256:
        raise ValueError(f"a palette PNG holds 1 to 256 colours, not {len(colours)}")
    lfs, lpath = filesystem(labels_url, storage_options)
    pfs, ppath = filesystem(image_url, storage_options)
    rows = 0
    with lfs.open(lpath, "wb") as lf, pfs.open(ppath, "wb") as pf:
        np.lib.format.write_array_header_1_0(
            lf, {"descr": "|u1", "fortran_order": False, "shape": (int(height), int(width))})
        pf.write(_PNG_SIGNATURE
                 + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
                 + _png_chunk(b"PLTE", colours.tobytes()))
        z = zlib.compressobj(compress_level)
        for url in label_urls:
            labels = _read_array(url, storage_options)
            if labels.ndim != 2 or labels.shape[1] != width:
                raise ValueError(f"labels of shape {labels.shape} in {url}; the image is {width} wide")
            rows += labels.shape[0]
            lf.write(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
            lines = np.zeros((labels.shape[0], width + 1), np.uint8)  # filter type 0 per row
            lines[:, 1:] = labels
            data = z.compress(lines.tobytes())
            if data:
                pf.write(_png_chunk(b"IDAT", data))
        pf.write(_png_chunk(b"IDAT", z.flush()) + _png_chunk(b"IEND"))
        if rows != height:
            raise ValueError(f"the labelled bands hold {rows} rows; the image has {height}")
