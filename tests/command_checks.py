"""What the command-line tests share: a command that must fail as a user error does."""

from __future__ import annotations

import pytest

from dsmae.cli import main


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], *messages: str) -> str:
    """Run ``dsmae ARGV``: it must exit with status 2, print no traceback and say every
    one of ``messages`` on stderr; returns what it printed there."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for message in messages:
        assert message in err, (message, err)
    return err
