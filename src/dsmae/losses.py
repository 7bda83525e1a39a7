"""The two DSMAE losses (paper eq. 1-3), as pure functions on already-selected tokens, and
the averaged-blocks target of the ``model.target_layers`` option."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH_NORM_EPS = 1e-6


def normalize_patches(patches: torch.Tensor, eps: float = PATCH_NORM_EPS) -> torch.Tensor:
    """Per-patch normalisation of the pixel target (MAE's ``norm_pix_loss``).

    Each patch gets mean 0 and is divided by its standard deviation over its p*p*C
    values: ``(x - mean) / sqrt(var + eps)`` with the UNBIASED variance, exactly as MAE's
    code (SPEC 1.9), so that losses are comparable with MAE's.

    Args:
        patches: (..., P) with P = p*p*C.

    Returns:
        (..., P).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / torch.sqrt(var + eps)


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, *, norm_pix: bool = True) -> torch.Tensor:
    """``L_y`` (eq. 1): mean squared error to the clean pixels of the corrupted patches.

    Squared error is averaged over the P pixel values of a patch, then over patches.

    Args:
        pred: (B, K, P) decoder output for the K corrupted patches.
        target: (B, K, P) clean pixels of the same patches.
        norm_pix: compare against :func:`normalize_patches` of ``target``.

    Returns:
        scalar.
    """
    if norm_pix:
        target = normalize_patches(target)
    return (pred - target).pow(2).mean()


def feature_loss(
    pred: torch.Tensor, target: torch.Tensor, *, target_norm: str = "none"
) -> torch.Tensor:
    """``L_z`` (eq. 2): one minus the cosine similarity per token, averaged over tokens.

    The target is detached (stop-gradient ``sg[Z_o']``).

    Args:
        pred: (B, K, D) regressor output on the corrupted tokens.
        target: (B, K, D) teacher tokens at the same positions.
        target_norm: "none" or "layernorm" (LayerNorm without affine on each target token).

    Returns:
        scalar.
    """
    target = target.detach()
    if target_norm == "layernorm":
        target = F.layer_norm(target, target.shape[-1:])
    elif target_norm != "none":
        raise ValueError(f"target_norm must be 'none' or 'layernorm', not {target_norm!r}")
    return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()


def block_average_target(blocks: list[torch.Tensor]) -> torch.Tensor:
    """data2vec (v1, vision)'s target from a teacher's top-K blocks: the mean of their
    outputs (the residual stream as it leaves each block), then a layer norm without
    affine parameters over the features of each token.

    This is the order of data2vec's own code for images (fairseq
    ``examples/data2vec/models/data2vec_vision.py`` under its
    ``base_imagenet_d2v1.yaml``: ``layer_norm_targets`` after the average, no norm of a
    single block; its speech recipe instance-normalises each block first instead).

    Args:
        blocks: K tensors (..., D), the deepest last.

    Returns:
        (..., D).
    """
    if not blocks:
        raise ValueError("at least one block output is needed")
    mean = torch.stack(blocks).float().mean(dim=0)
    return F.layer_norm(mean, mean.shape[-1:])


def combine_losses(
    loss_y: torch.Tensor | None, loss_z: torch.Tensor | None, lam: float
) -> torch.Tensor:
    """``L = lam * L_y + (1 - lam) * L_z`` (eq. 3); a variant with one term uses that term alone."""
    if loss_y is None and loss_z is None:
        raise ValueError("at least one of loss_y and loss_z is needed")
    if loss_z is None:
        return loss_y
    if loss_y is None:
        return loss_z
    return lam * loss_y + (1.0 - lam) * loss_z
