import json
import math
import shutil

import pytest
import torch

from dsmae.checkpoint import Checkpoint
from dsmae.config import build_config
from dsmae.evaluation.frozen import frozen_features
from dsmae.evaluation.knn import knn_accuracy, knn_eval, knn_predict
from dsmae.evaluation.results import labelled_splits

# Hand-built 2-D example: the query points along +x, so the cosine similarity of a
# training feature (c, s) with c**2 + s**2 = 1 is simply c.
# One class-1 ("B") neighbour at similarity 0.9, two class-0 ("A") neighbours at 0.7,
# and a 4th-nearest class-1 point at similarity 0.6 (outside k = 3).
SIM_B, SIM_A, SIM_FOURTH = 0.9, 0.7, 0.6


def _unit(cos: float, sign: float = 1.0) -> list[float]:
    return [cos, sign * math.sqrt(1 - cos**2)]


HAND_TRAIN = torch.tensor([_unit(SIM_B), _unit(SIM_A), _unit(SIM_A, -1.0), _unit(SIM_FOURTH, -1.0)])
HAND_LABELS = torch.tensor([1, 0, 0, 1])
QUERY = torch.tensor([[1.0, 0.0]])


def _hand_vote(temperature: float) -> int:
    """Weighted vote of the three nearest neighbours, computed by hand."""
    vote_b = math.exp(SIM_B / temperature)
    vote_a = math.exp(SIM_A / temperature) + math.exp(SIM_A / temperature)
    return 1 if vote_b > vote_a else 0


def test_hand_example_single_close_neighbour_beats_two_far_ones_only_at_low_temperature():
    # T = 0.07: exp(12.86) = 3.8e5 versus 2 * exp(10) = 4.4e4, so B wins.
    assert _hand_vote(0.07) == 1
    # T = 1: exp(0.9) = 2.46 versus 2 * exp(0.7) = 4.03, so A wins.
    assert _hand_vote(1.0) == 0
    for temperature in (0.07, 1.0):
        pred = knn_predict(HAND_TRAIN, HAND_LABELS, QUERY, 2, k=3, temperature=temperature)
        assert pred.tolist() == [_hand_vote(temperature)]


def test_hand_example_switches_exactly_at_the_crossover_temperature():
    # exp(0.9 / T) = 2 exp(0.7 / T)  <=>  T = 0.2 / ln 2 ~ 0.2885.
    crossover = (SIM_B - SIM_A) / math.log(2)
    below, above = 0.95 * crossover, 1.05 * crossover
    assert (_hand_vote(below), _hand_vote(above)) == (1, 0)
    preds = [
        knn_predict(HAND_TRAIN, HAND_LABELS, QUERY, 2, k=3, temperature=t).item()
        for t in (below, above)
    ]
    assert preds == [1, 0]


def test_only_the_k_nearest_vote():
    # At T = 1: k = 1 lets only B (similarity 0.9) vote.
    assert knn_predict(HAND_TRAIN, HAND_LABELS, QUERY, 2, k=1, temperature=1.0).item() == 1
    # k = 3: B exp(0.9) = 2.46 < A 2 exp(0.7) = 4.03; the class-1 point at 0.6 is left out.
    assert math.exp(SIM_B) < 2 * math.exp(SIM_A)
    assert knn_predict(HAND_TRAIN, HAND_LABELS, QUERY, 2, k=3, temperature=1.0).item() == 0
    # k = 4 lets it vote: B exp(0.9) + exp(0.6) = 4.28 > A 4.03.
    assert math.exp(SIM_B) + math.exp(SIM_FOURTH) > 2 * math.exp(SIM_A)
    assert knn_predict(HAND_TRAIN, HAND_LABELS, QUERY, 2, k=4, temperature=1.0).item() == 1


def test_similarity_is_cosine_not_euclidean():
    query = torch.tensor([[1.0, 0.0]])
    # Class 0 points the same way as the query but is far away in Euclidean distance;
    # class 1 is Euclidean-close but at 45 degrees.
    train = torch.tensor([[100.0, 1.0], [0.5, 0.5]])
    labels = torch.tensor([0, 1])
    assert knn_predict(train, labels, query, 2, k=1).item() == 0


