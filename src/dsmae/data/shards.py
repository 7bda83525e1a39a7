"""WebDataset shards: pre-training images streamed from tar files, for data sets larger than
one machine's memory or disk. ``data.source`` names them as WebDataset does: a brace
pattern of local files (``shards/train-{000000..000099}.tar``), URLs
(``https://host/train-{000000..000099}.tar``), or a ``pipe:`` command; several patterns
are joined by ``::``. :mod:`dsmae.data.shard_writer` writes them from an image folder.

The stream of a process (:class:`ShardStream`)
    An epoch is ``data.samples_per_epoch`` images: ``samples_per_epoch // train.batch_size``
    steps. Its shard order is ``epoch_order(number of shards, seed, epoch)``, the permutation
    the in-memory path draws for images; process ``r`` of ``W`` takes shards ``r``, ``r + W``,
    ... of it, so the processes read disjoint shards, and deals them in turn to its
    ``min(data.workers, its shards)`` readers (one DataLoader worker each). A reader goes
    over its shards pass after pass until the epoch ends, each pass in a seeded order and
    through a seeded shuffle buffer of ``data.shuffle_buffer`` samples (:func:`buffer_shuffle`,
    emptied at the end of the pass), decodes each image, resizes and centre-crops it exactly
    as image folders are read, and batches this process's share of the global batch. Step
    ``i`` of an epoch takes reader ``i % readers``'s next batch. The crops, flips and
    corruption of a step are drawn for the global batch from ``(seed, step)`` as always.

Resume
    A reader's images depend on (the shards, ``train.seed``, ``data.shuffle_buffer``, the
    epoch, the process, the number of processes, ``data.workers``) alone, never on time or on
    a worker's identity. A run resumed at step ``k`` of an epoch makes each reader pass over,
    undecoded, the images of the batches it gave before step ``k``, so on the same number of
    processes (``data.workers`` must match anyway) it continues exactly: the same batches,
    weights identical bit for bit on CPU. Nothing is repeated or skipped. At an epoch's end
    the number of processes may change freely; in the middle of an epoch the engine refuses
    to continue on another number unless forced, as the shards are then dealt anew: each new
    reader passes over its share of the images consumed, but which images of that epoch it
    repeats or leaves out is not bounded (the next epochs are those of a run started with
    the new number of processes).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import re
import subprocess
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, count, islice
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsmae.config import Config, ConfigError
from dsmae.data.decoding import image_array, image_error
from dsmae.data.folder_layout import IMAGE_EXTENSIONS
from dsmae.data.images import DataError
from dsmae.data.pipeline import epoch_order
from dsmae.preemption import leave_stopping_to

log = logging.getLogger(__name__)

STATS_IMAGES = 1024  # images measured for data.mean / data.std when they are unset ...
STATS_SHARDS = 8  # ... the first ones of this many shards, spread over the list
PREVIEW_IMAGES = 8  # images kept for the FLOP count and the denoising figure

IMAGE_KEYS: tuple[str, ...] = tuple(sorted(ext[1:] for ext in IMAGE_EXTENSIONS))
"""The entries of a sample that hold its image (WebDataset lower-cases them)."""

_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]+:")  # pipe:, https:, s3:, ... (not C:)
_INSTALL = 'pip install "dsmae[shards]"'

T = TypeVar("T")


def webdataset() -> ModuleType:
    """The ``webdataset`` package.

    Raises:
        DataError: it is not installed (the message says how to install it).
    """
    try:
        import webdataset
    except ImportError:
        raise DataError(
            f"reading WebDataset shards needs the webdataset package: {_INSTALL}"
        ) from None
    return webdataset


def shard_urls(source: str) -> list[str]:
    """The shards ``source`` names, in its order: its ``::``-separated patterns with their
    brace ranges expanded, as WebDataset expands them; ``~`` expanded in local paths.

    Raises:
        DataError: local shards that are not files (the first ones named), or no webdataset.
    """
    expanded = webdataset().shardlists.expand_urls(source)
    urls = [url if _SCHEME.match(url) else os.path.expanduser(url) for url in expanded]
    missing = [url for url in urls if not _SCHEME.match(url) and not os.path.isfile(url)]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(urls)} shards of {source!r} are not files: "
            f"{_listed(missing)}. Check the pattern (dsmae shards prints the one it wrote)."
        )
    return urls


def buffer_shuffle(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """``items`` in a random order that mixes ``size`` of them at a time: the first
    ``size`` fill a buffer, then each further item takes the place of one drawn from it,
    which is yielded; at the end the buffer empties in random order. No item comes out more
    than ``size - 1`` places before its own; ``size`` 1 keeps the order."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        buffer[k], item = item, buffer[k]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def decode_image(data: bytes, mode: str, size: int) -> np.ndarray:
    """An encoded image (any format and mode an image folder may hold) -> (C, size, size)
    uint8: converted to ``mode`` ("L" or "RGB"), its shorter side resized to ``size`` and
    the centre cropped, exactly as :mod:`dsmae.data.image_folders` reads image folders.

    Raises:
        Exception: whatever PIL raises for a file it cannot read.
    """
    with Image.open(io.BytesIO(data)) as raw:
        return image_array(raw, mode, size)


