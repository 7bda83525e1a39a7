"""``dsmae.extract_features``: the features of any images, from a checkpoint, an export or
an encoder, each image made what the encoder saw in pre-training; and ``dsmae features``
(``folder_features``), which writes them for a folder."""

import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dsmae
from dsmae.checkpoint import Checkpoint
from dsmae.config import ConfigError
from dsmae.data.augment import normalize, to_unit_float
from dsmae.data.folder_layout import find_image_files
from dsmae.data.images import DataError
from dsmae.data.sources import open_source
from dsmae.evaluation.frozen import encoded, pooled_features
from dsmae.export import export_encoder
from dsmae.features import folder_features


@pytest.fixture(scope="module")
def checkpoint(digits_run) -> Checkpoint:
    return Checkpoint.read(digits_run / "last.pt")


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory):
    return export_encoder(digits_run / "last.pt", tmp_path_factory.mktemp("export") / "e")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """The real 8x8 digits of the test split: (449, 1, 8, 8) uint8."""
    return open_source("digits", "test", root=".", channels=1).images


@pytest.fixture(scope="module")
def photos(cifar_folder):
    """A folder of real CIFAR-10 photos (RGB 32x32 JPEGs, in class sub-folders)."""
    return cifar_folder / "test"


def test_every_source_gives_the_same_features(digits_run, checkpoint, exported, digits):
    path = digits_run / "last.pt"
    expected = dsmae.extract_features(path, digits, device="cpu")
    assert expected.shape == (449, 32) and expected.dtype == torch.float32
    for source in (str(path), checkpoint, exported, str(exported), dsmae.load_encoder(exported),
                   dsmae.load_encoder(path)):  # fmt: skip
        got = dsmae.extract_features(source, digits, device="cpu")
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=str(type(source)))


def test_images_are_what_the_encoder_saw_in_pretraining(checkpoint, digits, photos):
    cfg, encoder = checkpoint.config, checkpoint.encoder().eval()
    # a tensor: as the linear probe and k-NN see their splits
    cpu = torch.device("cpu")
    torch.testing.assert_close(
        dsmae.extract_features(checkpoint, digits, device="cpu"),
        encoded(encoder, digits, cfg, "avg", cpu),
    )
    # a folder: decoded as pre-training decodes a folder data set, then normalised
    trained_on = open_source(str(photos.parent), "test", root=".", channels=1, size=8).images
    x = normalize(to_unit_float(trained_on), cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        expected = pooled_features(encoder, x, "avg")
    torch.testing.assert_close(dsmae.extract_features(checkpoint, photos, device="cpu"), expected)


def test_every_form_of_images_gives_the_same_rows(checkpoint, photos):
    files = find_image_files(photos)[:5]
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("L")))[None]
                          for f in files])  # fmt: skip  # (5, 1, 32, 32) uint8
    expected = dsmae.extract_features(checkpoint, files, device="cpu")
    forms = {
        "paths as str": [str(f) for f in files],
        "PIL images": [Image.open(f) for f in files],
    }
    for name, images in forms.items():
        got = dsmae.extract_features(checkpoint, images, device="cpu")
        assert torch.equal(got, expected), name
    one = dsmae.extract_features(checkpoint, files[0], device="cpu")  # a batch of 1: its own
    torch.testing.assert_close(one, expected[:1], atol=1e-6, rtol=0)  # float rounding
    assert torch.equal(dsmae.extract_features(checkpoint, Image.open(files[0])), one)
    # tensors are resized as the evaluations resize them: whole, uint8 or [0, 1] floats
    from_uint8 = dsmae.extract_features(checkpoint, pixels, device="cpu")
    torch.testing.assert_close(from_uint8, encoded(
        checkpoint.encoder(), pixels, checkpoint.config, "avg", torch.device("cpu")
    ))  # fmt: skip
    assert torch.equal(dsmae.extract_features(checkpoint, pixels.float() / 255), from_uint8)
    assert torch.equal(dsmae.extract_features(checkpoint, pixels[:1]), dsmae.extract_features(
        checkpoint, pixels[0]
    ))  # fmt: skip
    folder = dsmae.extract_features(checkpoint, photos, device="cpu")
    assert len(folder) == len(find_image_files(photos))
    torch.testing.assert_close(folder[:5], expected, atol=1e-6, rtol=0)


