"""One writer per run folder, one run per folder, and metrics that match the checkpoints."""

import json
import os

import pytest

from dsmae.cli import main
from dsmae.metrics import read_metrics
from dsmae.pretrain import resume
from dsmae.pretrain.run_folder import LOCK_FILE, RunFolderError, cut_metrics, lock_folder, run_id_of
from dsmae.pretrain.saving import checkpoint_run_id


@pytest.fixture
def run_args(tiny_run) -> list[str]:
    """The tiny run (4 steps an epoch) with a checkpoint after every epoch, none pruned."""
    return tiny_run.args(checkpoints=True)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys, run_args):
    out = tmp_path / "run"
    held = lock_folder(out)
    try:
        holder = f"in use by another dsmae run .process {os.getpid()}"
        with pytest.raises(RunFolderError, match=holder):
            lock_folder(out)
        assert main([*run_args, "--epochs", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another dsmae run (process {os.getpid()})" in err
        assert "Traceback" not in err
    finally:
        held.close()
    assert main([*run_args, "--epochs", "1", "--out", str(out)]) == 0  # released: it runs


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999\n")  # a process that died: no lock held on it
    with lock_folder(out) as handle:
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        assert not handle.closed
    assert "stale lock" in caplog.text and "999999" in caplog.text


def test_a_fresh_run_into_another_runs_folder_is_refused(tmp_path, capsys, run_args):
    out = tmp_path / "run"
    assert main([*run_args, "--epochs", "2", "--out", str(out)]) == 0
    first = run_id_of(out)
    assert first and checkpoint_run_id(out / "last.pt") == first
    assert main([*run_args, "--epochs", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds another run (checkpoint-00000004.pt, last.pt)" in err
    assert "--resume auto" in err and "--overwrite" in err and "Traceback" not in err

    assert main([*run_args, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0
    second = run_id_of(out)
    assert second != first and checkpoint_run_id(out / "last.pt") == second
    # the old run's metrics made way for the new run's; its checkpoints are not touched
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert checkpoint_run_id(out / "checkpoint-00000004.pt") == first


def test_pruning_and_resume_only_see_their_own_run(tmp_path, run_args):
    out = tmp_path / "run"
    assert main([*run_args, "--epochs", "4", "--out", str(out)]) == 0  # checkpoints 4, 8, 12
    old = run_id_of(out)
    newer = [*run_args, "--epochs", "3", "--set", "train.keep_checkpoints=1", "--overwrite"]
    assert main([*newer, "--out", str(out)]) == 0  # writes 4, 8 (keeps 1) and last.pt
    new = run_id_of(out)
    names = sorted(p.name for p in out.glob("checkpoint-*.pt") if ".run-" not in p.name)
    # its own oldest was pruned; the old run's newer checkpoint 12 was not, nor its 4, 8
    # and last.pt, which the new run's files of those names would have replaced
    assert names == ["checkpoint-00000008.pt", "checkpoint-00000012.pt"]
    aside = sorted(p.name for p in out.glob(f"*.run-{old}.pt"))
    assert aside == [f"checkpoint-00000004.run-{old}.pt", f"checkpoint-00000008.run-{old}.pt",
                     f"last.run-{old}.pt"]  # fmt: skip
    assert checkpoint_run_id(out / "checkpoint-00000008.pt") == new
    assert checkpoint_run_id(out / "checkpoint-00000012.pt") == old
    (out / "last.pt").unlink()  # as if the new run had been killed before its end
    assert resume.find_resume_checkpoint(out) == out / "checkpoint-00000008.pt"


def test_a_run_never_writes_over_another_runs_files(tmp_path, run_args, caplog):
    out = tmp_path / "run"
    assert main([*run_args, "--epochs", "2", "--out", str(out)]) == 0  # checkpoint 4, last
    old = run_id_of(out)
    kept = {name: (out / name).read_bytes() for name in ("checkpoint-00000004.pt", "last.pt")}
    again = [*run_args, "--epochs", "2", "--set", "train.seed=1", "--overwrite"]
    assert main([*again, "--out", str(out)]) == 0  # the same names, another run
    new = run_id_of(out)
    for name, data in kept.items():
        aside = out / name.replace(".pt", f".run-{old}.pt")
        assert aside.read_bytes() == data, name  # moved aside whole, never replaced
        assert checkpoint_run_id(out / name) == new
    assert f"belongs to another run ({old}): moved aside to last.run-{old}.pt" in caplog.text
    # what is aside is no checkpoint of the folder's run: resume never takes it
    (out / "last.pt").unlink()
    assert resume.find_resume_checkpoint(out) == out / "checkpoint-00000004.pt"
    assert checkpoint_run_id(resume.find_resume_checkpoint(out)) == new


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path, run_args):
    out = tmp_path / "run"
    assert main([*run_args, "--epochs", "3", "--out", str(out)]) == 0
    # as if killed after step 10: the checkpoint after 8 and lines up to 10 survive
    for name in ("last.pt", "checkpoint-00000012.pt"):
        (out / name).unlink(missing_ok=True)
    lines = [json.dumps(r) for r in read_metrics(out / "metrics.jsonl") if r["step"] <= 10]
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "lo')  # cut short
    assert main([*run_args, "--epochs", "3", "--out", str(out), "--resume", "auto"]) == 0
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, 13))  # each step once, in order


def test_cut_metrics_keeps_lines_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "knn_top1": 5}\n{"step": 3}\n{"step": 4')
    cut_metrics(tmp_path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "knn_top1": 5}\n'
    cut_metrics(tmp_path / "nowhere", 2)  # no metrics yet: nothing to do


def test_a_link_in_place_of_the_lock_is_refused_never_written_through(tmp_path, capsys, run_args):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / LOCK_FILE).symlink_to(victim)
    with pytest.raises(RunFolderError, match="is a link"):
        lock_folder(out)
    assert main([*run_args, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / LOCK_FILE} is a link" in err and "Traceback" not in err
    assert victim.read_text() == "precious\n"


def test_a_run_that_ended_cleanly_leaves_no_stale_lock(tmp_path, caplog, run_args):
    out = tmp_path / "run"
    assert main([*run_args, "--epochs", "1", "--out", str(out)]) == 0
    assert (out / LOCK_FILE).read_text() == ""  # the PID wiped at the end
    caplog.clear()
    assert main([*run_args, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0
    assert "stale lock" not in caplog.text


def test_a_fresh_run_keeps_files_it_did_not_write(tmp_path, capsys, run_args):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("my own notes\n")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    for resumed in ([], ["--resume", "auto"]):
        assert main([*run_args, "--epochs", "1", "--out", str(out), *resumed]) == 2
        err = capsys.readouterr().err
        assert f"{out} holds files that this run would replace (config.yaml, metrics.jsonl)" in err
        assert "--overwrite" in err and "Traceback" not in err
    assert (out / "config.yaml").read_text() == "my own notes\n"
    assert main([*run_args, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0


def test_a_run_killed_before_its_first_checkpoint_starts_over_with_resume_auto(
    tmp_path, capsys, run_args
):
    out = tmp_path / "run"
    assert main([*run_args, "--epochs", "1", "--out", str(out)]) == 0
    for checkpoint in out.glob("*.pt"):  # as if killed before the first
        checkpoint.unlink()
    assert main([*run_args, "--epochs", "1", "--out", str(out)]) == 2
    assert "holds another run that this run would replace" in capsys.readouterr().err
    assert main([*run_args, "--epochs", "1", "--out", str(out), "--resume", "auto"]) == 0
