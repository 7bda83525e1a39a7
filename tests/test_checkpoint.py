import pickle

import pytest
import torch

from dsmae.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_and_no_temporary_left(tmp_path):
    path = save_checkpoint(
        tmp_path / "x" / "last.pt", {"config": {"a": 1}, "model": {"w": torch.ones(2)}}
    )
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    state = load_checkpoint(path)
    assert state["format"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_never_runs_code_from_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"config": {}, "model": _Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_missing_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dsmae checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
