"""Representation health: numbers that show a collapse of the encoder's features.

* :func:`feature_std`: SimSiam's per-dimension standard deviation of L2-normalised
  features (Chen & He 2021, section 4.1): 0 for collapsed features.
* :func:`effective_rank`: RankMe (Garrido et al. 2023), the exponential of the entropy of
  the normalised singular values: 1 for rank-one features, up to min(M, D).
* :func:`teacher_student_cosine`: how close the student's tokens are to the EMA teacher's.

These take features as (M, D) tensors, one row per sample (here: per patch token), and
return 0-d float tensors on the input's device. One more number shows whether each loss
term steers the encoder at all:

* :func:`gradient_share`: the norms of the encoder gradients of the weighted terms
  ``lam * L_y`` and ``(1 - lam) * L_z`` (:func:`term_gradients`), their ratio and cosine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

RANKME_EPS = 1e-7  # the epsilon of RankMe's p_k = s_k / ||s||_1 + eps


def _check_matrix(features: torch.Tensor, name: str = "features") -> None:
    if features.dim() != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"{name} must be (M, D) with M, D >= 1, got {tuple(features.shape)}")


def feature_std(features: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse measure: the mean over dimensions of the per-dimension standard
    deviation of the L2-normalised rows.

    Each row is scaled to unit L2 norm; the (population) standard deviation of each of the
    D dimensions is taken across the M rows and averaged over the dimensions. Collapsed
    features (every row pointing the same way) give 0; healthy ones, spread like an
    isotropic Gaussian, give about ``1 / sqrt(D)``, which is also the largest possible
    value (the variances of unit vectors sum to at most 1).

    Args:
        features: (M, D).

    Returns:
        0-d float32 tensor (float64 for float64 input).
    """
    _check_matrix(features)
    x = features if features.dtype == torch.float64 else features.float()
    return F.normalize(x, dim=1).std(dim=0, correction=0).mean()


def effective_rank(features: torch.Tensor) -> torch.Tensor:
    """RankMe's effective rank (Garrido et al. 2023, eq. 1), computed in float64.

    With s the singular values of the (M, D) feature matrix,
    ``p_k = s_k / ||s||_1 + eps`` (eps = 1e-7) and ``rank = exp(-sum_k p_k log p_k)``.
    Rank-one features give 1, features with min(M, D) equal singular values give
    min(M, D) (e.g. ``eye(D)``: D); all-zero features give 1 (a full collapse).

    Args:
        features: (M, D).

    Returns:
        0-d float64 tensor.
    """
    _check_matrix(features)
    s = torch.linalg.svdvals(features.double())  # (min(M, D),)
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + RANKME_EPS
    return torch.exp(-(p * p.log()).sum())


def teacher_student_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The mean cosine similarity of matching rows of the student's and teacher's features.

    1 where the student's features point the same way as the teacher's, 0 where they are
    orthogonal, -1 where opposite.

    Args:
        student: (M, D).
        teacher: (M, D), row m is the teacher's features of the sample of student row m.

    Returns:
        0-d float32 tensor (float64 for float64 input).
    """
    _check_matrix(student, "student")
    if teacher.shape != student.shape:
        raise ValueError(
            f"student and teacher must have the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return F.cosine_similarity(student.to(dtype), teacher.to(dtype), dim=1).mean()


def term_gradients(
    terms_of: Callable[[], Mapping[str, torch.Tensor]], params: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The gradient of each scalar loss term with respect to ``params``, flattened into
    one vector per term (zeros where a parameter does not reach the term). Nothing is
    accumulated into the parameters' ``.grad``.

    ``terms_of`` builds the terms anew at each call (a forward pass), and each term's
    gradient comes from a graph of its own, walked back once: a compiled graph's backward
    frees (donates) its buffers, so two backward passes through one graph would fail.

    Args:
        terms_of: () -> name -> 0-d tensor, each built from ``params``; the same names
            and values at every call.
        params: the P parameters, of n values in all.

    Returns:
        name -> (n,) float32, in the order of ``params``.
    """
    grads, terms = {}, terms_of()
    for i, name in enumerate(list(terms)):
        if i:
            terms = terms_of()  # a graph of its own: the one before was walked back
        parts = torch.autograd.grad(terms[name], list(params), allow_unused=True)
        grads[name] = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).detach().float().flatten()
                for g, p in zip(parts, params, strict=True)
            ]
        )
    return grads


def gradient_share(grad_y: torch.Tensor | None, grad_z: torch.Tensor | None) -> dict[str, float]:
    """How much each loss term steers the encoder, from the (n,) gradients of the
    weighted terms (:func:`term_gradients`; None: the method has no such term):
    ``grad_norm_y`` and ``grad_norm_z`` (L2 norms) and, where both are there,
    ``grad_ratio_z_y`` (z over y; infinite where y's is 0) and ``grad_cosine_y_z``
    (their cosine: 1 aligned, 0 orthogonal, -1 opposed)."""
    share: dict[str, float] = {}
    for name, grad in (("y", grad_y), ("z", grad_z)):
        if grad is not None:
            share[f"grad_norm_{name}"] = float(grad.double().norm())
    if grad_y is not None and grad_z is not None:
        y, z = share["grad_norm_y"], share["grad_norm_z"]
        share["grad_ratio_z_y"] = z / y if y > 0 else float("inf")
        share["grad_cosine_y_z"] = float(
            F.cosine_similarity(grad_y.double(), grad_z.double(), dim=0, eps=1e-30)
        )
    return share
