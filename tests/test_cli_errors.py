"""Every bad input a user can give is one line on stderr and exit status 2, never a
traceback; a bug is a traceback under a line that says so."""

import json
import os
from pathlib import Path

import pytest
import torch
from command_checks import fails

from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main


@pytest.mark.parametrize(
    "text,message",
    [
        ("train:\n  epochs: [5\n", "is not valid YAML (line 3"),
        ("train:\n\tepochs: 5\n", "is not valid YAML (line 2"),
        ("!!python/object/apply:os.system ['echo PWNED']\n", "is not valid YAML"),
    ],
    ids=["syntax", "tab", "python-tag"],
)
def test_bad_yaml_files_are_messages(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    fails(capsys, ["pretrain", "--config", str(bad), "--out", str(tmp_path / "r")], message)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    fails(capsys, ["pretrain", "--config", str(binary)], "is not text (UTF-8 YAML expected)")
    fails(capsys, ["pretrain", "--set", "train.epochs=[1"], "the value of train.epochs")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--device", "cuda:abc"], "train.device: must be auto, cpu, cuda, cuda:N or mps"),
        (["--set", "train.betas=[2,3]"], "train.betas: must be two numbers in [0, 1)"),
        (["--img-size", "-4"], "model.img_size: must be positive, got -4"),
        (["--img-size", "0"], "model.img_size: must be positive, got 0"),
        (["--out", ""], "out: must name a folder"),
    ],
)
def test_impossible_values_name_their_key(capsys, args, message):
    fails(capsys, ["pretrain", *args, "--print-config"], message)


def test_device_names_are_checked_by_every_command(capsys, digits_run):
    checkpoint = str(digits_run / "last.pt")
    fails(capsys, ["knn", "--checkpoint", checkpoint, "--device", "cuda:abc"], "cuda:abc")
    bench = ["bench", "--method", "mae", "--arch", "vit_tiny", "--img-size", "8",
             "--patch-size", "2", "--batch-size", "2"]  # fmt: skip
    fails(capsys, [*bench, "--device", "gpu"], "'gpu'")


def _checkpoint(digits_run, tmp_path, change) -> str:
    state = load_checkpoint(digits_run / "last.pt")
    change(state)
    path = tmp_path / "changed.pt"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.update(config=[1, 2]), "its config is not a mapping"),
        (lambda s: s["config"]["model"].update(patch_size=0), "model.patch_size"),
        (lambda s: s["config"]["model"].update(arch="vit_giant"), "model.arch='vit_giant'"),
        (lambda s: s["config"]["data"].update(mean=[0.5, 0.5]), "data.mean"),
        (
            lambda s: s["config"]["model"].update(embed_dim=4096, num_heads=32, depth=48),
            "config and weights do not belong together",
        ),
        (
            lambda s: s["model"]["encoder.norm.weight"].fill_(float("nan")),
            "holds non-finite weights (NaN or infinity in norm.weight",
        ),
    ],
    ids=["config-list", "patch-0", "arch", "mean", "huge", "nan"],
)
def test_malformed_checkpoints_are_messages(digits_run, tmp_path, capsys, change, message):
    path = _checkpoint(digits_run, tmp_path, change)
    fails(capsys, ["linprobe", "--checkpoint", path, "--epochs", "1"], message)


@pytest.mark.parametrize("missing", ["step", "optimizer"])
def test_a_checkpoint_without_training_state_cannot_be_resumed(
    digits_run, tmp_path, capsys, missing
):
    path = _checkpoint(digits_run, tmp_path, lambda s: s.pop(missing))
    # refused before any work: the run's own settings (a 1-block quickstart) never train
    run = ["pretrain", "--preset", "quickstart", "--epochs", "1", "--set", "data.subset=64",
           "--set", "probe.after_pretrain=false", "--set", "model.depth=1", "--device", "cpu",
           "--out", str(tmp_path / "r")]  # fmt: skip
    fails(capsys, [*run, "--resume", path], "cannot be resumed")


def test_random_bytes_are_not_a_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096).replace(b"PK", b"pk").lstrip(b"\x80") or b"x")
    fails(capsys, ["export", "--checkpoint", str(junk), "--out", str(tmp_path / "e")],
           "is not a dsmae checkpoint: it is not a file written by torch.save")  # fmt: skip


def test_denoise_takes_any_paths_and_wants_a_png(digits_run, cifar_folder, tmp_path, capsys):
    images = sorted((cifar_folder / "test").rglob("*.jpg"))[:2]
    relative = os.path.relpath(images[0])
    out = tmp_path / "fig.png"
    argv = ["denoise", "--checkpoint", str(digits_run / "last.pt"), relative, str(images[1])]
    assert main([*argv, "--out", str(out)]) == 0 and out.is_file()
    fails(capsys, [*argv, "--out", str(tmp_path / "fig.jpg")], "ending in .png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    err = fails(capsys, [*argv[:3], str(broken), "--out", str(out)], "Cannot read image",
                 "Remove or replace")  # fmt: skip
    assert "--skip-bad-images" not in err  # denoise has no such flag


