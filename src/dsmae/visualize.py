"""The paper's Fig. 2 layout: noisy / denoised / original, two triplets per row.

With the normalised-pixel target the model predicts each patch up to its mean and
scale. Those are estimated WITHOUT looking at the clean patch: for added noise from
the noisy patch itself (its mean, and its variance minus the known noise variance);
for replaced or masked patches (no information left in them) from the clean patches
of the same image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dsmae.checkpoint import checkpoint_config, load_checkpoint, load_weights
from dsmae.config import METHOD_TRAITS, Config, ConfigError
from dsmae.data.augment import denormalize, normalize, to_unit_float
from dsmae.data.decoding import decode_files
from dsmae.losses import PATCH_NORM_EPS
from dsmae.models import PretrainModel, build_model
from dsmae.noise import pixel_mask
from dsmae.patches import patchify, unpatchify
from dsmae.runtime import generator, resolve_device
from dsmae.writes import atomic_write_bytes, check_output_file


def estimate_patch_stats(
    student_patches: torch.Tensor, mask: torch.Tensor, noise_std: float, noise_added: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each corrupted patch's clean pixels, estimated.

    Args:
        student_patches: (B, N, P) patches of the student's input.
        mask: (B, N) bool, True on corrupted patches.
        noise_std: sigma of the added noise.
        noise_added: the corrupted patches are clean + noise (else they carry no signal).

    Returns:
        mean and std, each (B, N, 1).
    """
    mean = student_patches.mean(dim=-1, keepdim=True)
    var = student_patches.var(dim=-1, keepdim=True, unbiased=False)
    if noise_added:
        p = student_patches.shape[-1]
        var = (var - noise_std**2 * (p - 1) / p).clamp(min=0)
    else:
        clean = (~mask).unsqueeze(-1).to(student_patches.dtype)
        count = clean.sum(dim=1, keepdim=True).clamp(min=1)
        mean = ((mean * clean).sum(dim=1, keepdim=True) / count).expand_as(mean)
        var = ((var * clean).sum(dim=1, keepdim=True) / count).expand_as(var)
    return mean, torch.sqrt(var + PATCH_NORM_EPS)


class Reconstruction(NamedTuple):
    """What :func:`denoise` gives: the student's input (noisy or masked) and the
    reconstruction, each (B, C, H, W) normalised, and the corruption mask (B, N)."""

    noisy: torch.Tensor
    restored: torch.Tensor
    mask: torch.Tensor


@torch.no_grad()
def denoise(
    model: PretrainModel, images: torch.Tensor, generator: torch.Generator | None = None
) -> Reconstruction | None:
    """Corrupt ``images`` as in pre-training and reconstruct them
    (:meth:`~dsmae.models.PretrainModel.reconstruct`, in eval mode).

    Args:
        images: (B, C, H, W) normalised.

    Returns:
        the student's input, the reconstruction (clean patches kept, corrupted ones
        predicted) and the mask; None for a model without a decoder.
    """
    was_training = model.training
    model.eval()
    out = model.reconstruct(images, generator)
    model.train(was_training)
    if out.pred is None:
        return None
    p, c = model.patch_size, images.shape[1]
    pred = out.pred.float()
    if model.config.norm_pix_loss:
        drops = METHOD_TRAITS[model.method].drops_patches  # masked, not noisy
        noise_added = not drops and model.config.noise_mode == "add"
        mean, std = estimate_patch_stats(
            patchify(out.student_input, p), out.mask, model.config.noise_std, noise_added
        )
        pred = pred * std + mean
    patches = torch.where(out.mask.unsqueeze(-1), pred, patchify(images, p))
    return Reconstruction(out.student_input, unpatchify(patches, p, c), out.mask)


