"""DSMAE and its ablations (``dsmae.models.dsmae``): timm encoders, the EMA teacher, the two
losses on the noisy patches and the parts each variant drops."""

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import dsmae
from dsmae.models.vit import patch_tokens
from dsmae.patches import patchify


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _selected(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, D) rows where mask is True -> (B, K, D), in patch order."""
    return x[mask].reshape(x.shape[0], -1, x.shape[-1])


@pytest.mark.parametrize(
    "arch,img,p,chans", [("vit_tiny", 32, 2, 3), ("vit_small", 96, 6, 3), ("vit_tiny", 32, 2, 1)]
)
def test_paper_shapes(arch, img, p, chans):
    model = dsmae.build("dsmae", arch=arch, img_size=img, patch_size=p, in_chans=chans)
    assert model.num_patches == 256 and model.num_corrupted == 230
    images = torch.randn(2, chans, img, img)
    with torch.no_grad():
        out = model(images, generator=_gen())
    assert out.loss.shape == () and out.loss_y.shape == () and out.loss_z.shape == ()
    assert out.mask.shape == (2, 256) and out.mask.sum(1).tolist() == [230, 230]
    with torch.no_grad():
        shown = model.reconstruct(images, generator=_gen())
    assert shown.student_input.shape == images.shape
    assert shown.pred.shape == (2, 256, p * p * chans)
    assert torch.equal(shown.mask, out.mask)  # the same draws as the forward pass


def test_encoders_are_timm_vision_transformers(tiny):
    model = dsmae.build("dsmae", **tiny)
    assert isinstance(model.encoder, VisionTransformer)
    assert isinstance(model.teacher, VisionTransformer)
    assert model.encoder.num_classes == 0
    # the teacher starts as an exact copy of the student
    for t, s in zip(model.teacher.state_dict().values(), model.encoder.state_dict().values()):
        assert torch.equal(t, s)
    feats = model.encoder(torch.randn(2, 3, 16, 16))  # plain timm use: pooled [CLS] features
    assert feats.shape == (2, 32)


def test_teacher_gets_no_gradient_and_stays_in_eval(tiny):
    model = dsmae.build("dsmae", **tiny).train()
    assert not model.teacher.training
    out = model(torch.randn(2, 3, 16, 16), generator=_gen())
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.regressor.blocks[0].mlp.fc1.weight.grad is not None
    assert model.decoder.head.weight.grad is not None


def test_ema_update_is_exact(tiny):
    model = dsmae.build("dsmae", **tiny)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for t, t0, s in zip(model.teacher.parameters(), before, model.encoder.parameters()):
        expected = 0.9 * t0.double() + 0.1 * s.double()
        assert torch.allclose(t.double(), expected, rtol=0, atol=1e-6)
    snapshot = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(1.0)  # m = 1: unchanged, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), snapshot))
    model.update_teacher(0.0)  # m = 0: a copy of the student, bit for bit
    assert all(
        torch.equal(a, b) for a, b in zip(model.teacher.parameters(), model.encoder.parameters())
    )


@pytest.mark.parametrize("norm_pix", [True, False])
def test_pixel_loss_uses_only_the_noisy_patches(norm_pix, tiny):
    model = dsmae.build("dsmae-ly", norm_pix_loss=norm_pix, **tiny)
    images = torch.randn(3, 3, 16, 16)
    out = model(images, generator=_gen())
    shown = model.reconstruct(images, generator=_gen())
    pred, target = _selected(shown.pred, out.mask), _selected(patchify(images, 4), out.mask)
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)  # unbiased
        target = (target - mean) / torch.sqrt(var + 1e-6)
    assert torch.allclose(out.loss_y, ((pred - target) ** 2).mean(), rtol=1e-5)


def test_feature_loss_is_cosine_on_noisy_tokens_against_the_clean_teacher(tiny):
    model = dsmae.build("dsmae", target_norm="none", **tiny)
    with torch.no_grad():  # make teacher and student differ
        for p in model.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    images = torch.randn(2, 3, 16, 16)
    out = model(images, generator=_gen(3))
    noisy = model.reconstruct(images, generator=_gen(3)).student_input
    student = _selected(patch_tokens(model.encoder, noisy), out.mask)
    teacher = _selected(patch_tokens(model.teacher, images), out.mask)
    expected = (1 - F.cosine_similarity(model.regressor(student), teacher, dim=-1)).mean()
    assert torch.allclose(out.loss_z, expected, rtol=1e-5)
    assert torch.allclose(out.loss, 0.6 * out.loss_y + 0.4 * out.loss_z, rtol=1e-6)


def test_lambda_weights_the_two_terms(tiny):
    out = dsmae.build("dsmae", lam=0.25, **tiny)(torch.randn(2, 3, 16, 16), generator=_gen())
    assert torch.allclose(out.loss, 0.25 * out.loss_y + 0.75 * out.loss_z)


def test_variants_drop_exactly_their_parts(tiny):
    images = torch.randn(2, 3, 16, 16)
    ly = dsmae.build("dsmae-ly", **tiny)
    assert ly.teacher is None and ly.regressor is None and ly.decoder.mask_token is None
    out = ly(images, generator=_gen())
    assert out.loss_z is None and torch.equal(out.loss, out.loss_y)

    lz = dsmae.build("dsmae-lz", **tiny)
    assert lz.decoder is None and lz.teacher is not None and lz.regressor is not None
    out = lz(images, generator=_gen())
    assert out.loss_y is None and torch.equal(out.loss, out.loss_z)
    assert lz.reconstruct(images, generator=_gen()).pred is None
    before = [p.clone() for p in ly.parameters()]
    ly.update_teacher(0.5)  # no teacher: no-op
    assert all(torch.equal(a, b) for a, b in zip(before, ly.parameters()))


def test_dsmae_student_sees_every_patch(tiny, tokens_seen):
    images = torch.randn(2, 3, 32, 32)
    ds = dsmae.build("dsmae", **{**tiny, "img_size": 32, "patch_size": 2, "depth": 1})
    assert tokens_seen(ds, images) == 1 + 256  # DSMAE's student sees every patch


def test_dsmae_student_input_is_noisy_only_on_the_mask(tiny):
    images = torch.randn(2, 3, 16, 16)
    out = dsmae.build("dsmae", **tiny).reconstruct(images, generator=_gen())
    noisy, clean = patchify(out.student_input, 4), patchify(images, 4)
    assert torch.equal(_selected(noisy, ~out.mask), _selected(clean, ~out.mask))
    assert (_selected(noisy, out.mask) != _selected(clean, out.mask)).all()


def test_seeded_forward_is_deterministic(tiny):
    model = dsmae.build("dsmae", **tiny)
    images = torch.randn(2, 3, 16, 16)
    a, b = model(images, generator=_gen(7)), model(images, generator=_gen(7))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.mask, b.mask)


def test_custom_sizes_and_bf16_autocast():
    model = dsmae.build(
        "dsmae",
        img_size=24,
        patch_size=3,
        in_chans=1,
        depth=1,
        embed_dim=48,
        num_heads=4,
        decoder_dim=32,
        decoder_heads=2,
        decoder_depth=1,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 24, 24), generator=_gen())
        shown = model.reconstruct(torch.randn(2, 1, 24, 24), generator=_gen())
    assert shown.pred.shape == (2, 64, 9) and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "options,key",
    [
        (dict(img_size=32, patch_size=3), "model.patch_size"),
        (dict(noise_ratio=0.0), "model.noise_ratio"),
        (dict(noise_ratio=1.5), "model.noise_ratio"),
        (dict(lam=1.2), "model.lam"),
        (dict(arch="vit_huge"), "model.arch"),
        (dict(colour=True), "model.colour"),
    ],
)
def test_build_refuses_bad_options_naming_the_key(options, key):
    with pytest.raises(dsmae.ConfigError, match=key.replace(".", r"\.")):
        dsmae.build("dsmae", **options)


# ------------------------------------------------------------------ teacher-target options


def _by_hand(model, images, positions, keep_only: bool, layers: int) -> torch.Tensor:
    """The teacher's target computed step by step from its parts: patch embedding plus
    position rows, [CLS] first, only the noisy positions' patches where ``keep_only``;
    the blocks one by one; the final norm (one layer) or the mean of the last ``layers``
    block outputs, layer-normalised without affine (data2vec); the noisy positions kept."""
    t = model.teacher
    pos = t.pos_embed[0]  # (1 + N, D)
    patches = t.patch_embed(images) + pos[1:]  # (B, N, D)
    if keep_only:
        patches = torch.stack([patches[b, positions[b]] for b in range(len(images))])
    x = torch.cat([(t.cls_token[0] + pos[:1]).expand(len(images), 1, -1), patches], dim=1)
    outputs = []
    for block in t.blocks:
        x = block(x)
        outputs.append(x)
    if layers == 1:
        tokens = t.norm(x)[:, 1:]
    else:
        mean = sum(outputs[-layers:]) / layers
        tokens = F.layer_norm(mean, mean.shape[-1:])[:, 1:]
    if keep_only:
        return tokens
    return torch.stack([tokens[b, positions[b]] for b in range(len(images))])


@pytest.mark.parametrize("teacher_input", ["clean", "noisy"])
@pytest.mark.parametrize("layers", [1, 2])
def test_teacher_targets_equal_a_hand_computation(tiny, teacher_input, layers):
    model = dsmae.build("dsmae", **tiny, teacher_input=teacher_input, target_layers=layers)
    with torch.no_grad():  # a teacher that differs from the student, with a non-trivial norm
        for p in model.teacher.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(1)))
    images = torch.randn(2, 3, 16, 16, generator=_gen(2))
    mask, _ = model.sample_corruption(2, _gen(3))
    positions = model.student_positions(mask)
    got = model.encode_teacher(images, positions)
    with torch.no_grad():
        want = _by_hand(model, images, positions, teacher_input == "noisy", layers)
    assert got.shape == (2, positions.shape[1], 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_defaults_are_the_papers_target(tiny):
    """target_layers=1 and teacher_input="clean": the teacher's final tokens of the whole
    clean image at the noisy positions, bit for bit as before the options existed."""
    model = dsmae.build("dsmae", **tiny)
    assert (model.config.target_layers, model.config.teacher_input) == (1, "clean")
    images = torch.randn(2, 3, 16, 16, generator=_gen(2))
    mask, _ = model.sample_corruption(2, _gen(3))
    positions = model.student_positions(mask)
    with torch.no_grad():
        want = _selected(patch_tokens(model.teacher, images), mask)
    assert torch.equal(model.encode_teacher(images, positions), want)


def test_a_teacher_that_sees_only_the_noisy_positions_runs_fewer_tokens(tiny):
    model = dsmae.build("dsmae", **tiny, teacher_input="noisy", noise_ratio=0.5)
    seen = []
    model.teacher.blocks[0].register_forward_pre_hook(lambda _, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16), generator=_gen())
    assert seen == [1 + 8] and torch.isfinite(out.loss)  # [CLS] and the 8 noisy patches


def test_teacher_target_options_are_refused_where_they_cannot_apply(tiny):
    with pytest.raises(dsmae.ConfigError, match=r"model.target_layers: must be in \[1, "):
        dsmae.build("dsmae", **tiny, target_layers=3)  # the tiny ViT has 2 blocks
    for method in ("mae", "dsmae-ly"):
        with pytest.raises(dsmae.ConfigError, match=f"model.teacher_input: {method} has no"):
            dsmae.build(method, **tiny, teacher_input="noisy")
    with pytest.raises(dsmae.ConfigError, match=r"model\.teacher_input='all' is not one of"):
        dsmae.build("dsmae", **tiny, teacher_input="all")
    assert dsmae.build("dsmae-lz", **tiny, target_layers=2).config.target_layers == 2
