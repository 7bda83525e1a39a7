"""Shared fixtures: the tiny model and the tiny run every test builds on (``tiny``,
``tiny_run``, ``counted_tiny``), tiny finished runs on real digits, a few hundred real
CIFAR-10 images, a local file server and a driver script that injects a fault."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

if TYPE_CHECKING:
    from dsmae.models import PretrainModel

# ------------------------------------------------------------------ the tiny model

# The unit tests' ViT: 16x16 images, patch 4 -> 16 tokens; 2 blocks of width 32 (2 heads),
# one decoder and one regressor block.
TINY: Mapping[str, Any] = MappingProxyType(
    {
        "arch": "vit_tiny",
        "img_size": 16,
        "patch_size": 4,
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 2,
        "decoder_depth": 1,
        "regressor_depth": 1,
    }
)


@pytest.fixture
def tiny() -> dict[str, Any]:
    """The unit tests' ViT (:data:`TINY`) as options of ``dsmae.build`` / ``model_config``;
    a test's own keywords on top (``{**tiny, "depth": 1}``) make its variation."""
    return dict(TINY)


@dataclass(frozen=True)
class CountedTiny:
    """The tiny ViT shrunk to the model whose training-step FLOPs ``test_flops.py`` counts
    by hand: 8x8 grey images, patch 2 -> N = 16 patch tokens, one block of width 32, noise
    ratio 0.75 -> K = 12 corrupted tokens."""

    options: Mapping[str, Any]
    dsmae_flops: int  # a DSMAE training step's FLOPs per image, counted by hand

    def build(self, method: str) -> PretrainModel:
        """A ``method`` model of these options drawn after ``torch.manual_seed(0)``, in
        training mode."""
        import torch

        from dsmae.config import model_config
        from dsmae.models import build_model

        torch.manual_seed(0)
        return build_model(model_config(method, **self.options)).train()


COUNTED_TINY = CountedTiny(
    MappingProxyType(
        {**TINY, "img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "noise_ratio": 0.75}
    ),
    dsmae_flops=3_831_360,
)


@pytest.fixture
def counted_tiny() -> CountedTiny:
    """The model of hand-counted FLOPs (:class:`CountedTiny`)."""
    return COUNTED_TINY


# ``dsmae bench``'s flags for the model's shape; the rest of a model goes in ``--set``
BENCH_SHAPE = ("arch", "img_size", "patch_size", "in_chans")


@pytest.fixture
def bench_args(counted_tiny: CountedTiny) -> list[str]:
    """The counted model as ``dsmae bench`` arguments (its shape as flags, the rest as
    ``--set``), on the CPU."""
    options = counted_tiny.options
    flags = [
        arg for key in BENCH_SHAPE for arg in (f"--{key.replace('_', '-')}", str(options[key]))
    ]
    sets = [
        a for k, v in options.items() if k not in BENCH_SHAPE for a in ("--set", f"model.{k}={v}")
    ]
    return [*flags, *sets, "--device", "cpu"]


# ------------------------------------------------------------------ the tiny run


def _as_sets(settings: Mapping[str, Any]) -> list[str]:
    """Dotted config settings (strings, integers, booleans) as ``--set KEY=VALUE``
    arguments."""
    text = {key: v if isinstance(v, str) else json.dumps(v) for key, v in settings.items()}
    return [arg for key, value in text.items() for arg in ("--set", f"{key}={value}")]


@dataclass(frozen=True)
class TinyRun:
    """A pre-training of seconds on 128 real digits: the quickstart preset (8x8 grey digits)
    with a ViT of the tiny width in one block on 4x4 patches (4 tokens), batch 32 -> 4
    steps an epoch, 2 epochs, a metrics line every step, on the CPU.

    ``overrides`` holds these settings as dotted config keys (on top of ``preset``), for
    ``dsmae.pretrain``; ``args()`` is the same run as a ``dsmae pretrain`` command line
    whose every setting is a ``--set``, so that a flag or a later ``--set`` a test adds
    wins; the command also leaves out the linear probe it runs after a quickstart run.
    """

    model: Mapping[str, Any]  # the model's settings
    run: Mapping[str, Any]  # the data's and the training's
    preset: str = "quickstart"
    # the command's alone: no linear probe after the pre-training
    COMMAND: ClassVar[Mapping[str, Any]] = MappingProxyType({"probe.after_pretrain": False})
    # args(checkpoints=True): a checkpoint after every epoch, none pruned
    EVERY_EPOCH: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"train.checkpoint_every": 1, "train.keep_checkpoints": 0}
    )

    @property
    def overrides(self) -> dict[str, Any]:
        """The run's settings as dotted config keys, on top of :attr:`preset`."""
        return {**self.model, **self.run}

    @property
    def model_args(self) -> list[str]:
        """The model's settings alone as ``--set`` arguments: shrinks any run's model."""
        return _as_sets(self.model)

    def args(self, *extra: str, preset_model: bool = False, checkpoints: bool = False) -> list[str]:
        """``pretrain --preset quickstart`` with the run's settings, then ``extra``.

        Args:
            preset_model: keep the preset's own model (4 blocks of width 96, patch 2).
            checkpoints: also a checkpoint after every epoch, none pruned
                (``checkpoint-00000004.pt``, ``checkpoint-00000008.pt``, ...).
        """
        settings = {
            **({} if preset_model else self.model),
            **self.run,
            **self.COMMAND,
            **(self.EVERY_EPOCH if checkpoints else {}),
        }
        return ["pretrain", "--preset", self.preset, *_as_sets(settings), *extra]


