import errno
import pickle
import subprocess
import sys

import pytest
import torch

from dsmae.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_config,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from dsmae.writes import WriteError


def test_round_trip_and_no_temporary_left(tmp_path):
    path = save_checkpoint(
        tmp_path / "x" / "last.pt", {"config": {"a": 1}, "model": {"w": torch.ones(2)}}
    )
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    state = load_checkpoint(path)
    assert state["format"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))


class _Evil:
    """Unpickling this runs code: it writes the file PWNED in the working folder."""

    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def _write_evil(path, zipped: bool) -> None:
    state = {"config": {}, "model": {"w": torch.ones(1), "payload": _Evil()}}
    if zipped:  # torch's own zip format, as a checkpoint from the internet would be
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)


@pytest.mark.parametrize("zipped", [True, False])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_never_runs_code_from_the_file(tmp_path, monkeypatch, zipped):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    _write_evil(path, zipped)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pt.*never run"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_the_evil_file_really_runs_code_when_unpickled_naively(tmp_path):
    """The file of the test above is live: a plain torch.load(weights_only=False) runs it."""
    _write_evil(tmp_path / "evil.pt", zipped=True)
    code = "import torch; torch.load('evil.pt', weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "PWNED").exists()


def test_missing_foreign_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dsmae checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    good = save_checkpoint(tmp_path / "good.pt", {"config": {}, "model": {"w": torch.ones(99)}})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt is truncated or corrupt"):
        load_checkpoint(cut)


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"config": {}, "model": {"w": torch.ones(1)}})
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(WriteError, match=r"No space left on device; the previous last\.pt"):
        save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(1)}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left


def test_an_unwritable_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WriteError, match=r"could not write checkpoint .*file/x/last\.pt"):
        save_checkpoint(blocker / "x" / "last.pt", {"config": {}, "model": {}})


def test_a_zip_writers_error_on_a_full_disk_is_a_write_error(tmp_path, monkeypatch):
    """torch.save reports a full disk from its zip writer as a RuntimeError, the OSError
    only as its cause; the message still says what happened."""

    def full(obj, f, *args, **kwargs):
        f.write(b"PK half")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from err

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError, match=r"could not write checkpoint .*last\.pt: No space left"):
        save_checkpoint(tmp_path / "last.pt", {"config": {}, "model": {}})
    assert list(tmp_path.iterdir()) == []


def test_load_weights_lists_what_differs():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["0.weight"] = torch.zeros(4, 2)
    weights["2.weight"] = torch.zeros(1)
    del weights["1.bias"]
    with pytest.raises(CheckpointError) as err:
        load_weights(model, weights, "x.pt")
    message = str(err.value)
    assert "missing: 1.bias" in message and "unexpected: 2.weight" in message
    assert "0.weight: checkpoint (4, 2) vs model (3, 2)" in message
    good = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    load_weights(model, good, "y.pt")
    assert torch.equal(model[0].weight, torch.full((3, 2), 0.5))


def test_a_checkpoint_is_read_once_with_its_config(digits_run):
    path = digits_run / "last.pt"
    checkpoint = Checkpoint.read(path)
    assert checkpoint.path == path and checkpoint.state["step"] == load_checkpoint(path)["step"]
    assert checkpoint.config == checkpoint_config(checkpoint.state, path)
    assert checkpoint.config.model.embed_dim == 32
    assert "optimizer" in load_checkpoint(path) and "optimizer" not in checkpoint.state  # let go


def test_random_init_ignores_the_weights_but_keeps_the_architecture(digits_run):
    checkpoint = Checkpoint.read(digits_run / "last.pt")
    trained = checkpoint.encoder()
    fresh = checkpoint.encoder(random_init=True)
    assert trained.state_dict().keys() == fresh.state_dict().keys()
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(trained.state_dict()[w], fresh.state_dict()[w])
    assert torch.equal(fresh.state_dict()[w], checkpoint.encoder(random_init=True).state_dict()[w])
    other = checkpoint.encoder(random_init=True, seed=1).state_dict()[w]
    assert not torch.equal(fresh.state_dict()[w], other)
    weights = checkpoint.state["model"]
    assert torch.equal(trained.state_dict()[w], weights[f"encoder.{w}"])
    assert torch.equal(checkpoint.encoder(teacher=True).state_dict()[w], weights[f"teacher.{w}"])


def test_a_method_without_teacher_has_none_to_give(digits_mae_run):
    checkpoint = Checkpoint.read(digits_mae_run / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt \(mae\) has no teacher"):
        checkpoint.encoder(teacher=True)
