import torch

from dsmae.data.augment import (
    crop_boxes,
    crop_flip_resize,
    denormalize,
    normalize,
    random_flips,
    resize,
)


def test_full_box_is_identity_and_flip_mirrors():
    x = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = crop_flip_resize(x, full, torch.tensor([False, True]), 8)
    assert torch.allclose(out[0], x[0], atol=1e-6)
    assert torch.allclose(out[1], x[1].flip(-1), atol=1e-6)


def test_crop_of_a_quadrant_by_hand():
    x = torch.rand(1, 1, 8, 8)
    box = torch.tensor([[0.5, 0.0, 0.5, 0.5]])  # top-right quarter
    out = crop_flip_resize(x, box, torch.tensor([False]), 4)
    assert torch.allclose(out[0, 0], x[0, 0, :4, 4:], atol=1e-6)


def test_boxes_respect_scale_and_stay_inside():
    boxes = crop_boxes(5000, (0.2, 1.0), generator=torch.Generator().manual_seed(0))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all()
    assert (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.2 * 0.75 - 1e-6 and area.max() <= 1 + 1e-6  # clipping only shrinks
    assert 0.5 < area.mean() < 0.65


def _augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    boxes = crop_boxes(len(x), (0.2, 1.0), generator=rng)
    return crop_flip_resize(x, boxes, random_flips(len(x), generator=rng), 32)


def test_augmentation_is_seeded():
    x = torch.rand(4, 3, 32, 32)
    a, b, c = _augment(x, 1), _augment(x, 1), _augment(x, 2)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, 3, 32, 32)


def test_random_flips_by_hand():
    rng = torch.Generator().manual_seed(3)
    expected = torch.rand(1000, generator=torch.Generator().manual_seed(3)) < 0.5
    flips = random_flips(1000, generator=rng)
    assert torch.equal(flips, expected) and 400 < int(flips.sum()) < 600
    state = rng.get_state()
    off = random_flips(7, False, generator=rng)
    assert off.dtype == torch.bool and off.shape == (7,) and not off.any()
    assert torch.equal(rng.get_state(), state)  # nothing drawn when off


def test_normalize_round_trip_and_resize():
    x = torch.rand(2, 3, 4, 4)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    y = normalize(x, mean, std)
    assert torch.allclose(y[:, 1], (x[:, 1] - 0.2) / 0.25)
    assert torch.allclose(denormalize(y, mean, std), x, atol=1e-6)
    assert resize(x, 4) is x and resize(x, 8).shape == (2, 3, 8, 8)
