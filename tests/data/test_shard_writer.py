"""``dsmae shards``: a folder written as WebDataset shards, every image once with its bytes
and label, reproducibly."""

import torch
from shard_reading import members

from dsmae.cli import main
from dsmae.data.decoding import decode_files
from dsmae.data.shards import decode_image


def test_dsmae_shards_keeps_every_image_once_with_its_bytes_and_label(
    cifar_folder, tmp_path, capsys
):
    out = tmp_path / "shards"
    assert main(["shards", str(cifar_folder), str(out), "--shard-size", "64"]) == 0
    printed = capsys.readouterr().out
    pattern = f"{out}/shard-{{000000..000006}}.tar"  # 400 train images / 64 per shard
    assert f"400 images (10 classes) in 7 shard(s): {pattern}" in printed
    assert f"--data '{pattern}' --set data.samples_per_epoch=400" in printed

    samples = members(pattern)
    assert len(samples) == 400 and len({key for _, key in samples}) == 400  # unique keys
    classes = sorted(p.name for p in (cifar_folder / "train").iterdir())
    originals = {p.read_bytes(): classes.index(p.parent.name)
                 for p in (cifar_folder / "train").glob("*/*.jpg")}  # fmt: skip
    assert {s["jpg"]: int(s["cls"]) for s in samples.values()} == originals
    # written in a seeded random order: the first shard mixes the classes
    first = [int(s["cls"]) for (url, _), s in samples.items() if url.endswith("000000.tar")]
    assert len(set(first)) >= 8
    # streamed images are decoded, resized and centre-cropped exactly as the folder's
    paths = {p.read_bytes(): p for p in (cifar_folder / "train").glob("*/*.jpg")}
    jpegs = [sample["jpg"] for sample in list(samples.values())[:8]]
    folder, _ = decode_files([paths[jpeg] for jpeg in jpegs], channels=3, size=24)
    streamed = torch.stack([torch.from_numpy(decode_image(jpeg, "RGB", 24)) for jpeg in jpegs])
    assert torch.equal(streamed, folder)

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["shards", str(cifar_folder), str(out), "--shard-size", "64"]) == 2
    assert "holds 7 shard(s) already" in capsys.readouterr().err
    assert main(["shards", str(cifar_folder), str(out), "--shard-size", "64", "--overwrite"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # reproducible bytes
    assert main(["shards", str(cifar_folder), str(out), "--shard-size", "200", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