def test_pool_batch_size_teacher(digits_run, checkpoint, digits, tmp_path):
    avg = dsmae.extract_features(checkpoint, digits, batch_size=1000)
    torch.testing.assert_close(dsmae.extract_features(checkpoint, digits, batch_size=7), avg)
    cls = dsmae.extract_features(checkpoint, digits, pool="cls")
    assert cls.shape == avg.shape and not torch.allclose(cls, avg)
    teacher = dsmae.extract_features(checkpoint, digits, teacher=True)
    assert not torch.allclose(teacher, avg)
    exported = export_encoder(checkpoint, tmp_path / "t", teacher=True)
    torch.testing.assert_close(dsmae.extract_features(exported, digits), teacher)


def test_an_encoder_given_is_left_as_it_was(exported, digits):
    encoder = dsmae.load_encoder(exported).train()
    dsmae.extract_features(encoder, digits[:4], device="cpu")
    assert encoder.training


def test_what_cannot_be_done_is_said(checkpoint, exported, digits, photos, tmp_path):
    with pytest.raises(ConfigError, match="pool must be one of avg, cls, not 'max'"):
        dsmae.extract_features(checkpoint, digits, pool="max")
    with pytest.raises(ConfigError, match="teacher=True needs a checkpoint"):
        dsmae.extract_features(exported, digits, teacher=True)
    with pytest.raises(ConfigError, match="does not record the input it was trained on"):
        dsmae.extract_features(checkpoint.encoder(), digits)  # a bare ViT: which mean, std?
    with pytest.raises(
        ConfigError, match="must be a checkpoint, an export folder or an encoder, not dict"
    ):
        dsmae.extract_features(checkpoint.state, digits)
    with pytest.raises(ConfigError, match="device 'gpu' is not one of"):
        dsmae.extract_features(checkpoint, digits, device="gpu")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        dsmae.extract_features(tmp_path / "missing.pt", digits)
    wrong = {
        r"must be \(N, 1, H, W\) or \(1, H, W\) for this encoder, not \(2, 3, 8, 8\)":
            torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
        r"pixels in \[0, 1\], not normalised ones": torch.randn(2, 1, 8, 8),
        "must be uint8 or float, not torch.int64": torch.zeros(2, 1, 8, 8, dtype=torch.int64),
        "not a mix": [Image.new("L", (8, 8)), find_image_files(photos)[0]],
        "an empty list": [],
    }  # fmt: skip
    for message, images in wrong.items():
        with pytest.raises(DataError, match=message):
            dsmae.extract_features(checkpoint, images)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="Cannot read image") as bad:
        dsmae.extract_features(checkpoint, [tmp_path / "bad.png"])
    assert "--skip-bad-images" not in str(bad.value)  # a flag of the command, not of the API


# ------------------------------------------------------------------ dsmae features


