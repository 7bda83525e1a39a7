import torch

from dsmae.noise import add_patch_noise, pixel_mask, zero_patches


def _mask_2x2_grid() -> torch.Tensor:
    # 2 images, 2x2 grid of patches; image 0: patch 1 (top-right), image 1: patches 0 and 3
    return torch.tensor([[False, True, False, False], [True, False, False, True]])


def test_pixel_mask_by_hand():
    pm = pixel_mask(_mask_2x2_grid(), 2)
    assert pm.shape == (2, 1, 4, 4)
    expected0 = torch.zeros(4, 4, dtype=torch.bool)
    expected0[:2, 2:] = True
    assert torch.equal(pm[0, 0], expected0)


def test_only_chosen_patches_change_and_clean_ones_are_bit_identical():
    images = torch.randn(2, 3, 4, 4)
    mask = _mask_2x2_grid()
    noisy = add_patch_noise(images, mask, 2, std=1.0, generator=torch.Generator().manual_seed(0))
    pm = pixel_mask(mask, 2).expand_as(images)
    assert torch.equal(noisy[~pm], images[~pm])  # bit-identical
    assert (noisy[pm] != images[pm]).all()


def test_added_noise_is_sigma_times_standard_normal():
    images = torch.zeros(64, 1, 32, 32)
    mask = torch.ones(64, 256, dtype=torch.bool)
    noisy = add_patch_noise(images, mask, 2, std=0.5, generator=torch.Generator().manual_seed(0))
    assert abs(noisy.mean().item()) < 0.01
    assert abs(noisy.std().item() - 0.5) < 0.01
    # the same generator state gives the same noise, x + sigma * eps exactly
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, images + 0.5 * eps)


def test_replace_mode_ignores_the_clean_pixels():
    images = torch.full((1, 1, 4, 4), 100.0)
    mask = torch.tensor([[True, False, False, False]])
    out = add_patch_noise(
        images, mask, 2, std=1.0, mode="replace", generator=torch.Generator().manual_seed(0)
    )
    assert out[0, 0, :2, :2].abs().max() < 10  # pure noise, no 100 left
    assert torch.equal(out[0, 0, 2:], images[0, 0, 2:])


def test_zero_patches():
    images = torch.ones(2, 1, 4, 4)
    out = zero_patches(images, _mask_2x2_grid(), 2)
    assert out[0, 0, :2, 2:].abs().sum() == 0 and out[0, 0, 2:].sum() == 8
