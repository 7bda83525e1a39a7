"""What each subcommand of ``dsmae`` runs (``args.run``): the function of the library
it calls with the config its arguments build, and the lines it prints. Each imports
what it runs, so that ``dsmae --help`` imports no torch."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dsmae.cli.flags import config_changes
from dsmae.config import ConfigError, build_config, parse_assignment
from dsmae.preemption import Stopped


def run_pretrain(args: argparse.Namespace) -> None:
    from dsmae.pretrain import pretrain

    cfg = build_config(args.preset, args.config, config_changes(args))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    result = pretrain(cfg, resume=args.resume, force=args.force, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    done = f"after pre-training finished: {result.checkpoint} is complete"
    probe = f"dsmae linprobe --checkpoint {shlex.quote(str(result.checkpoint))}"
    unprobed = (
        f"{done}; its linear probe did not run: {probe}" if cfg.probe.after_pretrain else done
    )
    with _kept_when_stopped(unprobed):
        if result.stop_requested is not None:
            raise Stopped(result.stop_requested)
        print(f"checkpoint: {result.checkpoint}")
        figure = result.out / "denoise.png"
        if figure.exists():
            print(f"denoising figure (noisy / denoised / original): {figure}")
    if cfg.probe.after_pretrain:
        with _kept_when_stopped(f"{done}; its linear probe did not finish: {probe}"):
            device_and_seed = {"train.device": cfg.train.device, "train.seed": cfg.train.seed}
            _probe_after_pretrain(result.checkpoint, device_and_seed, cfg.probe.random_baseline)
        done += " and probed"
    with _kept_when_stopped(done):
        print(f"pre-training took {result.seconds:.0f} s")


@contextlib.contextmanager
def _kept_when_stopped(kept: str) -> Iterator[None]:
    """A stop signal in the body is reported as stopping ``kept`` ("after ...")."""
    try:
        yield
    except Stopped as stop:
        raise Stopped(stop.signal_name, kept) from None


def _probe_after_pretrain(path: Path, changes: Mapping[str, Any], random_baseline: bool) -> None:
    """The linear probe of a fresh checkpoint (read once) by its own probe settings, with
    ``changes``; with ``random_baseline`` also of its architecture at random init."""
    from dsmae.checkpoint import Checkpoint
    from dsmae.evaluation.linprobe import linprobe

    checkpoint = Checkpoint.read(path)
    cfg = build_config(overrides=changes, base=checkpoint.config)
    trained = linprobe(checkpoint, cfg)
    print(f"linear probe top-1, pre-trained encoder: {trained.top1:.2f}%")
    _print_unsaved(trained)
    if random_baseline:
        baseline = linprobe(checkpoint, cfg, random_init=True)
        print(f"linear probe top-1, same encoder at random init: {baseline.top1:.2f}%")
        _print_unsaved(baseline)


def _print_unsaved(result: Any) -> None:
    """All of an evaluation's result (an ``EvalResult``) on stdout where its file could
    not be written: nothing is lost."""
    if result.saved is None:
        print(f"result (not saved to {result.path}): {result.to_json()}")


def _checkpoint_and_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """--checkpoint, read once (a ``Checkpoint``), and its config with the command's
    --config files, --set values and flags on top (a ``Config``, validated)."""
    from dsmae.checkpoint import Checkpoint

    checkpoint = Checkpoint.read(args.checkpoint)
    files, changes = getattr(args, "config", ()), config_changes(args)
    return checkpoint, build_config(files=files, overrides=changes, base=checkpoint.config)


def _frozen_protocol(args: argparse.Namespace, protocol: Any) -> Any:
    """Run ``protocol`` (linprobe or knn_eval) on --checkpoint with the command's flags
    set on its config."""
    checkpoint, cfg = _checkpoint_and_config(args)
    return protocol(checkpoint, cfg, random_init=args.random_init)


def _encoder_label(args: argparse.Namespace) -> str:
    return "random-init encoder" if args.random_init else "pre-trained encoder"


def run_linprobe(args: argparse.Namespace) -> None:
    from dsmae.evaluation.linprobe import linprobe

    result = _frozen_protocol(args, linprobe)
    print(
        f"linear probe top-1 ({_encoder_label(args)}, last epoch of {result.epochs}): "
        f"{result.top1:.2f}% [{result.recipe} recipe]"
    )
    _print_unsaved(result)


def run_knn(args: argparse.Namespace) -> None:
    from dsmae.evaluation.knn import knn_eval

    result = _frozen_protocol(args, knn_eval)
    print(f"k-NN top-1 ({_encoder_label(args)}, k={result.k}, {result.pool}): {result.top1:.2f}%")
    _print_unsaved(result)


def run_finetune(args: argparse.Namespace) -> None:
    from dsmae.evaluation.finetune import finetune

    checkpoint, cfg = _checkpoint_and_config(args)
    result = finetune(checkpoint, cfg, random_init=args.random_init, out=args.out)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    label = "random init (scratch)" if args.random_init else "pre-trained encoder"
    print(
        f"fine-tune top-1 ({label}, last epoch of {result.epochs}): {result.top1:.2f}% "
        f"(best epoch, for reference only: {result.best_top1:.2f}% at epoch {result.best_epoch})"
    )
    _print_unsaved(result)


def run_experiment(args: argparse.Namespace) -> None:
    from dsmae.experiments import GridSettings, run_grid, run_tuned_sweep

    data = {}
    for item in args.data:
        name, sep, folder = item.partition("=")
        if not sep:
            raise ConfigError(f"--data {item!r} is not of the form DATASET=FOLDER")
        data[name] = folder
    # the flags named as the settings they set
    same = ("datasets", "archs", "epochs", "subset", "finetune_epochs", "probe_epochs", "device")
    overrides = dict(parse_assignment(a) for a in args.assign)
    settings = GridSettings(**{k: getattr(args, k) for k in same}, data=data, overrides=overrides)
    if getattr(args, "select", None) is None:
        _refuse_selection_flags_without_select(args)
        table = run_grid(args.name, settings, args.results)
        print(table.read_text(), end="")
        print(f"table: {table} (and {table.with_suffix('.csv')})")
        return
    for outcome in run_tuned_sweep(args.name, settings, _grid_spec(args), args.results,
                                   workers=args.workers, plot=args.plot):  # fmt: skip
        _print_grid(outcome.written)


def _refuse_selection_flags_without_select(args: argparse.Namespace) -> None:
    """A paper grid given --vary without --select would drop the values silently."""
    if getattr(args, "vary", None):
        raise ConfigError(
            f"--vary on dsmae experiment {args.name} gives the values --select chooses among: "
            "add --select KEY",
            "--vary",
        )


def _grid_spec(args: argparse.Namespace, **settings: Any) -> Any:
    """The :class:`~dsmae.experiments.GridSpec` of a command's selection flags."""
    from dsmae.experiments import GridSpec, parse_vary

    return GridSpec(
        vary=tuple(parse_vary(v) for v in args.vary),
        seeds=args.seeds,
        select=args.select,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        bank=args.bank,
        **settings,
    )