def test_folder_features_writes_rows_and_their_files_in_order(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(("b.png", "a.png", "sub/c.png")):
        pixels = np.full((12, 10, 3), 60 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    out, names = folder_features(checkpoint, folder, tmp_path / "f.npy", device="cpu")
    assert names == tmp_path / "f.files.txt"
    assert names.read_text().splitlines() == ["a.png", "b.png", "sub/c.png"]
    feats = np.load(out)
    assert feats.shape == (3, 32) and feats.dtype == np.float32
    teacher = folder_features(checkpoint, folder, tmp_path / "t.npy", teacher=True, device="cpu")
    assert not np.allclose(np.load(teacher[0]), feats)  # the EMA teacher's own weights
    # the command's rows are the API's
    assert np.array_equal(feats, dsmae.extract_features(checkpoint, folder).numpy())


def test_a_file_name_that_is_no_utf8_is_listed_as_its_bytes(checkpoint, tmp_path, capsys):
    from dsmae.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate((b"caf\xe9.png", b"plain.png")):  # a Latin-1 name, then UTF-8
        path = os.path.join(os.fsencode(folder), name)
        Image.fromarray(np.full((12, 10, 3), 60 * i, dtype=np.uint8)).save(os.fsdecode(path))
    out = tmp_path / "f.npy"
    command = ["features", "--checkpoint", str(checkpoint.path), "--data", str(folder),
               "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(command) == 0, capsys.readouterr().err
    listed = (tmp_path / "f.files.txt").read_bytes().splitlines()
    assert listed == [b"caf\xe9.png", b"plain.png"]  # the names on disk, byte for byte
    names = (tmp_path / "f.files.txt").read_text(errors="surrogateescape").splitlines()
    assert [(folder / n).is_file() for n in names] == [True, True]
    assert np.load(out).shape == (2, 32)


def test_folder_features_skips_unreadable_images_and_lists_the_others(checkpoint, photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = find_image_files(photos)[:2]
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "0-broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="--skip-bad-images"):
        folder_features(checkpoint, folder, tmp_path / "f.npy")
    out, names = folder_features(checkpoint, folder, tmp_path / "f.npy", skip_bad_images=True)
    assert names.read_text().splitlines() == sorted(f.name for f in good)
    expected = dsmae.extract_features(checkpoint, sorted(folder / f.name for f in good))
    assert np.array_equal(np.load(out), expected.numpy())


def test_batch_sizes_and_images_that_cannot_be_are_refused_by_name(checkpoint, digits):
    for batch_size in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size must be a positive integer") as bad:
            dsmae.extract_features(checkpoint, digits[:2], batch_size=batch_size)
        assert bad.value.key == "batch_size"
    with pytest.raises(DataError, match="holds no pixels: no images"):
        dsmae.extract_features(checkpoint, torch.zeros(0, 1, 8, 8))
    nan = torch.zeros(2, 1, 8, 8)
    nan[1, 0, 3, 3] = float("nan")  # once, these features were those of a black image
    with pytest.raises(DataError, match="holds NaN"):
        dsmae.extract_features(checkpoint, nan)


def test_an_exports_own_pooling_is_the_default(checkpoint, digits, tmp_path, caplog):
    by_cls = export_encoder(checkpoint, tmp_path / "cls", pool="cls")
    expected = dsmae.extract_features(checkpoint, digits, pool="cls")
    torch.testing.assert_close(dsmae.extract_features(by_cls, digits), expected)
    model = timm.create_model(f"local-dir:{by_cls}", pretrained=True).eval()
    x = normalize(to_unit_float(digits), checkpoint.config.data.mean, checkpoint.config.data.std)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)  # what timm gives
    assert "differs from the encoder's own" not in caplog.text
    avg = dsmae.extract_features(by_cls, digits, pool="avg")  # asked for: given, with a word
    torch.testing.assert_close(avg, dsmae.extract_features(checkpoint, digits, pool="avg"))
    assert "pool='avg' differs from the encoder's own 'cls'" in caplog.text


def test_features_never_replace_an_input_nor_an_existing_file_unasked(digits_run, tmp_path, capsys):
    from dsmae.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8)).save(folder / "a.png")
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes((digits_run / "last.pt").read_bytes())
    argv = ["features", "--checkpoint", str(ckpt), "--data", str(folder), "--device", "cpu"]
    for out in (ckpt, folder / "a.png"):  # the checkpoint read, an image read
        before = out.read_bytes()
        assert main([*argv, "--out", str(out), "--overwrite"]) == 2
        assert "is an input of this command" in capsys.readouterr().err
        assert out.read_bytes() == before
    out = tmp_path / "f.npy"
    assert main([*argv, "--out", str(out)]) == 0
    first = out.read_bytes()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} exists; pass --overwrite to replace it" in err and "Traceback" not in err
    assert out.read_bytes() == first
    (tmp_path / "g.files.txt").write_text("an earlier listing\n")  # its list is refused too
    assert main([*argv, "--out", str(tmp_path / "g.npy")]) == 2
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