def _random(seed: int, n: int, m: int, dim: int, classes: int):
    """(n, dim) train features, their (n,) labels in [0, classes) and (m, dim) test
    features, all drawn from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return train, labels, torch.randn(m, dim, generator=g)


def test_scaling_training_features_does_not_change_predictions():
    train, labels, test = _random(0, 100, 40, dim=8, classes=5)
    before = knn_predict(train, labels, test, 5, k=5)
    scaled = train.clone()
    scaled[::3] *= 100.0
    scaled[1::7] *= 0.01
    after = knn_predict(scaled, labels, test, 5, k=5)
    assert torch.equal(before, after)
    assert torch.equal(knn_predict(train, labels, 42.0 * test, 5, k=5), before)


def test_chunking_does_not_change_the_result():
    train, labels, test = _random(1, 300, 137, dim=16, classes=7)
    reference = knn_predict(train, labels, test, 7, chunk_size=1024)
    for chunk_size in (1, 10, 137):
        assert torch.equal(knn_predict(train, labels, test, 7, chunk_size=chunk_size), reference)


def test_k_larger_than_n_uses_all_training_features():
    train, labels = HAND_TRAIN[:3], HAND_LABELS[:3]
    for t in (0.07, 1.0):
        all_three = knn_predict(train, labels, QUERY, 2, k=3, temperature=t)
        clipped = knn_predict(train, labels, QUERY, 2, k=50, temperature=t)
        assert torch.equal(clipped, all_three)
        assert clipped.tolist() == [_hand_vote(t)]
    one = knn_predict(torch.ones(1, 4), torch.tensor([2]), torch.randn(5, 4), 3, k=20)
    assert one.tolist() == [2] * 5


def test_output_dtype_shape_and_integer_label_dtypes():
    pred = knn_predict(HAND_TRAIN, HAND_LABELS.to(torch.int32), QUERY.repeat(3, 1), 2, k=3)
    assert pred.dtype == torch.int64 and pred.shape == (3,)
    double = knn_predict(HAND_TRAIN.double(), HAND_LABELS, QUERY.double(), 2, k=3)
    assert double.tolist() == [1]
    empty = knn_predict(HAND_TRAIN, HAND_LABELS, torch.empty(0, 2), 2)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_small_temperature_does_not_overflow():
    # exp(0.9 / 1e-3) overflows float32 and float64; the vote must still be decided.
    assert knn_predict(HAND_TRAIN, HAND_LABELS, QUERY, 2, k=3, temperature=1e-3).item() == 1


def _clusters(
    centres: torch.Tensor, n_per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C * n_per_class, D) unit-variance Gaussian samples around (C, D) centres."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(centres.shape[0] * n_per_class) % centres.shape[0]
    return centres[labels] + torch.randn(len(labels), centres.shape[1], generator=g), labels


def _centres(num_classes: int = 4, dim: int = 32, seed: int = 2) -> torch.Tensor:
    """Random directions of norm 10: clusters far apart in angle, noise std 1."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))
    return 10.0 * centres / centres.norm(dim=1, keepdim=True)


def test_well_separated_clusters_are_classified_almost_perfectly():
    centres = _centres()
    train, train_labels = _clusters(centres, n_per_class=100, seed=3)
    test, test_labels = _clusters(centres, n_per_class=50, seed=4)  # fresh samples
    accuracy = knn_accuracy(train, train_labels, test, test_labels, 4)
    assert accuracy >= 99.0


def test_random_labels_give_about_chance():
    g = torch.Generator().manual_seed(4)
    train, train_labels = (
        torch.randn(2000, 16, generator=g),
        torch.randint(0, 4, (2000,), generator=g),
    )
    test, test_labels = (
        torch.randn(1000, 16, generator=g),
        torch.randint(0, 4, (1000,), generator=g),
    )
    accuracy = knn_accuracy(train, train_labels, test, test_labels, 4)
    assert 18.0 < accuracy < 32.0  # chance is 25%, std of the estimate ~1.4%


