"""Failed writes are messages that name the file, and leave nothing half-written: on a
real, small, full file system, and for the errors libraries wrap around the OS's."""

import errno
import os
import shlex
import sys

import pytest

from dsmae.writes import (
    WriteError,
    append_only,
    atomic_write_text,
    os_error_behind,
    write_figure,
    written,
)


def test_the_os_error_behind_a_library_error_is_found():
    cause = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise cause
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from err
    except RuntimeError as wrapped:
        assert os_error_behind(wrapped) is cause
    assert os_error_behind(ValueError("no OS error here")) is None


def test_written_names_the_file_and_the_reason(tmp_path):
    expected = r"could not write metrics .*m\.jsonl: No space left"
    with pytest.raises(WriteError, match=expected), written("metrics", tmp_path / "m.jsonl"):
        raise OSError(errno.ENOSPC, "No space left on device")
    # anything else is not a failed write but a bug: let through
    with pytest.raises(KeyError), written("metrics", tmp_path / "m.jsonl"):
        raise KeyError("step")


def test_an_atomic_write_keeps_the_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(WriteError, match="No space left on device"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json"
    ]


def test_links_planted_where_a_file_or_its_temporary_goes_are_never_written_through(tmp_path):
    from dsmae.checkpoint import save_checkpoint

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    for name in (".config.yaml.tmp", ".last.pt.tmp"):  # the temporary names of dsmae <= 0.1
        (out / name).symlink_to(victim)
    atomic_write_text(out / "config.yaml", "model: {}\n")
    save_checkpoint(out / "last.pt", {"step": 1})
    assert victim.read_text() == "precious\n"
    assert not (out / "config.yaml").is_symlink() and (out / "config.yaml").read_text()
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == ["config.yaml", "last.pt"]
    # a link where the file itself goes is refused, naming it
    (out / "metrics.json").symlink_to(victim)
    with pytest.raises(WriteError, match=r"metrics\.json: it is a link"):
        atomic_write_text(out / "metrics.json", "{}", "result")
    with pytest.raises(WriteError, match=r"last-link\.pt: it is a link"):
        (out / "last-link.pt").symlink_to(victim)
        save_checkpoint(out / "last-link.pt", {"step": 1})
    assert victim.read_text() == "precious\n"
    # the new files are created as open() creates them, not private to their owner
    assert (out / "config.yaml").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_appended_lines_and_figures_never_go_through_a_link(tmp_path):
    from matplotlib.figure import Figure

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(WriteError, match=r"metrics\.jsonl: it is a link"):
        append_only(tmp_path / "metrics.jsonl", "metrics")
    with append_only(tmp_path / "own.jsonl") as lines:
        lines.write("{}\n")
    with append_only(tmp_path / "own.jsonl") as lines:  # appends
        lines.write("[]\n")
    assert (tmp_path / "own.jsonl").read_text() == "{}\n[]\n"
    (tmp_path / "curves.png").symlink_to(victim)
    with pytest.raises(WriteError, match=r"curves\.png: it is a link"):
        write_figure(Figure(), tmp_path / "curves.png")
    assert write_figure(Figure(), tmp_path / "own.png").read_bytes().startswith(b"\x89PNG")
    assert victim.read_text() == "precious\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs and mount namespaces are Linux's")
def test_a_real_full_disk_is_a_message_and_leaves_no_temporary_file(tiny_run, small_file_system):
    # the tiny run with the preset's own model, whose checkpoints do not fit on 3 MB, and
    # the preset's metrics line every 5 steps; a checkpoint after every epoch
    own = ["--set", "train.log_every=5", "--set", "train.checkpoint_every=1"]
    run = shlex.join(tiny_run.args(*own, preset_model=True))
    done = small_file_system(f"""
        "$PYTHON" -m dsmae {run} --out "$MNT/run"; echo "first: $?"
        ls -a "$MNT/run"; echo "free: $(df -k "$MNT" | tail -1)"
        "$PYTHON" -m dsmae {run} --out "$MNT/run" --resume auto; echo "again: $?"
    """)
    out = done.stdout + done.stderr
    assert "first: 2" in out and "again: 2" in out, out[-3000:]
    assert "could not write checkpoint" in out and "No space left on device" in out
    assert ".tmp" not in done.stdout  # no half-written checkpoint left filling the disk
    assert "Traceback" not in out
