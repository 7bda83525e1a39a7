"""Taking the encoder away: export a checkpoint's encoder in timm's Hugging Face Hub
layout (and as ONNX), push it to the Hub, and load it back.

An export is a folder laid out as ``timm.models.save_for_hf`` lays out a model, tensors
and JSON only (nothing that runs code when read):

``model.safetensors``
    the encoder's state dict, with timm's ``VisionTransformer`` key names;
``config.json``
    ``architecture`` (a timm model name), ``num_classes`` (0: no classifier, the model
    returns features) and ``num_features``; ``global_pool``: "avg" (the mean of the patch
    tokens, what every DSMAE loss trains, SPEC section 6) or "token" ([CLS]);
    ``model_args`` (what ``timm.create_model`` builds the encoder with besides the name);
    ``pretrained_cfg``: the input the encoder was trained on (``input_size`` (C, H, W),
    ``mean``, ``std``; a bilinear resize of the whole image: ``crop_pct`` 1); and, under
    ``dsmae`` (a key timm ignores), where the weights came from;
``encoder.onnx`` (asked for)
    (B, C, H, W) normalised images -> (B, D) pooled features, any B, ONNX opset
    :data:`ONNX_OPSET`.

timm loads it alone, offline, and builds its input pipeline from it::

    model = timm.create_model("local-dir:EXPORT_DIR", pretrained=True)   # (B, C, H, W) -> (B, D)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

and from the Hub once pushed (:func:`push_to_hub`): ``"hf-hub:USER/REPO"``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import shutil
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from timm.models.vision_transformer import VisionTransformer

from dsmae.checkpoint import Checkpoint, CheckpointError, check_encoder_size, load_weights
from dsmae.config import ARCHS, Config, ConfigError, ModelConfig, Pool, check_pool_argument
from dsmae.config.checks import shown
from dsmae.writes import (
    WriteError,
    atomic_write_bytes,
    atomic_write_text,
    unwritable_reason,
    written,
)

# our architectures as timm names (their depth, width and heads; see config.ARCHS)
TIMM_NAMES = {arch: f"{arch}_patch16_224" for arch in ARCHS}
TIMM_POOLS: dict[Pool, str] = {"avg": "avg", "cls": "token"}  # our pool -> timm's global_pool
WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE = "model.safetensors", "config.json", "encoder.onnx"
ONNX_OPSET = 18
ONNX_INSTALL = 'pip install "dsmae[onnx]"'


class HubError(WriteError):
    """An export could not be pushed to the Hugging Face Hub: unreachable, offline mode,
    no or a refused token, a malformed repo id. The message says what to do."""


def timm_model_args(m: ModelConfig, pool: str = "avg") -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that rebuild the encoder of ``m``
    (resolved) from its timm architecture name, its forward pooling the features as
    ``pool`` says: "avg" (the mean of the patch tokens) or "cls" ([CLS]), both after the
    final norm (``fc_norm=False``: timm's "avg" would otherwise replace that norm with a
    new, untrained one)."""
    return {
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "in_chans": m.in_chans,
        "embed_dim": m.embed_dim,
        "depth": m.depth,
        "num_heads": m.num_heads,
        "mlp_ratio": m.mlp_ratio,
        "qkv_bias": True,
        "global_pool": TIMM_POOLS[pool],
        "fc_norm": False,
    }


def timm_pretrained_cfg(
    in_chans: int, img_size: int, mean: list[float], std: list[float]
) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of an encoder trained on (in_chans, img_size, img_size)
    images normalised with ``mean`` and ``std``: what ``timm.data.resolve_data_config``
    reads. Our images are resized whole (shorter side, bilinear), so no crop margin."""
    return {
        "input_size": [in_chans, img_size, img_size],
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(mean),
        "std": list(std),
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def config_pretrained_cfg(cfg: Config) -> dict[str, Any]:
    """:func:`timm_pretrained_cfg` of a checkpoint's config."""
    return timm_pretrained_cfg(cfg.model.in_chans, cfg.model.img_size, cfg.data.mean, cfg.data.std)


def encoder_from_checkpoint(
    checkpoint: str | Path, *, random_init: bool = False, seed: int = 0, teacher: bool = False
) -> tuple[VisionTransformer, Config]:
    """The student encoder of a ``dsmae pretrain`` checkpoint (the EMA teacher with
    ``teacher``; the same architecture freshly initialised from ``seed`` with
    ``random_init``) and the checkpoint's config: :meth:`Checkpoint.encoder` of the file.

    Raises:
        CheckpointError: unreadable or unsafe file, no teacher in it, or weights that do
            not fit the architecture its config describes.
    """
    read = Checkpoint.read(checkpoint)
    return read.encoder(random_init=random_init, seed=seed, teacher=teacher), read.config


