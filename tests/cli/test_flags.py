"""The flags: each sets its config key, and an impossible value names the flag that set it."""

import pytest
from command_checks import fails


@pytest.mark.parametrize(
    "command,args,message",
    [
        ("linprobe", ["--epochs", "0"], "probe.epochs: must be >= 1, got 0 (set by --epochs)"),
        ("linprobe", ["--epochs", "-3"], "probe.epochs: must be >= 1, got -3 (set by --epochs)"),
        ("linprobe", ["--batch-size", "0"], "probe.batch_size: must be >= 1, got 0 (set by"),
        ("knn", ["--k", "0"], "monitor.knn_k: must be >= 1, got 0 (set by --k)"),
        ("knn", ["--k", "-5"], "monitor.knn_k: must be >= 1, got -5 (set by --k)"),
        ("knn", ["--temperature", "0"], "knn_temperature: must be positive (set by --temp"),
        ("knn", ["--temperature", "-1"], "knn_temperature: must be positive (set by --temp"),
        ("features", ["--batch-size", "0"], "batch_size must be a positive integer, got 0 ("),
        ("features", ["--batch-size", "-2"], "must be a positive integer, got -2 (set by --b"),
        ("finetune", ["--set", "finetune.base_lr=-1"], "finetune.base_lr: must be positive"),
        ("finetune", ["--epochs", "0"], "finetune.epochs: must be >= 1, got 0 (set by --epochs)"),
    ],
)
def test_impossible_flags_are_one_line_naming_the_flag(
    digits_run, cifar_folder, tmp_path, capsys, command, args, message
):
    argv = [command, "--checkpoint", str(digits_run / "last.pt"), "--device", "cpu", *args]
    if command == "features":
        argv += ["--data", str(cifar_folder / "test"), "--out", str(tmp_path / "f.npy")]
    err = fails(capsys, argv, message)
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "f.npy").exists()
