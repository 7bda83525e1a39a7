"""Failed writes are messages that name the file, and leave nothing half-written: on a
real, small, full file system, and for the errors libraries wrap around the OS's."""

import errno
import os
import shlex
import sys

import pytest

from dsmae.writes import WriteError, atomic_write_text, os_error_behind, written


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
