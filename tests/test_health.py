"""Representation health numbers against hand computations."""

import math

import pytest
import torch

from dsmae.health import (
    RANKME_EPS,
    effective_rank,
    feature_std,
    gradient_share,
    teacher_student_cosine,
    term_gradients,
)


def _rankme(p: list[float]) -> float:
    """RankMe by hand from the normalised singular values p (without eps)."""
    q = [x + RANKME_EPS for x in p]
    return math.exp(-sum(x * math.log(x) for x in q))


def test_feature_std_of_identical_rows_is_zero():
    features = torch.tensor([[1.0, 2.0, 3.0]]).repeat(5, 1)
    assert feature_std(features).item() == pytest.approx(0.0, abs=1e-7)


def test_feature_std_of_rows_that_differ_only_in_length_is_zero():
    # L2 normalisation comes first: a collapse in direction is a collapse
    features = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.3, 0.4]])
    assert feature_std(features).item() == pytest.approx(0.0, abs=1e-7)


def test_feature_std_by_hand_on_two_rows():
    # rows normalised: (0.6, 0.8) and (0.8, 0.6); each dimension holds {0.6, 0.8}:
    # mean 0.7, deviations +-0.1, population std 0.1; the mean over the 2 dimensions: 0.1
    features = torch.tensor([[3.0, 4.0], [4.0, 3.0]])
    value = feature_std(features)
    assert value.shape == () and value.dtype == torch.float32
    assert value.item() == pytest.approx(0.1, rel=1e-6)


def test_feature_std_of_isotropic_gaussian_features_is_about_one_over_sqrt_d():
    dim = 64
    features = torch.randn(20_000, dim, generator=torch.Generator().manual_seed(0))
    value = feature_std(features).item()
    assert value == pytest.approx(dim**-0.5, rel=0.02)
    assert value <= dim**-0.5  # the largest possible value


def test_effective_rank_of_identical_rows_is_one():
    features = torch.tensor([[1.0, -2.0, 0.5, 3.0]]).repeat(6, 1)
    value = effective_rank(features)
    assert value.shape == () and value.dtype == torch.float64
    # singular values (s, 0, 0, 0): p = (1, 0, 0, 0) + eps
    assert value.item() == pytest.approx(_rankme([1, 0, 0, 0]), rel=1e-9)
    assert value.item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("dim", [1, 3, 16])
def test_effective_rank_of_an_orthonormal_basis_is_d(dim):
    value = effective_rank(torch.eye(dim)).item()
    assert value == pytest.approx(_rankme([1 / dim] * dim), rel=1e-9)
    assert value == pytest.approx(dim, rel=1e-5)


def test_effective_rank_by_hand_on_two_singular_values():
    # singular values 3 and 1 (any rotation of diag(3, 1) has them): p = (0.75, 0.25),
    # entropy -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623, rank e^0.5623 = 1.7548
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    features = rotation @ torch.diag(torch.tensor([3.0, 1.0]))
    assert effective_rank(features).item() == pytest.approx(1.7548, abs=1e-4)
    assert effective_rank(features).item() == pytest.approx(_rankme([0.75, 0.25]), rel=1e-6)


def test_effective_rank_of_zero_features_is_one():
    assert effective_rank(torch.zeros(4, 3)).item() == pytest.approx(1.0, abs=1e-4)


def test_teacher_student_cosine_by_hand():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-3.0, 0.0]])
    # row cosines: 1, 1/sqrt(2), -1
    expected = (1 + 2**-0.5 - 1) / 3
    value = teacher_student_cosine(student, teacher)
    assert value.shape == ()
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_teacher_student_cosine_of_equal_and_scaled_features_is_one():
    student = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    assert teacher_student_cosine(student, student).item() == pytest.approx(1.0, abs=1e-6)
    assert teacher_student_cosine(student, 4 * student).item() == pytest.approx(1.0, abs=1e-6)
    assert teacher_student_cosine(student, -student).item() == pytest.approx(-1.0, abs=1e-6)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        feature_std(torch.ones(3))
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        effective_rank(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="same shape"):
        teacher_student_cosine(torch.ones(2, 3), torch.ones(3, 3))


def test_term_gradients_by_hand():
    """y = a . w + 0 * v and z = |w|^2 / 2 + 3 v: their gradients over (w, v), flattened."""
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    v = torch.tensor([0.5], requires_grad=True)
    a = torch.tensor([3.0, 4.0])
    passes = []

    def terms() -> dict[str, torch.Tensor]:
        passes.append(1)
        return {"y": (a * w).sum(), "z": 0.5 * (w * w).sum() + 3 * v.sum()}

    grads = term_gradients(terms, [w, v])
    assert len(passes) == 2  # a graph of each term's own, each walked back once
    assert grads["y"].tolist() == [3.0, 4.0, 0.0]  # v does not reach y: zeros
    assert grads["z"].tolist() == [1.0, -2.0, 3.0]
    assert w.grad is None and v.grad is None  # nothing accumulated


def test_gradient_share_by_hand():
    share = gradient_share(torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.6, 0.8]))
    assert share["grad_norm_y"] == pytest.approx(5.0)
    assert share["grad_norm_z"] == pytest.approx(1.0)
    assert share["grad_ratio_z_y"] == pytest.approx(0.2)
    assert share["grad_cosine_y_z"] == pytest.approx(2.4 / 5.0)  # (4 * 0.6) / (5 * 1)
    assert gradient_share(torch.tensor([3.0, 4.0]), None) == {"grad_norm_y": 5.0}
    orthogonal = gradient_share(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert orthogonal["grad_cosine_y_z"] == 0.0 and orthogonal["grad_ratio_z_y"] == 2.0