def to_uint8_images(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Normalised (B, C, H, W) -> (B, H, W, C) uint8 for display."""
    x = denormalize(images.float().cpu(), mean, std).clamp(0, 1)
    return (x.mul(255).round().byte().permute(0, 2, 3, 1)).numpy()


def triplet_grid(
    columns: Sequence[np.ndarray], per_row: int = 2, scale: int = 1, gap: int = 2
) -> Image.Image:
    """Lay out images as rows of ``per_row`` groups; each group shows one image of every
    column side by side (e.g. noisy / denoised / original).

    Args:
        columns: each (B, H, W, C) uint8, all the same shape.
        per_row: groups per row.
        scale: integer up-scaling (nearest neighbour), for small images.
        gap: white pixels between images (doubled between groups).
    """
    b, h, w, c = columns[0].shape
    h, w = h * scale, w * scale
    rows = (b + per_row - 1) // per_row
    group_w = len(columns) * w + (len(columns) - 1) * gap
    width = per_row * group_w + (per_row + 1) * 2 * gap
    height = rows * h + (rows + 1) * 2 * gap
    canvas = np.full((height, width, c), 255, dtype=np.uint8)
    for i in range(b):
        top = 2 * gap + (i // per_row) * (h + 2 * gap)
        left = 2 * gap + (i % per_row) * (group_w + 2 * gap)
        for j, col in enumerate(columns):
            img = col[i].repeat(scale, axis=0).repeat(scale, axis=1)
            x = left + j * (w + gap)
            canvas[top : top + h, x : x + w] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_denoise_figure(
    model: PretrainModel,
    images: torch.Tensor,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
) -> Path | None:
    """Write the Fig. 2 grid (noisy / denoised / original) of ``images`` (normalised,
    (B, C, H, W)) to ``path`` as PNG; returns None for a model without a decoder."""
    result = denoise(model, images, generator)
    if result is None:
        return None
    columns = [to_uint8_images(x, mean, std) for x in (result.noisy, result.restored, images)]
    scale = max(1, 96 // images.shape[-1])
    return _write_image(triplet_grid(columns, per_row=2, scale=scale), Path(path))


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] over the pixels ``where``
    (bool, broadcastable to the images): ``10 log10(1 / MSE)``."""
    where = where.expand_as(a)
    mse = (a - b)[where].double().pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


@dataclass
class DenoiseReport:
    """``dsmae denoise``: the figure and the PSNR (dB) against the original, over the
    corrupted patches only, of the student's input and of the reconstruction."""

    figure: Path
    method: str
    images: int
    psnr_input: float
    psnr_output: float


def denoise_files(
    checkpoint: str | Path,
    files: Sequence[str | Path],
    out: str | Path,
    *,
    seed: int = 0,
    device: str = "auto",
) -> DenoiseReport:
    """The Fig. 2 layout for any image files: noisy / denoised / original (for ``mae``:
    masked / reconstructed / original), with the PSNR of input and reconstruction.

    Each image is resized (shorter side) and centre-cropped to the checkpoint's image
    size and normalised as in pre-training; the corruption is drawn from ``seed``. The
    normalised-pixel prediction is brought back to pixels from the noisy patch's own
    statistics (:func:`estimate_patch_stats`), never from the clean image.

    Raises:
        ConfigError: the checkpoint's method has no pixel decoder (``dsmae-lz``), or
            ``out`` is not a ``.png`` file name, or is one of the inputs.
        DataError: an image cannot be read (naming it).
        WriteError: ``out``'s folder cannot be written (found before any work).
    """
    if Path(out).suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the figure is a PNG file; give a name ending in .png")
    check_output_file(out, "--out", "figure", inputs=[checkpoint, *files])
    model, cfg = _load_decoding_model(checkpoint)
    m, d = cfg.model, cfg.data
    dev = resolve_device(device)
    model.to(dev)
    images, _ = decode_files(
        [Path(f) for f in files], channels=m.in_chans, size=m.img_size, offer_skip=False
    )
    x = normalize(to_unit_float(images.to(dev)), d.mean, d.std)
    result = denoise(model, x, generator(seed, dev))
    assert result is not None
    report = _psnr_report(result, x, cfg, Path(out))
    columns = [to_uint8_images(t, d.mean, d.std) for t in (*result[:2], x)]
    grid = triplet_grid(columns, per_row=2, scale=max(1, 96 // m.img_size)).convert("RGB")
    first = "masked" if METHOD_TRAITS[m.method].drops_patches else "noisy"
    caption = (
        f"{first} / reconstructed / original. PSNR on the corrupted patches: "
        f"input {report.psnr_input:.1f} dB, reconstruction {report.psnr_output:.1f} dB"
    )
    _write_image(_with_caption(grid, caption), report.figure)
    return report


def _write_image(image: Image.Image, path: Path) -> Path:
    """``image`` saved to ``path`` in the format its extension names, through
    :func:`~dsmae.writes.atomic_write_bytes`: never through a link, never half-written."""
    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return atomic_write_bytes(path, buffer.getvalue(), "figure")


def _load_decoding_model(checkpoint: str | Path) -> tuple[PretrainModel, Config]:
    """The pre-training model of ``checkpoint`` (on the CPU), and its config.

    Raises:
        ConfigError: the checkpoint's method has no pixel decoder (``dsmae-lz``).
    """
    state = load_checkpoint(checkpoint)
    cfg = checkpoint_config(state, checkpoint)
    if not METHOD_TRAITS[cfg.model.method].pixel_decoder:
        raise ConfigError(
            f"{checkpoint} was pre-trained with {cfg.model.method}, which has no pixel "
            "decoder: it cannot reconstruct images"
        )
    model = build_model(cfg.model)
    load_weights(model, state["model"], str(checkpoint))
    return model, cfg


def _psnr_report(result: Reconstruction, x: torch.Tensor, cfg: Config, out: Path) -> DenoiseReport:
    """The PSNR of the student's input and of the reconstruction against the original
    ``x`` (B, C, H, W) normalised, over the corrupted patches, in displayed pixels."""
    d = cfg.data
    shown = [denormalize(t.float(), d.mean, d.std).clamp(0, 1) for t in (*result[:2], x)]
    where = pixel_mask(result.mask, cfg.model.patch_size)
    return DenoiseReport(
        figure=out,
        method=cfg.model.method,
        images=len(x),
        psnr_input=psnr(shown[0], shown[2], where),
        psnr_output=psnr(shown[1], shown[2], where),
    )


def _with_caption(image: Image.Image, text: str) -> Image.Image:
    """``image`` with ``text`` in a white strip below it (wrapped to its width)."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    words, lines = text.split(), [""]
    for word in words:
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) <= image.width - 8 or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    line_h = 14
    canvas = Image.new("RGB", (image.width, image.height + line_h * len(lines) + 6), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, image.height + 3 + i * line_h), line, fill="black", font=font)
    return canvas