def test_accuracy_is_the_percentage_of_correct_predictions():
    # With k = 1 each query takes the label of its most similar training feature:
    # (1, 0) -> the class-1 point at similarity 0.9; a copy of a class-0 point -> class 0.
    queries = torch.tensor([[1.0, 0.0], _unit(SIM_A)])
    assert knn_predict(HAND_TRAIN, HAND_LABELS, queries, 2, k=1).tolist() == [1, 0]
    assert knn_accuracy(HAND_TRAIN, HAND_LABELS, queries, torch.tensor([1, 0]), 2, k=1) == 100.0
    assert knn_accuracy(HAND_TRAIN, HAND_LABELS, queries, torch.tensor([1, 1]), 2, k=1) == 50.0
    assert knn_accuracy(HAND_TRAIN, HAND_LABELS, queries, torch.tensor([0, 1]), 2, k=1) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"k": -3}, "k must be"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 1}, r"\[0, num_classes\)"),
        ({"train_labels": torch.tensor([1, 0, 0])}, "train_labels must have shape"),
        ({"train_labels": torch.tensor([1.0, 0.0, 0.0, 1.0])}, "integer"),
        ({"train_labels": torch.tensor([1, 0, -1, 1])}, r"\[0, num_classes\)"),
        ({"train_features": HAND_TRAIN.flatten()}, "train_features must have shape"),
        ({"train_features": torch.empty(0, 2), "train_labels": torch.empty(0)}, "empty"),
        ({"test_features": torch.ones(1, 3)}, "dimensions differ"),
        ({"test_features": torch.ones(2)}, "test_features must have shape"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {
        "train_features": HAND_TRAIN,
        "train_labels": HAND_LABELS,
        "test_features": QUERY,
        "num_classes": 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn_predict(**args)
    test_labels = torch.zeros(args["test_features"].shape[0], dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        knn_accuracy(test_labels=test_labels, **args)


def test_accuracy_rejects_mismatched_or_empty_test_labels():
    with pytest.raises(ValueError, match="test_labels must have shape"):
        knn_accuracy(HAND_TRAIN, HAND_LABELS, QUERY, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(HAND_TRAIN, HAND_LABELS, torch.empty(0, 2), torch.empty(0), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_and_matches_cpu():
    train, labels = _clusters(_centres(), n_per_class=50, seed=5)
    test = torch.randn(77, 32, generator=torch.Generator().manual_seed(6))
    cpu = knn_predict(train, labels, test, 4, chunk_size=16)
    gpu = knn_predict(train.cuda(), labels.cuda(), test.cuda(), 4, chunk_size=16)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)


def test_knn_eval_takes_its_vote_and_pooling_from_the_config(digits_run, tmp_path):
    checkpoint = Checkpoint.read(shutil.copy(digits_run / "last.pt", tmp_path / "last.pt"))
    changes = {"monitor.knn_k": 5, "monitor.knn_temperature": 0.5, "probe.pool": "cls"}
    cfg = build_config(base=checkpoint.config, overrides=changes)
    result = knn_eval(checkpoint, cfg)
    assert (result.k, result.temperature, result.pool, result.num_test) == (5, 0.5, "cls", 449)
    saved = json.loads((tmp_path / "last.knn-cls.json").read_text())
    assert saved == result.to_dict() and saved["checkpoint"] == str(tmp_path / "last.pt")
    splits = labelled_splits(cfg.data, cfg.model, "a test")
    f = frozen_features(checkpoint.encoder(), splits, cfg, "cls", torch.device("cpu"))
    expected = knn_accuracy(
        f.train, f.train_labels, f.test, f.test_labels, 10, k=5, temperature=0.5
    )
    assert result.top1 == expected


def test_a_k_beyond_the_training_images_is_said_and_the_k_used_recorded(
    digits_run, tmp_path, caplog
):
    checkpoint = Checkpoint.read(shutil.copy(digits_run / "last.pt", tmp_path / "last.pt"))
    cfg = build_config(base=checkpoint.config, overrides={"monitor.knn_k": 5000})
    result = knn_eval(checkpoint, cfg)
    assert result.k == 1348 == result.num_train  # every training image votes
    assert "k=5000 exceeds the 1348 training images" in caplog.text
    assert json.loads((tmp_path / "last.knn.json").read_text())["k"] == 1348
    everyone = build_config(base=checkpoint.config, overrides={"monitor.knn_k": 1348})
    assert knn_eval(checkpoint, everyone).top1 == result.top1