def stream_layout(world_size: int, workers: int) -> dict[str, int]:
    """How the shards of a stream are dealt, beyond what its config says: recorded in
    checkpoints, so that a resume knows whether it continues the same readers."""
    return {"processes": world_size, "workers": workers}


class ShardBatch(NamedTuple):
    """One step's images of a process, and where each came from."""

    images: torch.Tensor  # (B, C, H, W) uint8
    shards: list[str]  # the shard of each image (its URL or path)
    keys: list[str]  # its key in that shard


# one decoded image: (C, H, W) uint8, its shard, its key
Decoded = tuple[np.ndarray, str, str]


@dataclass(frozen=True)
class ShardStream:
    """The pre-training images of one process, streamed from WebDataset shards, one epoch
    at a time (see the module docstring).

    Attributes:
        urls: every shard, in the order the source lists them.
        batch: images per step of this process (its share of ``train.batch_size``).
        size: the model's image size; ``channels``: 1 or 3.
        seed: ``train.seed``.
        shuffle_buffer, workers, skip_bad: ``data.shuffle_buffer``, ``data.workers`` and
            ``data.skip_bad_images``.
        rank, world_size: this process and the number of processes.
        pin_memory: batches come in pinned memory (for a CUDA device).
    """

    urls: tuple[str, ...]
    batch: int
    size: int
    channels: int = 3
    seed: int = 0
    shuffle_buffer: int = 10_000
    workers: int = 4
    skip_bad: bool = False
    rank: int = 0
    world_size: int = 1
    pin_memory: bool = False

    @property
    def layout(self) -> dict[str, int]:
        """How its shards are dealt (:func:`stream_layout`)."""
        return stream_layout(self.world_size, self.workers)

    def readers(self, epoch: int) -> list[list[str]]:
        """The shards of each reader of this process in ``epoch``: this process's are every
        ``world_size``-th of the epoch's order, from the ``rank``-th, dealt in turn to
        ``min(workers, their number)`` readers (at least one)."""
        order = epoch_order(len(self.urls), self.seed, epoch).tolist()
        mine = [self.urls[i] for i in order[self.rank :: self.world_size]]
        n = max(1, min(self.workers, len(mine)))
        return [mine[r::n] for r in range(n)]

    def epoch(self, epoch: int, start: int, stop: int) -> Generator[ShardBatch, None, None]:
        """This process's batches ``start`` to ``stop - 1`` of ``epoch``, read by its
        readers in DataLoader workers (in this process for ``workers`` 0).

        Batch ``i`` is reader ``i % readers``'s next: each reader first passes over the
        batches it gave before ``start``, so a resumed epoch continues exactly.

        Raises:
            DataError: a shard or an image cannot be read (see :meth:`reader_batches`).
        """
        readers = self.readers(epoch)
        dataset = _EpochReaders(self, epoch, readers, start)
        workers = len(readers) if self.workers else 0
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            worker_init_fn=leave_stopping_to(os.getpid()),
        )
        batches = iter(loader)
        try:
            for item in islice(batches, stop - start):
                if isinstance(item, str):  # a reader's DataError, without the worker's traceback
                    raise DataError(item)
                yield item
        finally:
            del batches  # the DataLoader ends its workers now, whatever ended the epoch

    def reader_batches(
        self, epoch: int, reader: int, urls: Sequence[str], skip: int
    ) -> Iterator[ShardBatch]:
        """Batches of ``batch`` images of reader ``reader`` of ``epoch``, from its shards
        ``urls`` pass after pass, endlessly, after its first ``skip`` images.

        Without ``skip_bad`` every sample must hold a readable image, so the skipped ones
        are passed over undecoded; with it, they are decoded to know which ones count.

        Raises:
            DataError: a shard or an image cannot be read (unless ``skip_bad``), or a pass
                over ``urls`` finds no image.
        """
        passes = (self._pass(epoch, reader, urls, p) for p in count())
        if self.skip_bad:
            readable = (self._readable(samples, urls) for samples in passes)
            images = islice(chain.from_iterable(readable), skip, None)
        else:
            images = map(self._decoded, islice(chain.from_iterable(passes), skip, None))
        while True:
            arrays, shards, keys = zip(*islice(images, self.batch), strict=True)
            yield ShardBatch(torch.from_numpy(np.stack(arrays)), list(shards), list(keys))

    def _pass(self, epoch: int, reader: int, urls: Sequence[str], n: int) -> Iterator[dict]:
        """The samples of pass ``n`` of a reader over its shards ``urls``: the shards in an
        order and the samples through a shuffle buffer, both seeded by (seed, epoch, rank,
        reader, n)."""
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{reader}/{n}")
        shards = rng.sample(list(urls), len(urls))
        found = False
        for sample in buffer_shuffle(self._read(shards), self.shuffle_buffer, rng):
            found = True
            yield sample
        if not found:
            raise DataError(f"no samples in the shards {_listed(urls)}: are they tar files?")

    def _readable(self, samples: Iterable[dict], urls: Sequence[str]) -> Iterator[Decoded]:
        """The images of ``samples`` that decode (``skip_bad``), at least one."""
        found = False
        for decoded in filter(None, map(self._decoded_or_none, samples)):
            found = True
            yield decoded
        if not found:
            raise DataError(f"no readable image in the shards {_listed(urls)}")

    def _read(self, urls: Iterable[str]) -> Iterator[dict]:
        """The samples of the shards ``urls`` in turn, as WebDataset reads them (a dict of
        the sample's files by extension, ``__key__`` and ``__url__``). With ``skip_bad`` an
        unreadable shard ends with a warning."""
        samples = webdataset().tariterators.tarfile_samples
        for url in urls:
            try:
                yield from samples([{"url": url}])
            except Exception as err:  # WebDataset and the tar module raise many types
                if not self.skip_bad:
                    raise DataError(
                        f"Cannot read shard {url}: {_reason(err)}. Fix or remove it, or pass "
                        "--skip-bad-images to skip unreadable shards and images."
                    ) from None
                log.warning("skipped the rest of unreadable shard %s: %s", url, _reason(err))

    def _decoded(self, sample: dict) -> Decoded:
        """The sample's image, decoded at the model's size.

        Raises:
            DataError: it has no image, or one that cannot be read.
        """
        key, url = sample["__key__"], sample["__url__"]
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        if ext is None:
            files = ", ".join(k for k in sample if not k.startswith("__"))
            raise DataError(f"sample {key} of shard {url} has no image (it holds: {files})")
        try:
            image = decode_image(sample[ext], "L" if self.channels == 1 else "RGB", self.size)
        except Exception as err:  # PIL raises many types for bad files
            raise DataError(
                f"Cannot read image {key}.{ext} of shard {url}: {image_error(err)}. Remove or "
                "replace it, or pass --skip-bad-images to skip unreadable images and shards."
            ) from None
        return image, url, key

    def _decoded_or_none(self, sample: dict) -> Decoded | None:
        """:meth:`_decoded`, or None with a warning where it fails and ``skip_bad``."""
        try:
            return self._decoded(sample)
        except DataError as err:
            if not self.skip_bad:
                raise
            log.warning("skipped: %s", str(err).split(". Remove")[0])
            return None

    def sample_images(self, n: int, shards: int = 1) -> torch.Tensor:
        """(m, C, size, size) uint8, m <= ``n``: the first ``ceil(n / k)`` images of each of
        ``k = min(shards, len(urls))`` shards spread evenly over the list, as it is given
        (not shuffled): the same images on every process.

        Raises:
            DataError: no image could be read.
        """
        k = min(shards, len(self.urls))
        picks = sorted({round(i * (len(self.urls) - 1) / max(1, k - 1)) for i in range(k)})
        per_shard = -(-n // len(picks))
        arrays: list[np.ndarray] = []
        for i in picks:
            with closing(self._read([self.urls[i]])) as samples:
                decoded = filter(None, map(self._decoded_or_none, samples))
                arrays += [image for image, _, _ in islice(decoded, per_shard)]
        if not arrays:
            raise DataError(f"no readable image in the shards {_listed(self.urls)}")
        return torch.from_numpy(np.stack(arrays[:n]))

    def describe(self, samples_per_epoch: int) -> str:
        """The data of a run, in words, for its first log line."""
        return f"{len(self.urls)} WebDataset shards, streamed ({samples_per_epoch} images/epoch)"


class _EpochReaders(IterableDataset):
    """The readers of one epoch of a :class:`ShardStream`, resumed at step ``start``: the
    DataLoader's worker ``w`` runs reader ``(w + start) % readers``, so that its first batch
    is the batch ``start`` of the epoch; each reader passes over the batches it gave before.
    A reader's DataError comes out as its message (a ``str``), for :meth:`ShardStream.epoch`
    to raise without the worker's traceback."""

    def __init__(self, stream: ShardStream, epoch: int, readers: list[list[str]], start: int):
        super().__init__()
        self.stream, self.epoch, self.readers, self.start = stream, epoch, readers, start

    def __iter__(self) -> Iterator[ShardBatch | str]:
        info = get_worker_info()
        n = len(self.readers)
        reader = ((0 if info is None else info.id) + self.start) % n
        skip = len(range(reader, self.start, n)) * self.stream.batch
        try:
            yield from self.stream.reader_batches(self.epoch, reader, self.readers[reader], skip)
        except DataError as err:
            yield str(err)


def open_stream(
    cfg: Config, rank: int = 0, world_size: int = 1, pin_memory: bool = False
) -> ShardStream:
    """The stream of process ``rank`` of ``world_size`` over the shards of
    ``cfg.data.source``, for a (resolved) pre-training config.

    Raises:
        DataError: local shards missing, fewer shards than processes, or no webdataset.
        ConfigError: ``data.samples_per_epoch`` is less than one batch.
    """
    d, t = cfg.data, cfg.train
    urls = shard_urls(d.source)
    if len(urls) < world_size:
        raise DataError(
            f"{d.source!r} names {len(urls)} shard(s) for {world_size} processes, which read "
            "disjoint shards: write at least one per process (dsmae shards --shard-size)"
        )
    if d.samples_per_epoch is None or d.samples_per_epoch < t.batch_size:
        raise ConfigError(
            f"data.samples_per_epoch={d.samples_per_epoch} is less than one batch "
            f"(train.batch_size={t.batch_size})"
        )
    stream = ShardStream(
        tuple(urls),
        t.batch_size // world_size,
        cfg.model.img_size,
        cfg.model.in_chans,
        t.seed,
        d.shuffle_buffer,
        d.workers,
        d.skip_bad_images,
        rank,
        world_size,
        pin_memory,
    )
    readers = stream.readers(0)
    log.info(
        "process %d of %d streams %d of %d shards with %d reader(s) (data.workers=%d), "
        "shuffle buffer %d",
        rank,
        world_size,
        sum(map(len, readers)),
        len(urls),
        len(readers),
        d.workers,
        d.shuffle_buffer,
    )
    return stream


# WebDataset's error for a pipe: URL (``pipe:CMD``) whose command fails: "((args, kwargs)):
# exit N (read) {...}", the text of a tuple of subprocess arguments
_PIPE_EXIT = re.compile(r"^\(.*\): exit (-?\d+)", re.DOTALL)


def _reason(err: Exception) -> str:
    """A read error in words. WebDataset appends the stream and the URL to its arguments
    (a pipe's stream holds its command's process), ``" @ <stream>"`` to its message, and
    names a failed pipe by its subprocess arguments."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    for arg in err.args[1:]:
        proc = getattr(arg, "proc", None)
        if isinstance(proc, subprocess.Popen):  # the command of a pipe: URL
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # it may end just after its output did
            if proc.returncode:
                return f"its command exited with status {proc.returncode}"
    text = str(err.args[0]) if err.args else type(err).__name__
    text = text.split(" @ ")[0]
    failed = _PIPE_EXIT.match(text)
    if failed is not None:
        return f"its command exited with status {failed.group(1)}"
    if text.endswith(": couldn't open") and text.startswith("("):
        return "its command could not be started"
    return text


def _listed(items: Sequence[Any], most: int = 3) -> str:
    """The first ``most`` of ``items``, and how many more."""
    shown = ", ".join(str(item) for item in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")
