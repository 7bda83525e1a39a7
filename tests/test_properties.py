"""Properties that must hold for every input (hypothesis), not only for the examples of the
unit tests: patchify round trips, the noise mask, the patch noise and config parsing."""

import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsmae.config import METHODS, ConfigError, build_config, config_from_dict
from dsmae.masking import num_selected, random_patch_mask, split_indices
from dsmae.noise import add_patch_noise, pixel_mask
from dsmae.patches import gather_tokens, patchify, scatter_tokens, unpatchify

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def image_batches(draw) -> tuple[torch.Tensor, int]:
    """(B, C, H, W) float images with H = W = g * p, and p."""
    b = draw(st.integers(1, 3))
    c = draw(st.sampled_from([1, 3]))
    p = draw(st.integers(1, 5))
    g = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    images = torch.randn(b, c, g * p, g * p, generator=torch.Generator().manual_seed(seed))
    return images, p


# ---------------------------------------------------------------------------- patches


@SETTINGS
@given(image_batches())
def test_unpatchify_inverts_patchify(batch):
    images, p = batch
    b, c, h, _ = images.shape
    patches = patchify(images, p)
    assert patches.shape == (b, (h // p) ** 2, p * p * c)
    assert torch.equal(unpatchify(patches, p, c), images)


@SETTINGS
@given(image_batches())
def test_a_patch_is_the_pixels_of_its_square(batch):
    images, p = batch
    g = images.shape[-1] // p
    patches = patchify(images, p)
    for index in range(g * g):
        row, col = divmod(index, g)
        square = images[:, :, row * p : (row + 1) * p, col * p : (col + 1) * p]
        assert torch.equal(patches[:, index], square.permute(0, 2, 3, 1).reshape(len(images), -1))


# ---------------------------------------------------------------------------- the noise mask


masks = st.tuples(
    st.integers(1, 6),  # B
    st.integers(1, 64),  # N
    st.floats(0.01, 1.0),  # ratio
    st.integers(0, 2**31 - 1),  # seed
)


@SETTINGS
@given(masks)
def test_mask_selects_exactly_round_r_n_per_image(spec):
    b, n, ratio, seed = spec
    mask = random_patch_mask(b, n, ratio, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == (b, n) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [num_selected(n, ratio)] * b
    assert num_selected(n, ratio) == round(ratio * n)


@SETTINGS
@given(masks)
def test_mask_is_a_function_of_the_seed_alone(spec):
    b, n, ratio, seed = spec
    torch.manual_seed(seed + 1)  # the global RNG must not matter
    a = random_patch_mask(b, n, ratio, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed + 2)
    again = random_patch_mask(b, n, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, again)


@SETTINGS
@given(masks, st.integers(1, 4))
def test_an_images_mask_does_not_depend_on_the_images_after_it(spec, extra):
    """Each image has its own draw: a longer batch from the same seed starts the same."""
    b, n, ratio, seed = spec
    short = random_patch_mask(b, n, ratio, generator=torch.Generator().manual_seed(seed))
    long = random_patch_mask(b + extra, n, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(long[:b], short)


@SETTINGS
@given(masks)
def test_split_indices_partition_the_patches_in_order(spec):
    b, n, ratio, seed = spec
    k = num_selected(n, ratio)
    mask = random_patch_mask(b, n, ratio, generator=torch.Generator().manual_seed(seed))
    chosen, rest = split_indices(mask, k)
    assert chosen.shape == (b, k) and rest.shape == (b, n - k)
    for row in range(b):
        assert chosen[row].tolist() == mask[row].nonzero().flatten().tolist()
        assert sorted(chosen[row].tolist() + rest[row].tolist()) == list(range(n))
    tokens = torch.randn(b, n, 3)
    back = scatter_tokens(gather_tokens(tokens, chosen), chosen, n)
    assert torch.equal(back[mask], tokens[mask]) and not back[~mask].any()


@SETTINGS
@given(image_batches(), st.floats(0.05, 1.0), st.floats(0.1, 3.0), st.integers(0, 2**31 - 1))
def test_noise_touches_exactly_the_masked_patches_of_each_image(batch, ratio, std, seed):
    images, p = batch
    b, _, h, _ = images.shape
    n = (h // p) ** 2
    rng = torch.Generator().manual_seed(seed)
    mask = random_patch_mask(b, n, ratio, generator=rng)
    noisy = add_patch_noise(images, mask, p, std=std, generator=rng)
    changed = (noisy != images).any(dim=1)  # (B, H, W)
    where = pixel_mask(mask, p)[:, 0]
    assert not changed[~where].any()  # clean patches are bit-identical
    per_patch = patchify(changed[:, None].float(), p).amax(dim=-1).bool()
    assert torch.equal(per_patch, mask)  # every noisy patch did change (std > 0)


# ---------------------------------------------------------------------------- config parsing


valid_overrides = st.fixed_dictionaries(
    {},
    optional={
        "model.method": st.sampled_from(["dsmae", "dsmae-ly", "dsmae-lz", "mae"]),
        "model.arch": st.sampled_from(["vit_tiny", "vit_small", "vit_base"]),
        "model.noise_ratio": st.floats(0.1, 0.95),
        "model.lam": st.floats(0.0, 1.0),
        "model.noise_std": st.floats(0.0, 4.0),
        "train.epochs": st.integers(1, 1000),
        "train.batch_size": st.sampled_from([8, 64, 256, 2048]),
        "train.momentum_start": st.floats(0.0, 0.999),
        "train.grad_clip": st.floats(0.0, 10.0),
        "data.crop_scale": st.tuples(st.floats(0.05, 0.5), st.floats(0.5, 1.0)).map(list),
        "probe.pool": st.sampled_from(["token", "avg"]),
    },
)


@SETTINGS
@given(valid_overrides)
def test_any_accepted_config_round_trips_through_yaml(overrides):
    cfg = build_config(overrides=overrides)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert build_config(overrides=overrides) == cfg  # deterministic


bad_values = st.one_of(
    st.tuples(st.just("model.noise_ratio"), st.floats(1.0001, 10.0) | st.floats(-10.0, 0.0)),
    st.tuples(st.just("model.lam"), st.floats(1.0001, 10.0) | st.floats(-10.0, -0.0001)),
    st.tuples(st.just("train.momentum_end"), st.floats(1.0, 10.0) | st.floats(-10, -0.0001)),
    st.tuples(st.just("model.method"), st.text(min_size=1).filter(lambda s: s not in METHODS)),
    st.tuples(st.just("train.epochs"), st.integers(-100, 0)),
    st.tuples(st.just("model.patch_size"), st.sampled_from([3, 5, 6, 7, 9, 10])),
)
unknown_keys = st.tuples(
    st.sampled_from(["model", "data", "train", "monitor", "probe"]),
    st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True),
)


@SETTINGS
@given(bad_values)
def test_any_rejected_value_names_its_key(pair):
    key, value = pair
    if isinstance(value, float) and not math.isfinite(value):
        return
    with pytest.raises(ConfigError) as err:
        build_config(overrides={key: value})
    assert key in str(err.value)


@SETTINGS
@given(unknown_keys)
def test_any_unknown_key_is_named(pair):
    section, name = pair
    known = set(build_config().to_dict()[section])
    if name in known:
        return
    with pytest.raises(ConfigError) as err:
        build_config(overrides={f"{section}.{name}": 1})
    assert f"{section}.{name}" in str(err.value)
