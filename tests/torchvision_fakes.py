"""Tiny CIFAR-10 and STL-10 in torchvision's own file formats, served over local HTTP.

Lets tests run torchvision's real download, checksum, extraction and parsing code
without internet: write a fake archive, serve it from 127.0.0.1 and point the data set
class at it (``file://`` URLs cannot be used: torchvision's downloader reads
``response.length``, which urllib's file responses lack).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def tar_gz(folder: Path, archive: Path) -> Path:
    """Pack ``folder`` into ``archive`` with the folder name at the top."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def write_fake_cifar10(src: Path, seed: int = 0) -> dict[str, object]:
    """A 5 x 2 train + 3 test CIFAR-10 in torchvision's pickle format, packed as .tar.gz.

    Returns the archive path, md5 of every file, and the raw (N, 3072) rows and labels.
    """
    rng = np.random.default_rng(seed)
    base = src / "cifar-10-batches-py"
    base.mkdir(parents=True)
    md5s: dict[str, str] = {}

    def dump(name: str, obj: dict[str, object]) -> None:
        (base / name).write_bytes(pickle.dumps(obj))
        md5s[name] = md5(base / name)

    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 2).tolist()
        dump(f"data_batch_{i}", {"data": rows, "labels": labels})
        train_rows.append(rows)
        train_labels += labels
    test_rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, 3).tolist()
    dump("test_batch", {"data": test_rows, "labels": test_labels})
    class_names = [f"class{i}" for i in range(10)]
    dump("batches.meta", {"label_names": class_names})

    archive = tar_gz(base, src / "cifar-10-python.tar.gz")
    return {
        "archive": archive,
        "md5s": md5s,
        "train": (np.concatenate(train_rows), train_labels),
        "test": (test_rows, test_labels),
        "classes": class_names,
    }


Serve = Callable[[Path], str]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_files(monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """``serve(path)`` -> an http://127.0.0.1 URL of that file, served until the test ends."""
    monkeypatch.setenv("no_proxy", "*")  # never send the local requests through a proxy
    monkeypatch.setenv("NO_PROXY", "*")
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(path: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(path.parent))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/{path.name}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def patch_cifar10(monkeypatch: pytest.MonkeyPatch, fake: dict[str, object], serve: Serve) -> None:
    """Point torchvision's CIFAR10 at the served fake archive and its checksums."""
    md5s = fake["md5s"]
    archive = fake["archive"]
    assert isinstance(md5s, dict) and isinstance(archive, Path)
    cls = tvd.CIFAR10
    monkeypatch.setattr(cls, "url", serve(archive))
    monkeypatch.setattr(cls, "tgz_md5", md5(archive))
    monkeypatch.setattr(
        cls, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)]
    )
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5s["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s["batches.meta"]})


def write_fake_stl10(src: Path, seed: int = 0) -> dict[str, object]:
    """A 4 train + 3 test + 5 unlabelled STL-10 in torchvision's binary format, as .tar.gz.

    Images are generated as (N, 3, 96, 96) = (N, C, row, column) and written column-major
    per channel, as in the real STL-10 files.
    """
    rng = np.random.default_rng(seed)
    base = src / "stl10_binary"
    base.mkdir(parents=True)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)

    def write_x(name: str, x: np.ndarray) -> None:
        (base / name).write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())

    def write_y(name: str, y: np.ndarray) -> None:
        (base / name).write_bytes((y + 1).astype(np.uint8).tobytes())  # stored 1-based

    train_x, test_x, unlabeled_x = images(4), images(3), images(5)
    train_y, test_y = rng.integers(0, 10, 4), rng.integers(0, 10, 3)
    write_x("train_X.bin", train_x)
    write_y("train_y.bin", train_y)
    write_x("test_X.bin", test_x)
    write_y("test_y.bin", test_y)
    write_x("unlabeled_X.bin", unlabeled_x)
    class_names = [f"thing{i}" for i in range(10)]
    (base / "class_names.txt").write_text("\n".join(class_names) + "\n")
    (base / "fold_indices.txt").write_text("\n".join("0 1 2" for _ in range(10)) + "\n")

    archive = tar_gz(base, src / "stl10_binary.tar.gz")
    names = ["train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin", "test_y.bin"]
    return {
        "archive": archive,
        "md5s": {n: md5(base / n) for n in names},
        "train": (train_x, train_y),
        "test": (test_x, test_y),
        "unlabeled": unlabeled_x,
        "classes": class_names,
    }


def patch_stl10(monkeypatch: pytest.MonkeyPatch, fake: dict[str, object], serve: Serve) -> None:
    """Point torchvision's STL10 at the served fake archive and its checksums."""
    md5s = fake["md5s"]
    archive = fake["archive"]
    assert isinstance(md5s, dict) and isinstance(archive, Path)
    cls = tvd.STL10
    monkeypatch.setattr(cls, "url", serve(archive))
    monkeypatch.setattr(cls, "tgz_md5", md5(archive))
    monkeypatch.setattr(
        cls, "train_list", [[n, md5s[n]] for n in ("train_X.bin", "train_y.bin", "unlabeled_X.bin")]
    )
    monkeypatch.setattr(cls, "test_list", [[n, md5s[n]] for n in ("test_X.bin", "test_y.bin")])
