"""Reading WebDataset shards back with tarfile alone, for the shard tests."""

from __future__ import annotations

import tarfile

from dsmae.data.shards import shard_urls


def members(pattern: str) -> dict[tuple[str, str], dict[str, bytes]]:
    """Every sample of the shards, read with tarfile: (shard, key) -> {ext: bytes}."""
    samples: dict[tuple[str, str], dict[str, bytes]] = {}
    for url in shard_urls(pattern):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault((url, key), {})[ext] = tar.extractfile(member).read()
    return samples
