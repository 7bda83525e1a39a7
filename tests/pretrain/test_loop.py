"""The pre-training loop (``dsmae.pretrain``): what a run writes, its schedules, teacher,
resumption and monitors, and what a fault costs: non-finite steps are skipped, counted and
stop a diverging run; a full disk and an unwritable folder are messages."""

import errno
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dsmae
from dsmae.checkpoint import load_checkpoint
from dsmae.cli import main
from dsmae.config import Config, build_config, model_config
from dsmae.metrics import read_metrics
from dsmae.models import DSMAE
from dsmae.pretrain import pretrain, time_budget
from dsmae.pretrain import step as pretrain_step
from dsmae.pretrain.setup import build_optimizer
from dsmae.pretrain.step import step_unless_non_finite, train_step
from dsmae.schedules import lr_at, momentum_at


def _config(tiny: dict, tmp_path: Path, **overrides) -> Config:
    """The tiny ViT pre-trained on 256 real digits upscaled to 16x16, batch 64 -> 4 steps an
    epoch, for 2 epochs (warm-up 1), a metrics line every step, on the CPU, into
    ``tmp_path/run``; ``overrides`` (dotted keys) on top."""
    base = {f"model.{k}": v for k, v in tiny.items()}
    base.update(
        {
            "model.in_chans": 1,
            "data.source": "digits",
            "data.subset": 256,
            "train.epochs": 2,
            "train.warmup_epochs": 1,
            "train.batch_size": 64,
            "train.log_every": 1,
            "train.device": "cpu",
            "out": str(tmp_path / "run"),
        }
    )
    base.update(overrides)
    return build_config(overrides=base)


def test_gradient_accumulation_equals_the_full_batch(tiny):
    # all patches corrupted with zero noise: the forward pass is deterministic
    options = dict(noise_ratio=1.0, noise_std=0.0, **tiny)
    images = torch.randn(8, 3, 16, 16)
    params = []
    losses = []
    for micro_batch in (8, 2):
        torch.manual_seed(0)
        model = dsmae.build("dsmae", **options)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        losses.append(train_step(model, optimizer, images, micro_batch=micro_batch)["loss"])
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_weight_decay_only_on_weight_matrices(tiny):
    model = dsmae.build("mae", **tiny)
    optimizer = build_optimizer(model, build_config().train, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in optimizer.param_groups}
    assert "encoder.cls_token" in decay[0.0] and "decoder.mask_token" in decay[0.0]
    assert "encoder.blocks.0.norm1.weight" in decay[0.0]
    assert "encoder.blocks.0.attn.qkv.bias" in decay[0.0]
    assert "encoder.blocks.0.attn.qkv.weight" in decay[0.05]
    assert "encoder.patch_embed.proj.weight" in decay[0.05]
    trained = {n for group in decay.values() for n in group}
    assert "encoder.pos_embed" not in trained  # fixed sin-cos


def test_pretrain_writes_checkpoint_metrics_config_and_figure(tmp_path, tiny):
    cfg = _config(tiny, tmp_path, **{"train.checkpoint_every": 1})
    result = pretrain(cfg)
    out = result.out
    assert result.checkpoint == out / "last.pt"
    assert (out / "config.yaml").is_file() and (out / "denoise.png").is_file()
    assert (out / "checkpoint-00000004.pt").is_file()  # after epoch 1 = step 4
    assert any((out / "tensorboard").iterdir())
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 8 and set(state) >= {"config", "model", "optimizer", "epoch"}
    prefixes = {k.split(".")[0] for k in state["model"]}
    assert prefixes == {"encoder", "teacher", "decoder", "regressor"}
    assert state["config"]["data"]["mean"] is not None  # measured and recorded
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    keys = {"step", "epoch", "lr", "momentum", "loss", "loss_y", "loss_z", "img_per_s", "grad_norm"}
    assert keys <= set(records[0])
    peak = cfg.train.lr
    for r in records:  # schedules: lr of the step taken, momentum of its epoch (SdAE's rhythm)
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 8, 4, peak))
        assert r["momentum"] == pytest.approx(momentum_at(r["epoch"], 2))


