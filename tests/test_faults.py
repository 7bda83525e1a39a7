"""Faults during pre-training cost nothing: a kill mid-write, non-finite steps, a full
disk, an unwritable folder, a failing rank under torchrun."""

import errno
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dsmae import engine, resume
from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main
from dsmae.metrics import read_metrics

# quickstart (real digits, 8x8) shrunk: 128 images, batch 32 -> 4 steps an epoch, 3 epochs,
# a checkpoint after every epoch (checkpoint-00000004.pt, checkpoint-00000008.pt, last.pt)
RUN = [
    "pretrain", "--preset", "quickstart", "--patch-size", "4", "--epochs", "3",
    "--batch-size", "32", "--set", "data.subset=128", "--set", "model.depth=1",
    "--set", "model.embed_dim=32", "--set", "model.num_heads=2", "--set", "model.decoder_depth=1",
    "--set", "model.regressor_depth=1", "--set", "train.log_every=1",
    "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=0",
    "--set", "probe.after_pretrain=false", "--device", "cpu",
]  # fmt: skip


def _driver(tmp_path, body: str) -> str:
    """A script that applies ``body`` (a fault) and then runs ``dsmae`` with its argv."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import os, signal, sys\nimport torch\n"
        + textwrap.dedent(body)
        + "\nfrom dsmae.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    return str(script)


def _same_weights(a, b) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    for name, tensor in wa.items():
        assert torch.equal(tensor, wb[name]), name


def test_killed_while_writing_a_checkpoint_resumes_from_the_one_before(tmp_path):
    assert main([*RUN, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    # the second checkpoint write dies half-way: some bytes on disk, then SIGKILL
    driver = _driver(
        tmp_path,
        """
        real_save, calls = torch.save, []
        def dying_save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                f.write(b"PK half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save
        """,
    )
    # the child computes with as many threads as this process, for bit-identical sums
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [sys.executable, driver, *RUN, "--out", str(out)], env=env, capture_output=True
    )
    assert done.returncode == -9
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".pt", ".tmp"))
    assert names == [".checkpoint-00000008.pt.tmp", "checkpoint-00000004.pt"]
    assert load_checkpoint(out / "checkpoint-00000004.pt")["step"] == 4

    assert main([*RUN, "--out", str(out), "--resume", "auto"]) == 0
    _same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")


def test_an_unreadable_newest_checkpoint_is_skipped(tmp_path, caplog):
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out)]) == 0
    (out / "last.pt").unlink()
    newest = out / "checkpoint-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy that was cut short
    assert resume.find_resume_checkpoint(out) == out / "checkpoint-00000004.pt"
    assert "skipping an unreadable checkpoint" in caplog.text and newest.name in caplog.text


def _nan_noise_at(monkeypatch, bad_steps) -> None:
    """Make the noise of the given optimizer steps (0-based) NaN: a NaN loss and gradient."""
    real = engine.draw_step

    def draw_step(model, cfg, step, device):
        corruption = real(model, cfg, step, device)
        if step in bad_steps:
            corruption.eps = torch.full_like(corruption.eps, math.nan)
        return corruption

    monkeypatch.setattr(engine, "draw_step", draw_step)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    _nan_noise_at(monkeypatch, {2, 5})
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out)]) == 0
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in lines] == [0, 0, 1, 1, 1, 2] + [2] * 6
    assert math.isnan(lines[2]["loss"]) and math.isfinite(lines[3]["loss"])
    assert "step 3 skipped: non-finite gradient" in caplog.text
    weights = load_checkpoint(out / "last.pt")["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    _nan_noise_at(monkeypatch, set(range(5, 12)))  # from step 6 on
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out), "--set", "train.max_bad_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "stopped at step 8: 3 steps in a row had a non-finite loss or gradient" in err
    assert f"last good checkpoint is {out / 'checkpoint-00000004.pt'}" in err
    assert "Traceback" not in err
    assert not (out / "last.pt").exists()
    assert load_checkpoint(out / "checkpoint-00000004.pt")["step"] == 4


def test_gradient_clipping_bounds_the_applied_gradient():
    from dsmae.config import build_config, model_config
    from dsmae.engine import build_optimizer, train_step
    from dsmae.models import DSMAE

    model = DSMAE(model_config(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=32,
                               num_heads=2, decoder_depth=1, regressor_depth=1))  # fmt: skip
    cfg = build_config(overrides={"train.device": "cpu"})
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    images = torch.randn(4, 1, 8, 8)
    out = train_step(model, optimizer, images, generator=torch.Generator().manual_seed(0),
                     grad_clip=1e-3)  # fmt: skip
    assert out["grad_norm"] > 1e-3 and bool(out["finite"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1e-3 * 1.0001


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_a_non_finite_step_changes_no_weight(amp):
    from dsmae.config import build_config, model_config
    from dsmae.engine import build_optimizer, train_step
    from dsmae.models import DSMAE

    model = DSMAE(model_config(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=32,
                               num_heads=2, decoder_depth=1, regressor_depth=1))  # fmt: skip
    cfg = build_config(overrides={"train.device": "cpu"})
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask, eps = model.sample_corruption(4, torch.Generator().manual_seed(0))
    out = train_step(model, optimizer, torch.randn(4, 1, 8, 8), mask=mask,
                     eps=torch.full_like(eps, math.inf), amp=amp)  # fmt: skip
    assert not bool(out["finite"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the fused kernel skipped the step on the device: moments and step count still zero
    assert optimizer.defaults["fused"] and optimizer.state
    for state in optimizer.state.values():
        assert int(state["step"]) == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_a_non_fused_optimizer_skips_a_non_finite_step_too():
    from dsmae.engine import step_unless_non_finite

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, foreach=False)
    weight.grad = torch.ones(3)
    step_unless_non_finite(optimizer, torch.tensor(False))
    assert torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state
    step_unless_non_finite(optimizer, torch.tensor(True))
    assert (weight.detach() < 1).all()


def test_a_skipped_step_leaves_the_teacher_as_it_is():
    from dsmae.config import model_config
    from dsmae.models import DSMAE

    model = DSMAE(model_config(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=32,
                               num_heads=2, decoder_depth=1, regressor_depth=1))  # fmt: skip
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    teacher = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9, apply=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(teacher, model.teacher.parameters()))
    model.update_teacher(0.9, apply=torch.tensor(True))
    for before, after, student in zip(
        teacher, model.teacher.parameters(), model.encoder.parameters()
    ):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * student)


def test_a_full_disk_while_saving_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import dsmae.checkpoint

    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(dsmae.checkpoint.torch, "save", save)
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert f"last good checkpoint is {out / 'checkpoint-00000004.pt'}" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.pt*")) == ["checkpoint-00000004.pt"]
    assert load_checkpoint(out / "checkpoint-00000004.pt")["step"] == 4


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*RUN, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"out='{blocker / 'run'}' is not a writable folder" in err


def test_one_failing_rank_ends_every_rank_quickly(tmp_path):
    driver = _driver(
        tmp_path,
        """
        import dsmae.engine
        real_step, calls = dsmae.engine.train_step, []
        def failing_step(*args, **kwargs):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 3:
                raise RuntimeError("rank 1 fails on purpose")
            return real_step(*args, **kwargs)
        dsmae.engine.train_step = failing_step
        """,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", driver, *RUN, "--out", str(tmp_path / "run")]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert time.monotonic() - started < 120
    assert "rank 1 fails on purpose" in done.stderr


def test_resume_picks_the_newest_readable_checkpoint(tmp_path):
    from dsmae.checkpoint import save_checkpoint

    def write(name, step):
        save_checkpoint(tmp_path / name, {"config": {}, "model": {}, "step": step})

    write("checkpoint-00000004.pt", 4)
    write("last.pt", 8)
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "last.pt"
    write("checkpoint-00000008.pt", 8)  # same step: last.pt wins
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "last.pt"
    write("checkpoint-00000012.pt", 12)  # a resumed, longer run went past last.pt
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-00000012.pt"
    (tmp_path / "checkpoint-00000012.pt").write_bytes(b"cut")
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "last.pt").write_bytes(b"cut")
    assert resume.find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-00000008.pt"