def export_encoder(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    teacher: bool = False,
    pool: str = "avg",
    onnx: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the encoder of ``checkpoint`` (a file, or one already read) to
    ``out/model.safetensors`` and ``out/config.json`` (see the module docstring), and
    with ``onnx`` to ``out/encoder.onnx``, each atomically. Returns ``out``.

    Args:
        teacher: export the EMA teacher instead of the student.
        pool: the features the exported model returns: "avg" (the mean of the patch
            tokens) or "cls" ([CLS]).

    Raises:
        ConfigError: ``out`` is a file, or a folder that is not empty (unless
            ``overwrite``); ``onnx`` without the onnx packages.
        CheckpointError: see :meth:`Checkpoint.read` and :meth:`Checkpoint.encoder`.
        WriteError: a file could not be written (e.g. a full disk); nothing half-written
            is left.
    """
    check_pool_argument(pool)
    if onnx:
        require_onnx("--onnx")
    out = Path(out)
    _check_export_folder(out, overwrite)
    why = unwritable_reason(out)  # before any work
    if why is not None:
        raise WriteError(f"could not write export {out}: {why}")
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.read(checkpoint)
    encoder = checkpoint.encoder(teacher=teacher)
    with written("export", out):
        out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS_FILE, save(weights, metadata={"format": "pt"}), "export")
    config = export_config(checkpoint, teacher, pool)
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n", "export")
    if onnx:
        encoder.reset_classifier(0, TIMM_POOLS[pool])  # forward: the pooled features
        export_onnx(encoder, out / ONNX_FILE)
    else:  # an encoder.onnx of an export overwritten here would no longer match
        with written("export", out / ONNX_FILE):
            (out / ONNX_FILE).unlink(missing_ok=True)
    return out


def _check_export_folder(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder unless ``overwrite``.

    Raises:
        ConfigError: naming ``--out``.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder to write the export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out {out} is not empty; pick another folder, or pass --overwrite to replace "
            "its model.safetensors, config.json and encoder.onnx"
        )


def export_config(checkpoint: Checkpoint, teacher: bool, pool: str = "avg") -> dict[str, Any]:
    """The ``config.json`` of an export of ``checkpoint``'s student (or ``teacher``),
    pooling as ``pool`` says ("avg" or "cls"): timm's keys, and ours under ``dsmae``."""
    cfg = checkpoint.config
    return {
        "architecture": TIMM_NAMES[cfg.model.arch],
        "num_classes": 0,
        "num_features": cfg.model.embed_dim,
        "global_pool": TIMM_POOLS[pool],
        "model_args": timm_model_args(cfg.model, pool),
        "pretrained_cfg": config_pretrained_cfg(cfg),
        "dsmae": {
            "method": cfg.model.method,
            "weights": "teacher" if teacher else "student",
            "step": int(checkpoint.state["step"]),
            "checkpoint": Path(checkpoint.path).name,
            "version": version("dsmae"),
        },
    }


# ------------------------------------------------------------------ ONNX


def require_onnx(what: str) -> None:
    """Raise unless ONNX can be written here: torch's exporter (``dynamo=True``, torch
    2.5 on) and the packages it needs, ``onnx`` and ``onnxscript``.

    Raises:
        ConfigError: naming ``what`` and how to install what is missing.
    """
    if torch.__version__ < "2.5":
        raise ConfigError(f"{what} needs torch 2.5 or later (this is {torch.__version__})")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{what} needs the {' and '.join(missing)} package(s): {ONNX_INSTALL}")


def export_onnx(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model`` (the input size of a timm ViT; its forward (B, C, H, W) normalised
    images -> (B, D) features) to ``path`` as ONNX: opset :data:`ONNX_OPSET`, input
    "images" with a dynamic batch axis, output "features". Written atomically.

    Raises:
        WriteError: the file could not be written.
    """
    channels, (height, width) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    example = torch.zeros(2, channels, height, width)  # 2, not 1: a batch of 1 is specialised
    with _quiet("onnxscript", "onnx_ir"):  # their INFO lines: each graph rewrite
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    return atomic_write_bytes(path, program.model_proto.SerializeToString(), "ONNX model")


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only warnings and errors from ``loggers`` (and theirs) during the body."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------ the Hub


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an export folder to the Hugging Face Hub model repo ``repo_id``, created
    if it does not exist, as timm's ``push_to_hf_hub`` does: one commit of the export's
    files, with a model card (README.md) when the repo has none. Then
    ``timm.create_model("hf-hub:" + repo_id, pretrained=True)`` loads it anywhere.

    Returns:
        the repo's URL.

    Raises:
        FileNotFoundError: ``folder`` is no export.
        ConfigError: it is one of dsmae 0.1, which timm's ``hf-hub:`` cannot load.
        HubError: the Hub cannot be reached or refuses the upload (one line: why, and
            what to do).
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    folder = Path(folder)
    config = read_export_config(folder)
    if "pretrained_cfg" not in config:
        raise ConfigError(
            f"{folder} is an export of dsmae 0.1, which timm cannot load from the Hub: export "
            "its checkpoint again"
        )
    try:
        api = HfApi(library_name="dsmae", library_version=version("dsmae"))
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        has_card = api.file_exists(repo.repo_id, "README.md")
        with TemporaryDirectory(prefix="dsmae-push-") as staging:
            for name in (WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE):
                if (folder / name).is_file():
                    shutil.copy2(folder / name, Path(staging) / name)
            if not has_card:
                card = model_card(repo.repo_id, config)
                (Path(staging) / "README.md").write_text(card, encoding="utf-8")
            api.upload_folder(
                repo_id=repo.repo_id,
                folder_path=staging,
                commit_message=f"Add a {config['dsmae']['method']} encoder (dsmae export)",
            )
    except _hub_errors() as err:
        raise HubError(
            f"could not push {folder} to the Hugging Face Hub repo {repo_id}: "
            f"{_first_line(err).rstrip('.')}. The export is written; once the Hub can be "
            "reached and you are logged in (`hf auth login`, or HF_TOKEN), run this command "
            "again with --overwrite"
        ) from None
    return str(repo)


def check_repo_id(repo_id: str) -> None:
    """Refuse, before any work, a Hub repo id that is empty or malformed.

    Raises:
        ConfigError: naming ``--push-to-hub`` and what an id looks like.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    shape = "USER/NAME or NAME, of letters, digits, '-', '_' and '.'"
    if not repo_id.strip():
        raise ConfigError(f"--push-to-hub needs a Hub model repo id ({shape})", "--push-to-hub")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"--push-to-hub {repo_id!r} is not a Hub model repo id ({shape})", "--push-to-hub"
        ) from None


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a push fails with that is no bug: the HTTP library's errors (HfHubHTTPError's
    other base: requests', httpx' or httpx2's own, by huggingface_hub version; its
    connection errors derive from it too), OSErrors (offline mode, no token, a refused
    connection) and a malformed repo id."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    return (OSError, HFValidationError, *HfHubHTTPError.__bases__)