TINY_RUN = TinyRun(
    model=MappingProxyType(
        {
            "model.depth": 1,
            **{
                f"model.{k}": TINY[k]
                for k in ("embed_dim", "num_heads", "decoder_depth", "regressor_depth")
            },
            "model.patch_size": 4,
            "model.mlp_ratio": 4.0,  # the quickstart's before issue 21 (its preset now: 2)
        }
    ),
    run=MappingProxyType(
        {
            "data.subset": 128,
            "train.batch_size": 32,
            "train.epochs": 2,
            "train.log_every": 1,
            "train.device": "cpu",
            # the quickstart's recipe before issue 21 (its preset now: 8e-3, every step),
            # which the tests' expectations were written for
            "train.base_lr": 3e-3,
            "train.ema_every": "epoch",
        }
    ),
)


@pytest.fixture(scope="session")
def tiny_run() -> TinyRun:
    """The tiny pre-training on 128 real digits (:class:`TinyRun`)."""
    return TINY_RUN


def digits_run_into(out: Path, method: str = "dsmae") -> Path:
    """The tiny run of ``method`` (warm-up 1 epoch, every monitor every epoch) through
    ``dsmae.pretrain`` into ``out``; returns the run folder (last.pt, metrics.jsonl, ...)."""
    from dsmae.config import build_config
    from dsmae.pretrain import pretrain

    more = {"model.method": method, "train.warmup_epochs": 1, "monitor.knn_every": 1,
            "monitor.every": 1}  # fmt: skip
    cfg = build_config(TINY_RUN.preset, overrides={**TINY_RUN.overrides, **more, "out": str(out)})
    return pretrain(cfg).out


@pytest.fixture
def tiny_digits_run() -> Callable[..., Path]:
    """``tiny_digits_run(out, method="dsmae")``: a fresh finished tiny run in ``out``."""
    return digits_run_into


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished DSMAE run on real digits, shared by the session."""
    return digits_run_into(tmp_path_factory.mktemp("digits") / "dsmae")


@pytest.fixture(scope="session")
def digits_mae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny run with MAE."""
    return digits_run_into(tmp_path_factory.mktemp("digits") / "mae", "mae")


# ------------------------------------------------------------------ data and faults

CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 images from ../shared/data: 40 train and 10 test images per class,
    as an image folder with train/ and test/ class sub-folders. Skips where absent."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR_ARCHIVE}")
    out = tmp_path_factory.mktemp("cifar10")
    wanted = {"train": 40, "test": 10}
    taken: dict[tuple[str, str], int] = defaultdict(int)
    with tarfile.open(CIFAR_ARCHIVE, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10/<split>/<class>/<file>.jpg
            if not member.isfile() or len(parts) != 4 or parts[1] not in wanted:
                continue
            key = (parts[1], parts[2])
            if taken[key] >= wanted[parts[1]]:
                continue
            taken[key] += 1
            target = out / parts[1] / parts[2] / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return out


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch):
    """``serve(path)`` -> an http://127.0.0.1 URL of that file, for the test's duration."""
    from torchvision_fakes import serve_files

    yield from serve_files(monkeypatch)


def _in_a_small_file_system(script: str, size: str = "3m") -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a fresh tmpfs of ``size`` mounted at $MNT, in a private
    mount namespace (as root; else as a user namespace's root): a real full disk (or,
    remounted ``ro``, a read-only one), gone when the script ends. Skips where neither is
    allowed."""
    if sys.platform != "linux":
        pytest.skip("tmpfs and mount namespaces are Linux's")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    ns = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        ns = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]
    setup = f'MNT=$(mktemp -d) && mount -t tmpfs -o size={size} tmpfs "$MNT" || exit 97\n'
    done = subprocess.run(
        [*ns, "sh", "-c", setup + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    if done.returncode == 97 or "unshare failed" in done.stderr:
        pytest.skip(f"a tmpfs cannot be mounted here: {done.stderr.strip()[-200:]}")
    return done


@pytest.fixture
def small_file_system() -> Callable[..., subprocess.CompletedProcess]:
    """``small_file_system(script, size="3m")``: run the sh ``script`` with a private tmpfs
    at $MNT (and $PYTHON this interpreter); skips where none can be mounted."""
    return _in_a_small_file_system


@pytest.fixture
def fault_driver(tmp_path: Path) -> Callable[[str], str]:
    """``fault_driver(body)``: the path of a script that runs ``body`` (a fault; os, signal,
    sys and torch imported) and then ``dsmae`` with the script's own arguments."""

    def write(body: str) -> str:
        script = tmp_path / "driver.py"
        script.write_text(
            "import os, signal, sys\nimport torch\n"
            + textwrap.dedent(body)
            + "\nfrom dsmae.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        )
        return str(script)

    return write
