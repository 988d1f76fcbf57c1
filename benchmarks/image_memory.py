"""Memory and time of the ``segment-image`` flow on a large image, against the image's size.

A PNG of ``--size`` pixels (default 6000x6000: regions of a few colours with noise) and a small
reference image from the same generator (``--reference``, default 1000x1000: two bands of the
same size as the large image's) are segmented by ``emdask segment-image`` run in a child
process (the flow process), each on a fresh local cluster of worker processes started here
(``--workers``, one thread each). Reported, all from the same run:

* peak resident memory of the flow process (``VmHWM``), and its rise over the same
  process on the small image, as ratios of the raw decoded image (width x height x 3 bytes);
* peak resident memory of every worker process (a fresh cluster for each run), as ratios of
  the same raw size and, for the small run, of its own raw size (memory bounded by the band,
  not the image: both runs' workers peak alike);
* the largest size the staged bands took in the destination (sampled), as a ratio of the raw size;
* time of the large run against the small one (from the flow's start to its manifest, as the
  published version records it), in total and per pixel.

Example::

    python benchmarks/image_memory.py
    python benchmarks/image_memory.py --size 12000x12000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's pipelines, here and in the worker processes

def peak_rss():
    """This process's peak resident set size in bytes: ``VmHWM`` of /proc/self/status on Linux.

    Not ``ru_maxrss``, which a process started by fork and exec inherits from its parent's peak
    at the fork (so a child of a big process would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


#: Run in the child: the flow through the command line, then the run's time (from the
#: flow's start to its manifest, as the version records it) and the process's peak memory.
_CHILD = r"""
import json, sys
from pipelines.cli import main
from pipelines.versions import open_destination
from image_memory import peak_rss
status = main(sys.argv[1:])
m = open_destination(sys.argv[3]).published().manifest if status == 0 else {"fit": {}}
print(json.dumps({"status": status, "seconds": m.get("seconds"), "fit": m["fit"].get("seconds"),
                  "passes": m["fit"].get("n_passes"), "maxrss": peak_rss()}))
"""

COLOURS = np.array([(30, 60, 200), (40, 160, 50), (240, 220, 40), (200, 40, 40)], np.int16)


class _Png16Writer:
    """A 16-bit RGB PNG written row band by row band (Pillow writes none): filter None, zlib
    level 1, one IDAT chunk per band."""

    def __init__(self, path, width, height):
        import struct
        import zlib

        self._struct, self._zlib = struct, zlib
        self._f = open(path, "wb")
        self._z = zlib.compressobj(1)
        self._f.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))

    def _chunk(self, kind, data):
        crc = self._zlib.crc32(kind + data) & 0xFFFFFFFF
        self._f.write(self._struct.pack(">I", len(data)) + kind + data + self._struct.pack(">I", crc))

    def write(self, rgb8):
        """Rows of 8-bit RGB, written as 16-bit samples whose high byte they are."""
        rows = (rgb8.astype(">u2") * 257).reshape(len(rgb8), -1).view(np.uint8)
        data = np.concatenate([np.zeros((len(rows), 1), np.uint8), rows], axis=1)
        self._chunk(b"IDAT", self._z.compress(data.tobytes()))

    def close(self):
        self._chunk(b"IDAT", self._z.flush())
        self._chunk(b"IEND", b"")
        self._f.close()