def _first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (the Hub's run on), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def model_card(repo_id: str, config: dict[str, Any]) -> str:
    """The README.md of a pushed export: the Hub's metadata and how to load it."""
    ours, inputs = config["dsmae"], config["pretrained_cfg"]["input_size"]
    mode = "L" if inputs[0] == 1 else "RGB"
    pooled = "the mean of the patch tokens" if config["global_pool"] == "avg" else "[CLS]"
    return f"""---
library_name: timm
pipeline_tag: image-feature-extraction
tags:
- image-feature-extraction
- timm
- dsmae
---
# {repo_id.split("/")[-1]}

A ViT encoder pre-trained with {ours["method"]} (dsmae {ours["version"]}; the {ours["weights"]}
at step {ours["step"]}). Input: {inputs[0]} x {inputs[1]} x {inputs[2]}; output:
{config["num_features"]} features, {pooled}.

```python
import timm, torch
from PIL import Image

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
with torch.no_grad():
    features = model(transform(Image.open("image.jpg").convert("{mode}")).unsqueeze(0))
```
"""


# ------------------------------------------------------------------ loading


def read_export_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of an export folder.

    Raises:
        FileNotFoundError: there is none: not an export.
        CheckpointError: it is no JSON object.
    """
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not a dsmae export")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file} is not JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return config


def load_encoder(path: str | Path, num_classes: int = 0, **timm_kwargs: Any) -> VisionTransformer:
    """A timm ``VisionTransformer`` with the weights of an export folder (the model from
    ``timm.create_model``, the weights loaded strictly: a ``config.json`` that does not
    describe the stored weights is an error naming the missing and unexpected ones) or of
    a ``dsmae pretrain`` checkpoint file. Its ``pretrained_cfg`` holds the input it was
    trained on, for ``timm.data.resolve_data_config(model=...)``; its forward pools as
    the export does (``global_pool``), or for a checkpoint as its ``probe.pool`` says
    (the mean of the patch tokens by default, as an export of it).

    Args:
        path: a folder written by :func:`export_encoder` (also one of dsmae 0.1's, a
            ``config.json`` without ``pretrained_cfg``), or a checkpoint.
        num_classes: size of a new (randomly initialised) classifier; 0: none, the model
            returns pooled features.
        timm_kwargs: further ``timm.create_model`` arguments (export folders only), e.g.
            ``drop_path_rate``.
    """
    path = Path(path)
    if path.is_dir():
        config = read_export_config(path)
        _check_export(config, path)
        model = timm.create_model(
            config["architecture"],
            pretrained=False,
            num_classes=num_classes,
            pretrained_cfg=config.get("pretrained_cfg") or _first_pretrained_cfg(config),
            **{**config["model_args"], **timm_kwargs},
        )
        weights = load_file(str(path / WEIGHTS_FILE))
        if num_classes:  # a new classifier: its weights are the model's own, fresh ones
            weights.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
        load_weights(model, weights, f"{path} (export)")
        return model
    checkpoint = Checkpoint.read(path)
    encoder = checkpoint.encoder()
    encoder.pretrained_cfg = config_pretrained_cfg(checkpoint.config)
    encoder.reset_classifier(num_classes, TIMM_POOLS[checkpoint.config.probe.pool])
    return encoder


# model_args an export must give, as positive numbers, for its encoder to be sized up
SIZED_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")


def _check_export(config: dict[str, Any], folder: Path) -> None:
    """Refuse, before anything is built, an export whose ``config.json`` names no ViT of
    ours, gives no sizes, or describes an encoder far larger than its weights.

    Raises:
        CheckpointError: naming the folder and the key.
    """
    where = f"{folder / CONFIG_FILE}"
    name = config.get("architecture")
    if name not in TIMM_NAMES.values():
        raise CheckpointError(
            f"{where}: architecture {name!r} is not a ViT that dsmae exports (one of "
            f"{', '.join(TIMM_NAMES.values())})"
        )
    args = config.get("model_args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{where}: no model_args mapping")
    for key in (*SIZED_ARGS, "mlp_ratio"):
        value = args.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (
            not number
            or not 0 < value < math.inf
            or (key != "mlp_ratio" and not isinstance(value, int))
        ):
            raise CheckpointError(
                f"{where}: model_args.{key} must be a positive number, got {shown(value)}"
            )
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}: not a dsmae export")
    try:
        with safe_open(str(weights), "pt") as stored:
            shapes = {k: stored.get_slice(k).get_shape() for k in stored.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from None
    numel = sum(math.prod(shape) for shape in shapes.values())
    check_encoder_size(
        args["depth"], args["embed_dim"], args["mlp_ratio"], args["patch_size"], numel, where
    )
    _check_shapes(args, shapes, where)
    _check_normalisation(config, args["in_chans"], where)


def _check_shapes(args: dict[str, Any], shapes: dict[str, list[int]], where: str) -> None:
    """Refuse ``model_args`` whose patch grid, heads or input do not fit the stored
    position and patch embeddings (a 65536-pixel image of 1-pixel patches would allocate
    terabytes before any weight is compared)."""
    size, patch, dim = args["img_size"], args["patch_size"], args["embed_dim"]
    if size % patch:
        raise CheckpointError(
            f"{where}: model_args.patch_size {patch} does not divide img_size {size}"
        )
    if dim % args["num_heads"]:
        raise CheckpointError(
            f"{where}: model_args.num_heads {args['num_heads']} does not divide embed_dim {dim}"
        )
    expected = {
        "pos_embed": ([1, 1 + (size // patch) ** 2, dim], "img_size / patch_size"),
        "patch_embed.proj.weight": ([dim, args["in_chans"], patch, patch], "in_chans / patch_size"),
    }
    for name, (shape, fields) in expected.items():
        if name in shapes and list(shapes[name]) != shape:
            raise CheckpointError(
                f"{where}: model_args.{fields} describe {name} {shape}, but the weights hold "
                f"{list(shapes[name])}"
            )


def _check_normalisation(config: dict[str, Any], channels: int, where: str) -> None:
    """Refuse a ``pretrained_cfg`` (or a dsmae 0.1 ``mean``/``std``) whose mean and std
    are not one finite number per channel (a positive one for std): NaN there gives NaN
    features and no error."""
    stats = config.get("pretrained_cfg") or config
    for key in ("mean", "std"):
        values = stats.get(key)
        numbers = isinstance(values, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
        if not numbers or len(values) != channels or (key == "std" and min(values) <= 0):
            raise CheckpointError(
                f"{where}: {key} must be {channels} finite number(s)"
                + (" above 0" if key == "std" else "")
                + f", got {shown(values)}"
            )


def _first_pretrained_cfg(config: dict[str, Any]) -> dict[str, Any]:
    """The ``pretrained_cfg`` of an export of dsmae 0.1, from its ``mean``, ``std`` and
    ``model_args``."""
    args = config["model_args"]
    return timm_pretrained_cfg(args["in_chans"], args["img_size"], config["mean"], config["std"])