def _print_grid(paths: list[Path]) -> None:
    table, *others = paths
    print(table.read_text(), end="")
    print(f"table: {table} (and {', '.join(map(str, others))})")


def run_user_grid(args: argparse.Namespace) -> None:
    from dsmae.experiments import run_spec

    overrides = tuple(config_changes(args).items())
    spec = _grid_spec(args, preset=args.preset, files=tuple(args.config), overrides=overrides)
    outcome = run_spec(spec, args.results, name=args.name, workers=args.workers, plot=args.plot)
    _print_grid(outcome.written)


def run_export(args: argparse.Namespace) -> None:
    from dsmae.export import (
        CONFIG_FILE,
        ONNX_FILE,
        WEIGHTS_FILE,
        check_repo_id,
        export_encoder,
        push_to_hub,
    )

    if args.private and args.push_to_hub is None:
        raise ConfigError("--private makes the repo of --push-to-hub private: give both")
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)  # before any work
    out = export_encoder(
        args.checkpoint,
        args.out,
        teacher=args.teacher,
        pool=args.pool or "avg",
        onnx=args.onnx,
        overwrite=args.overwrite,
    )
    files = [WEIGHTS_FILE, CONFIG_FILE, *([ONNX_FILE] if args.onnx else [])]
    print(f"encoder written to {out}: {', '.join(files)}")
    if args.push_to_hub is not None:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f'pushed to {url}: timm.create_model("hf-hub:{args.push_to_hub}", pretrained=True)')


def run_features(args: argparse.Namespace) -> None:
    from dsmae.checkpoint import Checkpoint
    from dsmae.features import folder_features

    feats, names = folder_features(
        Checkpoint.read(args.checkpoint),
        args.data,
        args.out,
        pool=args.pool,
        teacher=args.teacher,
        skip_bad_images=bool(args.skip_bad_images),
        device=args.device,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print(f"features: {feats}; their image files, in order: {names}")


def run_denoise(args: argparse.Namespace) -> None:
    from dsmae.visualize import denoise_files

    report = denoise_files(
        args.checkpoint, args.images, args.out, seed=args.seed, device=args.device
    )
    print(
        f"{report.figure}: {report.images} image(s); PSNR on the corrupted patches: input "
        f"{report.psnr_input:.2f} dB, reconstruction {report.psnr_output:.2f} dB"
    )


def run_plot(args: argparse.Namespace) -> None:
    from dsmae.plots import plot_run

    print(f"curves: {plot_run(args.run_dir, args.out)}")


def run_shards(args: argparse.Namespace) -> None:
    from dsmae.data.shard_writer import write_shards

    written = write_shards(
        args.folder, args.out, args.shard_size, seed=args.seed, overwrite=args.overwrite
    )
    labels = f"{len(written.classes)} classes" if written.classes else "unlabelled"
    print(f"{written.images} images ({labels}) in {written.shards} shard(s): {written.pattern}")
    print(
        f"pre-train on them with: --data {shlex.quote(written.pattern)} "
        f"--set data.samples_per_epoch={written.images}"
    )


def run_bench(args: argparse.Namespace) -> None:
    from dsmae.bench import format_report, run_bench, to_json

    shape = (args.method, args.arch, args.img_size, args.patch_size, args.batch_size)
    result = run_bench(
        *shape,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        in_chans=args.in_chans,
        seed=args.seed,
        overrides=config_changes(args),
        parts_time=args.parts,
        profile=args.profile,
    )
    print(to_json(result) if args.json else format_report(result))