def make_image(path, width, height, seed=0, noise=8, depth=8):
    """A PNG of four colour regions (a lower half, a disc, a stripe) with Gaussian noise, of 8-
    or 16-bit samples (the 16-bit one's high bytes are the 8-bit one's)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = np.empty((height, width, 3), np.uint8) if depth == 8 else None
    writer = _Png16Writer(path, width, height) if depth == 16 else None
    xs = np.arange(width)
    step = max(1, 4_000_000 // width)
    for a in range(0, height, step):
        ys = np.arange(a, min(a + step, height))[:, None]
        label = np.where(ys >= height // 2, 1, 0) * np.ones_like(xs)
        disc = (xs - width / 3) ** 2 + (ys - height / 3) ** 2 < (min(width, height) / 5) ** 2
        label[disc] = 2
        label[(xs[None, :] > 0.75 * width) & (xs[None, :] < 0.85 * width) & (ys < 0.9 * height)] = 3
        noisy = COLOURS[label] + rng.normal(0, noise, (len(ys), width, 3))
        band = np.clip(noisy, 0, 255).astype(np.uint8)
        if writer is not None:
            writer.write(band)
        else:
            rgb[a:a + len(ys)] = band
    if writer is not None:
        writer.close()
    else:
        Image.fromarray(rgb).save(path, compress_level=1)
    return os.path.getsize(path)


def _folder_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class StagingWatch:
    """Samples the bytes under the destination's ``versions/*/work`` folders in a thread."""

    def __init__(self, dest, interval=0.1):
        self.dest, self.interval, self.peak = Path(dest), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            for work in self.dest.glob("versions/*/work"):
                self.peak = max(self.peak, _folder_bytes(work))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_flow(image, dest, args):
    """Run the flow on a fresh local cluster; its results, and the peak RSS of every worker."""
    from distributed import Client, LocalCluster

    argv = ["segment-image", str(image), str(dest), "--max-iter", str(args.max_iter),
            "--max-pixels", str(10**12)]
    argv += ["-k", str(args.components)] if args.components else ["--k-range", args.k_range]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks"),
                                          os.environ.get("PYTHONPATH", "")])}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        idle = _worker_peaks(client)
        with StagingWatch(dest) as watch:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, *argv, "--dask-address", cluster.scheduler_address],
                cwd=REPO, env=env, capture_output=True, text=True)
        workers = _worker_peaks(client)
    log = done.stdout + done.stderr
    Path(f"{dest}.log").write_text(log)
    if done.returncode != 0 or not done.stdout.strip():
        sys.exit(f"the flow failed:\n{log[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["status"] != 0:
        sys.exit(f"the flow failed (status {result['status']}):\n{log[-4000:]}")
    staging = re.search(r"decoded [\d,]+ pixels into (\d+) bands .* in (.+?)\s*$", log, re.M)
    result.update(staged=watch.peak, workers=sorted(workers.values()), idle=max(idle.values()),
                  bands=int(staging.group(1)), staging=staging.group(2))
    return result


def _worker_peaks(client):
    return client.run(peak_rss)


def _size(text):
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=(6000, 6000), metavar="WxH")
    parser.add_argument("--reference", type=_size, default=(1000, 1000), metavar="WxH")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("-k", "--components", type=int, default=3,
                        help="segments (0: search --k-range by BIC)")
    parser.add_argument("--k-range", default="2:4")
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--depth", type=int, choices=[8, 16], default=8,
                        help="bits a sample of the PNGs (16: a 16-bit RGB PNG, streamed too)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    from dask.utils import format_bytes

    tmp = Path(tempfile.mkdtemp(prefix="emdask-image-bench-"))
    try:
        (w, h), (rw, rh) = args.size, args.reference
        started = time.perf_counter()
        big_bytes = make_image(tmp / "big.png", w, h, depth=args.depth)
        make_image(tmp / "small.png", rw, rh, depth=args.depth)
        raw, raw_small = w * h * 3, rw * rh * 3
        print(f"image: {w}x{h} ({w * h:,} pixels), {args.depth}-bit PNG "
              f"{format_bytes(big_bytes)}, raw decoded (8-bit) "
              f"RGB {format_bytes(raw)} (float64 features: {format_bytes(raw * 8)}); reference "
              f"{rw}x{rh}; generated in {time.perf_counter() - started:.0f} s")
        small = run_flow(tmp / "small.png", tmp / "out-small", args)
        big = run_flow(tmp / "big.png", tmp / "out-big", args)
        print(f"flow process peak RSS: {format_bytes(big['maxrss'])} = "
              f"{big['maxrss'] / raw:.2f} x raw image; rise over the {rw}x{rh} run: "
              f"{(big['maxrss'] - small['maxrss']) / 2**20:+.1f} MiB = "
              f"{(big['maxrss'] - small['maxrss']) / raw:+.3f} x raw image")
        mib = ", ".join(format_bytes(v) for v in small["workers"])
        print(f"worker peak RSS ({args.workers} workers, a fresh cluster per run): "
              f"{', '.join(format_bytes(v) for v in big['workers'])} = "
              f"{', '.join(f'{v / raw:.2f}' for v in big['workers'])} x raw image; "
              f"{rw}x{rh} run: {mib} = "
              f"{', '.join(f'{v / raw_small:.1f}' for v in small['workers'])} x its raw image; "
              f"an idle worker: {format_bytes(big['idle'])}")
        print(f"staged bands, largest: {format_bytes(big['staged'])} = "
              f"{big['staged'] / raw:.2f} x raw image (removed before the commit)")
        per_pixel = (big["seconds"] / (w * h)) / (small["seconds"] / (rw * rh))
        print(f"time: {big['seconds']:.1f} s against {small['seconds']:.1f} s for {rw}x{rh} = "
              f"{big['seconds'] / small['seconds']:.1f} x for {w * h / (rw * rh):.0f} x the "
              f"pixels ({per_pixel:.2f} x the time per pixel); large run: decoding into "
              f"{big['bands']} bands {big['staging']}, fit {big['fit']:.1f} s over "
              f"{big['passes']} passes ({big['fit'] / big['passes']:.2f} s a pass), the rest "
              f"{big['seconds'] - big['fit']:.1f} s")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