def test_per_step_teacher_momentum_follows_the_steps(tmp_path, tiny):
    pretrain(_config(tiny, tmp_path, **{"train.ema_every": "step"}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["momentum"] for r in records] == pytest.approx(
        [momentum_at(r["step"] - 1, 8) for r in records]
    )


def test_teacher_updated_once_per_epoch_in_epoch_mode(tmp_path, tiny):
    cfg = _config(tiny, tmp_path, **{"train.ema_every": "epoch", "train.epochs": 1})
    pretrain(cfg)
    state = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    torch.manual_seed(cfg.train.seed)
    initial = DSMAE(cfg.model).encoder.state_dict()
    m = momentum_at(0, 1)  # one epoch: a single update with the first momentum
    for name, start in initial.items():
        expected = m * start + (1 - m) * state[f"encoder.{name}"]
        assert torch.allclose(state[f"teacher.{name}"], expected, atol=1e-6), name


def test_batch_larger_than_the_data_is_refused(tmp_path, tiny):
    with pytest.raises(dsmae.ConfigError, match=r"train\.batch_size"):
        pretrain(_config(tiny, tmp_path, **{"train.batch_size": 512}))


def _weights(path):
    state = load_checkpoint(path)
    return state["model"], state["optimizer"]["state"], state["step"]


def _assert_identical(a, b):
    model_a, opt_a, step_a = _weights(a)
    model_b, opt_b, step_b = _weights(b)
    assert step_a == step_b
    for name, tensor in model_a.items():
        assert torch.equal(tensor, model_b[name]), name
    for key, slots in opt_a.items():
        for slot, value in slots.items():
            assert torch.equal(value, opt_b[key][slot]), (key, slot)


@pytest.mark.parametrize("ema_every", ["epoch", "step"])
def test_resume_from_the_middle_of_an_epoch_is_exact(tmp_path, ema_every, tiny):
    straight = _config(tiny, tmp_path / "a", **{"train.epochs": 3, "train.ema_every": ema_every})
    pretrain(straight)
    # the same run, checkpointing after every step; then go back to step 6 of 12 (the
    # middle of epoch 2: with the per-epoch rhythm the teacher has moved once)
    broken = _config(
        tiny,
        tmp_path / "b",
        **{"train.epochs": 3, "train.checkpoint_minutes": 1e-9, "train.keep_checkpoints": 0,
           "train.ema_every": ema_every},
    )  # fmt: skip
    pretrain(broken)
    out = Path(broken.out)
    assert (out / "checkpoint-00000006.pt").is_file()
    for path in out.glob("*.pt"):
        if path.name in ("last.pt", "checkpoint-00000007.pt") or path.name > "checkpoint-00000007":
            path.unlink()
    pretrain(broken, resume="auto")
    _assert_identical(Path(straight.out) / "last.pt", out / "last.pt")


@pytest.mark.parametrize("ema_every", ["epoch", "step"])
def test_micro_batches_take_the_same_steps_as_whole_batches(tmp_path, ema_every, tiny):
    whole = _config(tiny, tmp_path / "whole", **{"train.ema_every": ema_every})
    pretrain(whole)
    micro = _config(
        tiny, tmp_path / "micro", **{"train.ema_every": ema_every, "train.micro_batch": 16}
    )
    pretrain(micro)
    a, b = (load_checkpoint(Path(c.out) / "last.pt")["model"] for c in (whole, micro))
    for name, tensor in a.items():  # float tolerance: the sums run in another order
        assert torch.allclose(tensor, b[name], atol=1e-4), name
    assert any(not torch.equal(a[n], a[n.replace("teacher.", "encoder.")])
               for n in a if n.startswith("teacher."))  # fmt: skip


def test_only_the_newest_checkpoints_are_kept(tmp_path, tiny):
    cfg = _config(
        tiny,
        tmp_path,
        **{
            "train.epochs": 4,
            "train.checkpoint_every": 1,
            "train.checkpoint_minutes": 0,
            "train.keep_checkpoints": 2,
        },
    )
    pretrain(cfg)
    names = sorted(p.name for p in Path(cfg.out).glob("checkpoint-*.pt"))
    assert names == ["checkpoint-00000008.pt", "checkpoint-00000012.pt"]


def test_monitors_knn_images_and_flops_are_logged(tmp_path, tiny):
    cfg = _config(tiny, tmp_path, **{"monitor.knn_every": 1, "monitor.images_every": 1})
    pretrain(cfg)
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").open()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [1, 2]
    assert all(0 <= r["knn_top1"] <= 100 and r["wall_s"] > 0 for r in knn)
    assert knn[1]["flops"] == pytest.approx(2 * knn[0]["flops"])  # twice the images seen
    board = EventAccumulator(str(Path(cfg.out) / "tensorboard"))
    board.Reload()
    assert "pretrain/denoise" in board.Tags()["images"]  # the Fig. 2 grid, every epoch
    assert {"pretrain/loss", "pretrain/grad_norm", "pretrain/knn_top1"} <= set(
        board.Tags()["scalars"]
    )


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    images = torch.randn(4, 3, 16, 16)
    grads = []
    for method in ("dsmae", "mae"):
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = dsmae.build(method, **tiny)
            model.encoder.set_grad_checkpointing(checkpointing)
            out = model(images, generator=torch.Generator().manual_seed(0))
            out.loss.backward()
            grads.append(model.encoder.blocks[0].mlp.fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.allclose(grads[2], grads[3], atol=1e-6)


# ------------------------------------------------------------------ faults


@pytest.fixture
def run_args(tiny_run) -> list[str]:
    """The tiny run for 3 epochs with a checkpoint after each: checkpoint-00000004.pt,
    checkpoint-00000008.pt, last.pt (step 12)."""
    return tiny_run.args("--epochs", "3", checkpoints=True)


def _digits_model(tiny: dict) -> DSMAE:
    """The tiny run's model: the tiny ViT on 8x8 grey images, one block."""
    return DSMAE(model_config(**{**tiny, "img_size": 8, "in_chans": 1, "depth": 1}))


def _nan_noise_at(monkeypatch, bad_steps) -> None:
    """Make the noise of the given optimizer steps (0-based) NaN: a NaN loss and gradient."""
    real = pretrain_step.draw_step

    def draw_step(model, cfg, step, device):
        corruption = real(model, cfg, step, device)
        if step in bad_steps:
            corruption.eps = torch.full_like(corruption.eps, math.nan)
        return corruption

    monkeypatch.setattr(pretrain_step, "draw_step", draw_step)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, caplog, run_args):
    _nan_noise_at(monkeypatch, {2, 5})
    out = tmp_path / "run"
    assert main([*run_args, "--out", str(out)]) == 0
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in lines] == [0, 0, 1, 1, 1, 2] + [2] * 6
    assert math.isnan(lines[2]["loss"]) and math.isfinite(lines[3]["loss"])
    assert "step 3 skipped: non-finite gradient" in caplog.text
    weights = load_checkpoint(out / "last.pt")["model"]
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys, run_args):
    _nan_noise_at(monkeypatch, set(range(5, 12)))  # from step 6 on
    out = tmp_path / "run"
    assert main([*run_args, "--out", str(out), "--set", "train.max_bad_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "stopped at step 8: 3 steps in a row had a non-finite loss or gradient" in err
    assert f"last good checkpoint is {out / 'checkpoint-00000004.pt'}" in err
    assert "Traceback" not in err
    assert not (out / "last.pt").exists()
    assert load_checkpoint(out / "checkpoint-00000004.pt")["step"] == 4


def test_gradient_clipping_bounds_the_applied_gradient(tiny):
    model = _digits_model(tiny)
    cfg = build_config(overrides={"train.device": "cpu"})
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    images = torch.randn(4, 1, 8, 8)
    out = train_step(model, optimizer, images, generator=torch.Generator().manual_seed(0),
                     grad_clip=1e-3)  # fmt: skip
    assert out["grad_norm"] > 1e-3 and bool(out["finite"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1e-3 * 1.0001


def test_without_clipping_the_step_reports_the_norm_of_the_gradients_it_applied(tiny):
    model = _digits_model(tiny)
    cfg = build_config(overrides={"train.device": "cpu"})
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    out = train_step(model, optimizer, torch.randn(4, 1, 8, 8),
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(out["grad_norm"], torch.linalg.vector_norm(grads), rtol=1e-5)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_a_non_finite_step_changes_no_weight(amp, tiny):
    model = _digits_model(tiny)
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
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, foreach=False)
    weight.grad = torch.ones(3)
    step_unless_non_finite(optimizer, torch.tensor(False))
    assert torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state
    step_unless_non_finite(optimizer, torch.tensor(True))
    assert (weight.detach() < 1).all()


def test_a_skipped_step_leaves_the_teacher_as_it_is(tiny):
    model = _digits_model(tiny)
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


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys, run_args):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*run_args, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"out='{blocker / 'run'}' is not a writable folder" in err


# ------------------------------------------------------------------ a time budget


def _step_time(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make a budget's timed steps (still taken, and undone) report ``seconds`` a step."""
    real = time_budget._time_steps

    def timed(run):
        steps, _ = real(run)
        return steps, seconds

    monkeypatch.setattr(time_budget, "_time_steps", timed)


def _budgeted(tiny: dict, out: Path, budget: str = "10s", epochs: int = 100) -> Config:
    return _config(tiny, out, **{"train.time_budget": budget, "train.epochs": epochs})


def test_a_budgeted_run_is_the_run_of_the_epochs_it_chose(tmp_path, tiny, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dsmae.pretrain")
    _step_time(monkeypatch, 0.05)  # 4 steps an epoch: about 0.2 s an epoch of the 10 s
    result = pretrain(_budgeted(tiny, tmp_path / "budget"))
    epochs = result.config.train.epochs
    assert 2 <= epochs < 100 and "time budget 10s (10 s): a step takes 0.0500 s" in caplog.text
    assert f"train.epochs={epochs} (at most 100)" in caplog.text
    # recorded where a run records its settings
    saved = Path(result.out) / "config.yaml"
    assert f"  epochs: {epochs}\n" in saved.read_text()
    assert load_checkpoint(result.checkpoint)["config"]["train"]["epochs"] == epochs
    assert read_metrics(Path(result.out) / "metrics.jsonl")[-1]["step"] == 4 * epochs
    assert not list(Path(result.out).glob(".budget*"))  # the timed save left nothing
    # the timed steps were undone: weights, teacher and optimizer are those of the same
    # run of that many epochs without a budget
    plain = _config(tiny, tmp_path / "plain", **{"train.epochs": epochs})
    pretrain(plain)
    _assert_identical(result.checkpoint, Path(plain.out) / "last.pt")


def test_a_resumed_budgeted_run_keeps_its_epochs_and_ends_as_an_uninterrupted_one(
    tmp_path, tiny, monkeypatch
):
    _step_time(monkeypatch, 0.05)
    broken = _budgeted(tiny, tmp_path / "broken")
    first = pretrain(broken, until_epoch=1)  # stopped after its first epoch
    epochs = first.config.train.epochs
    _step_time(monkeypatch, 1.0)  # were it timed again, this resume would choose 2 or so
    resumed = pretrain(broken, resume="auto")
    assert resumed.config.train.epochs == epochs
    plain = _config(tiny, tmp_path / "plain", **{"train.epochs": epochs})
    pretrain(plain)
    _assert_identical(Path(plain.out) / "last.pt", resumed.checkpoint)


def test_a_budget_gives_at_most_the_epochs_asked_for(tmp_path, tiny, monkeypatch):
    _step_time(monkeypatch, 0.01)
    assert pretrain(_budgeted(tiny, tmp_path / "run", "1h", epochs=3)).config.train.epochs == 3


def test_a_budget_is_met_within_a_tenth_on_the_quickstart(tmp_path, capsys):
    # the quickstart on 512 digits (8 steps an epoch, about 1.5 s here), as many epochs as
    # fit 40 s; its monitors (k-NN, health, images every 20 epochs) included
    argv = ["pretrain", "--preset", "quickstart", "--time-budget", "40s", "--epochs", "1000",
            "--set", "data.subset=512", "--set", "probe.after_pretrain=false",
            "--out", str(tmp_path / "qs")]  # fmt: skip
    assert main(argv) == 0
    took = float(capsys.readouterr().out.split("pre-training took ")[1].split(" s")[0])
    assert 36 <= took <= 44, took


@pytest.mark.parametrize(
    "budget,message",
    [
        ("10x", "write a duration such as 90s, 10m, 2h or 1h30m, got '10x' (set by --time-b"),
        ("0s", "train.time_budget: must be a positive duration, got '0s' (set by --time-budget)"),
        ("0.001s", "train.time_budget: 0.001 s fits no epoch: the set-up took"),
    ],
)
def test_a_budget_that_cannot_be_is_one_line_naming_the_flag(
    tmp_path, tiny_run, capsys, budget, message
):
    out = tmp_path / "run"
    assert main([*tiny_run.args("--time-budget", budget, "--out", str(out))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(out.glob("*.pt"))
