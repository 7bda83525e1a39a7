"""The run's state (dsmae.pretrain.state): its checkpoint, saved whole or not at all."""

import errno

import torch

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main


def test_a_full_disk_while_saving_is_a_clear_error(tmp_path, monkeypatch, capsys, run_args):
    import dsmae.checkpoint

    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(dsmae.checkpoint.torch, "save", save)
    out = tmp_path / "run"
    assert main([*run_args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert f"last good checkpoint is {out / 'checkpoint-00000004.pt'}" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.pt*")) == ["checkpoint-00000004.pt"]
    assert load_checkpoint(out / "checkpoint-00000004.pt")["step"] == 4