def test_plot_reads_a_metrics_file_cut_short(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    text = (digits_run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"step": 99, "loss": 0.')
    assert main(["plot", str(run)]) == 0 and (run / "curves.png").is_file()


def test_an_image_name_with_a_line_break_cannot_misalign_the_listing(
    digits_run, cifar_folder, tmp_path, capsys
):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(sorted((cifar_folder / "test").rglob("*.jpg"))[:3]):
        (folder / f"{i}.jpg").write_bytes(image.read_bytes())
    (folder / "two\nlines.jpg").write_bytes((folder / "0.jpg").read_bytes())
    argv = ["features", "--checkpoint", str(digits_run / "last.pt"), "--data", str(folder),
            "--out", str(tmp_path / "f.npy"), "--device", "cpu"]  # fmt: skip
    fails(capsys, argv, "hold a line break ('two\\nlines.jpg')", "--skip-bad-images")
    assert main([*argv, "--skip-bad-images"]) == 0
    names = (tmp_path / "f.files.txt").read_text().splitlines()
    assert names == ["0.jpg", "1.jpg", "2.jpg"]


def test_a_fifo_named_like_an_image_is_skipped_not_waited_for(
    digits_run, cifar_folder, tmp_path, caplog
):
    folder = tmp_path / "photos"
    folder.mkdir()
    image = sorted((cifar_folder / "test").rglob("*.jpg"))[0]
    (folder / "a.jpg").write_bytes(image.read_bytes())
    os.mkfifo(folder / "x.jpg")  # opening it for reading would block forever
    (folder / "gone.png").symlink_to(tmp_path / "nothing-here.png")
    argv = ["features", "--checkpoint", str(digits_run / "last.pt"), "--data", str(folder),
            "--out", str(tmp_path / "f.npy"), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "f.files.txt").read_text() == "a.jpg\n"
    assert "not regular files" in caplog.text and "x.jpg" in caplog.text
    # named on the command line (denoise takes files): refused, not waited for
    denoise = ["denoise", "--checkpoint", str(digits_run / "last.pt"), str(folder / "x.jpg"),
               "--out", str(tmp_path / "fig.png")]  # fmt: skip
    assert main(denoise) == 2


def test_export_refuses_to_overwrite_unless_asked(digits_run, tmp_path, capsys):
    out = tmp_path / "exported"
    argv = ["export", "--checkpoint", str(digits_run / "last.pt"), "--out", str(out)]
    assert main(argv) == 0
    fails(capsys, argv, "is not empty", "--overwrite")
    assert main([*argv, "--overwrite"]) == 0
    (tmp_path / "a-file").write_text("")
    fails(capsys, [*argv[:3], "--out", str(tmp_path / "a-file")], "is a file")


def test_a_tampered_export_is_refused_naming_the_weights(digits_run, tmp_path):
    from dsmae import load_encoder
    from dsmae.checkpoint import CheckpointError

    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(digits_run / "last.pt"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["model_args"]["depth"] = 3  # the file holds 1 block
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\."):
        load_encoder(out)
    assert load_encoder(Path(digits_run / "last.pt")) is not None


def test_a_bug_is_a_traceback_under_a_line_that_says_so(monkeypatch, capsys, digits_run):
    import dsmae.evaluation.knn

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(dsmae.evaluation.knn, "knn_eval", broken)
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        main(["knn", "--checkpoint", str(digits_run / "last.pt")])
    assert "internal error, a bug in dsmae: please report it" in capsys.readouterr().err


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys, digits_run):
    import dsmae.evaluation.knn

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsmae.evaluation.knn, "knn_eval", interrupted)
    assert main(["knn", "--checkpoint", str(digits_run / "last.pt")]) == 130
    assert capsys.readouterr().err.strip() == "dsmae knn: interrupted"


def test_plot_wants_a_figure_file_name(digits_run, tmp_path, capsys):
    err = fails(capsys, ["plot", str(digits_run), "--out", str(tmp_path / "x.pt")],
                 "--out", "x.pt", ".png", ".pdf")  # fmt: skip
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.pt").exists()


def test_denoise_never_writes_over_an_input(digits_run, cifar_folder, tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(sorted((cifar_folder / "test").rglob("*.jpg"))[0].read_bytes())
    before = image.read_bytes()  # a JPEG named .png: denoise reads files by their content
    argv = ["denoise", "--checkpoint", str(digits_run / "last.pt"), str(image)]
    fails(capsys, [*argv, "--out", str(image)], f"--out {image} is an input of this command")
    assert image.read_bytes() == before


def test_export_checks_the_hub_repo_id_before_any_work(digits_run, tmp_path, capsys):
    out = tmp_path / "exported"
    argv = ["export", "--checkpoint", str(digits_run / "last.pt"), "--out", str(out)]
    fails(capsys, [*argv, "--push-to-hub", ""], "--push-to-hub needs a Hub model repo id")
    fails(capsys, [*argv, "--push-to-hub", "not a/valid/repo id!!"],
           "--push-to-hub 'not a/valid/repo id!!' is not a Hub model repo id")  # fmt: skip
    fails(capsys, [*argv, "--private"], "--private makes the repo of --push-to-hub private")
    assert not out.exists()  # refused before the export


def test_shards_prints_a_data_flag_the_shell_takes_as_it_is(cifar_folder, tmp_path, capsys):
    import shlex

    out = tmp_path / "it's"
    assert main(["shards", str(cifar_folder / "test"), str(out), "--shard-size", "60"]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if "--data" in line)
    words = shlex.split(line.split(": ", 1)[1])  # as a shell splits the suggested flags
    assert words[:2] == ["--data", f"{out}/shard-{{000000..000001}}.tar"], words
