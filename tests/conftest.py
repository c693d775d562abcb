"""Fixtures shared by the test files: tiny real MNIST data in IDX format, script runners."""
import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import SHIPPED_MNIST, load_mnist

REPO = Path(__file__).resolve().parents[1]


def write_idx_file(path, array):
    """Write `array` as a gzipped unsigned-byte IDX file (MNIST's on-disk format)."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


@pytest.fixture(scope="session")
def write_idx():
    return write_idx_file


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """400 train and 200 test real digits from the shipped test split, written as IDX files."""
    root = tmp_path_factory.mktemp("tiny_mnist")
    x, y = load_mnist(SHIPPED_MNIST, train=False)
    images = (x[:, 0] * 255).round().numpy()
    for split, sl in (("train", slice(0, 400)), ("t10k", slice(400, 600))):
        write_idx_file(root / f"{split}-images-idx3-ubyte.gz", images[sl])
        write_idx_file(root / f"{split}-labels-idx1-ubyte.gz", y[sl].numpy())
    return root


TINY_FLAGS = ("--batch-size", "64", "--subsample", "32", "--quiet")
"""Settings of the short test runs: small batches for 400 images, small test subsamples."""


@pytest.fixture(scope="session")
def run_script(tiny_mnist):
    """Run an MNIST script's main() on the tiny data into `out`; returns its metrics.json."""
    def run(script, out, *flags):
        script.main(["--data-dir", str(tiny_mnist), *TINY_FLAGS, "--out", str(out), *flags])
        return json.loads((Path(out) / "metrics.json").read_text())
    return run


@pytest.fixture(scope="session")
def cli():
    """Run `python SCRIPT args...` in the repository; returns the CompletedProcess."""
    def call(script, *args, **kwargs):
        return subprocess.run([sys.executable, str(REPO / script), *map(str, args)],
                              capture_output=True, text=True, cwd=kwargs.pop("cwd", REPO),
                              **kwargs)
    return call


def comparable(metrics):
    """metrics.json without what differs between identical runs: time, per-step history and the
    (step, device, precision) segments a resumed run was trained in."""
    return {k: v for k, v in metrics.items()
            if k not in ("wall_time_s", "train_history", "segments")}


@pytest.fixture(scope="session")
def same_metrics():
    return lambda a, b: comparable(a) == comparable(b)
