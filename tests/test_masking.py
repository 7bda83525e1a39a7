import pytest
import torch

from dsmae.masking import num_selected, random_patch_mask, split_indices


@pytest.mark.parametrize("n,r,k", [(256, 0.9, 230), (256, 0.75, 192), (64, 0.9, 58), (16, 1.0, 16)])
def test_exactly_round_r_n_per_image(n, r, k):
    assert num_selected(n, r) == k
    mask = random_patch_mask(8, n, r, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (8, n) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [k] * 8


def test_seeded_and_independent_per_image():
    a = random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(1))
    b = random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(1))
    c = random_patch_mask(4, 64, 0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 4  # images differ


def test_uniform_over_patches():
    mask = random_patch_mask(4000, 16, 0.25, generator=torch.Generator().manual_seed(0))
    freq = mask.float().mean(dim=0)  # each patch chosen with probability 1/4
    assert torch.allclose(freq, torch.full((16,), 0.25), atol=0.03)


def test_no_global_rng_used_with_a_generator():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    random_patch_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.get_rng_state())


def test_split_indices_sorted_and_complementary():
    mask = torch.tensor([[True, False, True, False, False], [False, False, True, True, True]])
    sel, rest = split_indices(mask[:1], 2)
    assert sel.tolist() == [[0, 2]] and rest.tolist() == [[1, 3, 4]]
    sel, rest = split_indices(mask[1:], 3)
    assert sel.tolist() == [[2, 3, 4]] and rest.tolist() == [[0, 1]]
