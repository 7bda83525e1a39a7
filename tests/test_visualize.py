import numpy as np
import pytest
import torch
from PIL import Image

import dsmae
from dsmae.patches import patchify
from dsmae.visualize import denoise, estimate_patch_stats, save_denoise_figure, triplet_grid


def test_patch_stats_from_noisy_patches_subtract_the_noise_variance():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 1, 10_000, generator=g) * 2 + 3  # one huge patch: mean 3, std 2
    noisy = clean + torch.randn(clean.shape, generator=g) * 1.5
    mean, std = estimate_patch_stats(noisy, torch.ones(1, 1, dtype=torch.bool), 1.5, True)
    assert abs(mean.item() - 3) < 0.1 and abs(std.item() - 2) < 0.1


def test_patch_stats_of_blank_patches_come_from_the_clean_ones():
    patches = torch.tensor([[[0.0, 0.0], [1.0, 3.0], [3.0, 5.0]]])  # patch 0 masked
    mask = torch.tensor([[True, False, False]])
    mean, std = estimate_patch_stats(patches, mask, 1.0, False)
    assert mean[0, 0, 0].item() == 3.0  # (2 + 4) / 2
    assert abs(std[0, 0, 0].item() - 1.0) < 1e-3


def test_grid_layout():
    cols = [np.full((3, 4, 4, 1), v, dtype=np.uint8) for v in (0, 100, 200)]
    img = triplet_grid(cols, per_row=2, scale=2, gap=1)
    # 2 rows of 8 px + 3 gaps of 2; 2 groups of (3 * 8 + 2) + 3 gaps of 2
    assert img.size == (2 * 26 + 6, 2 * 8 + 6)


def test_denoise_figure_shows_noisy_denoised_original(tmp_path, tiny):
    model = dsmae.build("dsmae", **tiny)
    images = torch.randn(4, 3, 16, 16)
    path = save_denoise_figure(
        model, images, tmp_path / "fig.png", [0.5] * 3, [0.25] * 3, torch.Generator().manual_seed(0)
    )
    assert Image.open(path).size[0] > Image.open(path).size[1]
    assert (
        save_denoise_figure(
            dsmae.build("dsmae-lz", **tiny), images, tmp_path / "x.png", [0.5] * 3, [0.25] * 3
        )
        is None
    )


def test_denoised_keeps_clean_patches_and_predicts_the_others(tiny):
    model = dsmae.build("dsmae", norm_pix_loss=False, **tiny)
    images = torch.randn(2, 3, 16, 16)
    noisy, restored, mask = denoise(model, images, torch.Generator().manual_seed(0))
    out = model.eval().reconstruct(images, generator=torch.Generator().manual_seed(0))
    keep = ~out.mask
    assert torch.equal(patchify(restored, 4)[keep], patchify(images, 4)[keep])
    assert torch.allclose(patchify(restored, 4)[out.mask], out.pred[out.mask], atol=1e-6)
    assert torch.equal(noisy, out.student_input) and torch.equal(mask, out.mask)


def test_psnr_against_a_hand_computation():
    from dsmae.visualize import psnr

    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[0.1, 0.1], [0.5, 0.0]]]])
    where = torch.tensor([[[[True, True], [False, False]]]])
    assert psnr(a, b, where) == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(100)
    assert psnr(a, a, where) == float("inf")
