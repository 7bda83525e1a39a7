"""``dsmae.flops``: FLOP counts of a training step and of each of its parts (the model's
stages run alone), against a hand count."""

import pytest
import torch

from dsmae.flops import PARTS, count_step_flops, counted_flops, part_steps, train_flops_per_image

# The counted model (the fixture counted_tiny): 8x8 one-channel images, patch 2 -> N = 16
# patch tokens (T = 17 with [CLS]); one block of width D = 32, 2 heads, MLP 4D; decoder
# (width 32) and regressor one block each; noise ratio 0.75 -> K = 12 corrupted tokens
# (mae: 12 masked, V = 4 visible). Its DSMAE total, counted_tiny.dsmae_flops, is the sum of
# HAND_DSMAE below.

# What FlopCounterMode counts (matmul-like ops only; norms, GELU, softmax, losses: 0):
# - a Linear d_in -> d_out on t tokens: 2 * t * d_in * d_out forward; its backward is 2x
#   that (grad input + grad weight) when the input needs a gradient, 1x when not.
# - the patch embedding (a conv = a Linear p*p*C -> D on N patches): its input is the
#   image, which needs no gradient, so its backward is the weight gradient only: 1x.
#   The first block's input comes from the patch embedding (which has weights), so it
#   does need a gradient: every block is 2x. The decoder's and regressor's inputs are
#   the student's tokens: 2x as well.
# - attention over t tokens (all heads together, heads * head_dim = D): QK^T and AV,
#   2 * t * t * D each, so 4 * t^2 * D forward; the fused kernels' backward is 5 such
#   batched matmuls (QK^T recomputed, then grad V, grad P, grad Q, grad K): 10 * t^2 * D.
# So a trained part costs 3x its forward linear FLOPs + 3.5x its forward attention FLOPs,
# the teacher 1x (forward only).
D, PPC, N, T, K = 32, 2 * 2 * 1, 16, 17, 12

PATCH_FWD = 2 * N * PPC * D  # 4_096
# one block on T tokens: qkv (D -> 3D), proj (D -> D), fc1 (D -> 4D), fc2 (4D -> D)
ENC_LINEAR_FWD = T * (2 * D * 3 * D + 2 * D * D + 2 * D * 4 * D + 2 * 4 * D * D)  # 417_792
ENC_ATTN_FWD = 2 * 2 * T * T * D  # 36_992
DEC_EMBED_FWD = 2 * K * D * D  # 24_576, Linear(D, D_dec) on the K corrupted tokens
HEAD_LINEAR_FWD = 24 * K * D * D  # 294_912, one block (as above) on K tokens
HEAD_ATTN_FWD = 2 * 2 * K * K * D  # 18_432
DEC_HEAD_FWD = 2 * K * D * PPC  # 3_072, Linear(D_dec, p*p*C)

HAND_DSMAE = {
    # forward + weight grad of the patch embedding, 3x the block's linears, 3.5x attention
    "student_fwd_bwd": 2 * PATCH_FWD + 3 * ENC_LINEAR_FWD + 3.5 * ENC_ATTN_FWD,  # 1_391_040
    "teacher_fwd": PATCH_FWD + ENC_LINEAR_FWD + ENC_ATTN_FWD,  # 458_880
    "decoder_fwd_bwd": 3 * (DEC_EMBED_FWD + HEAD_LINEAR_FWD + DEC_HEAD_FWD)
    + 3.5 * HEAD_ATTN_FWD,  # 1_032_192
    "regressor_fwd_bwd": 3 * HEAD_LINEAR_FWD + 3.5 * HEAD_ATTN_FWD,  # 949_248
}


def hand_count(method: str) -> dict[str, float]:
    """The same hand count for any method of the counted model (mae: the encoder sees
    [CLS] + V = 4 visible tokens; the decoder embeds those 5 and runs its block and head on
    1 + N = 17)."""
    if method == "mae":
        enc_t, dec_in, dec_t = 1 + (N - K), 1 + (N - K), 1 + N
    else:
        enc_t, dec_in, dec_t = T, K, K

    def linear(t, d=D):  # one block's linear layers on t tokens
        return 24 * t * d * d

    def attn(t, d=D):
        return 4 * t * t * d

    student = 2 * PATCH_FWD + 3 * linear(enc_t) + 3.5 * attn(enc_t)
    decoder = 3 * (2 * dec_in * D * D + linear(dec_t) + 2 * dec_t * D * PPC) + 3.5 * attn(dec_t)
    regressor = 3 * linear(K) + 3.5 * attn(K)
    teacher = PATCH_FWD + linear(T) + attn(T)
    return {
        "student_fwd_bwd": student,
        "teacher_fwd": teacher if method in ("dsmae", "dsmae-lz") else 0,
        "decoder_fwd_bwd": decoder if method != "dsmae-lz" else 0,
        "regressor_fwd_bwd": regressor if method in ("dsmae", "dsmae-lz") else 0,
    }


def test_hand_count_written_out(counted_tiny):
    assert hand_count("dsmae") == HAND_DSMAE
    assert sum(HAND_DSMAE.values()) == counted_tiny.dsmae_flops


def test_dsmae_flops_equal_the_hand_count(counted_tiny):
    model = counted_tiny.build("dsmae")
    flops = count_step_flops(model, torch.randn(2, 1, 8, 8))  # per image
    assert flops["total"] == counted_tiny.dsmae_flops
    assert {k: flops[k] for k in PARTS} == HAND_DSMAE
    assert all(p.grad is None for p in model.parameters())  # gradients cleared


@pytest.mark.parametrize("method", ["dsmae", "dsmae-ly", "dsmae-lz", "mae"])
def test_every_method_per_part(method, counted_tiny):
    flops = count_step_flops(counted_tiny.build(method), torch.randn(3, 1, 8, 8))
    expected = hand_count(method)
    assert {k: flops[k] for k in PARTS} == expected
    assert flops["total"] == sum(expected.values())
    if method in ("mae", "dsmae-ly"):
        assert flops["teacher_fwd"] == 0 and flops["regressor_fwd_bwd"] == 0
    if method == "dsmae-lz":
        assert flops["decoder_fwd_bwd"] == 0


def test_flops_per_image_do_not_depend_on_the_batch(counted_tiny):
    model = counted_tiny.build("dsmae")
    one = count_step_flops(model, torch.randn(1, 1, 8, 8))
    five = count_step_flops(model, torch.randn(5, 1, 8, 8))
    assert one == five


@pytest.mark.parametrize("method", ["dsmae", "dsmae-ly", "dsmae-lz", "mae"])
def test_train_flops_per_image_count_the_whole_step(method, counted_tiny):
    model = counted_tiny.build(method)
    assert train_flops_per_image(model, torch.randn(2, 1, 8, 8)) == sum(hand_count(method).values())
    assert all(p.grad is None for p in model.parameters())  # gradients cleared


@pytest.mark.parametrize("method", ["dsmae", "mae"])
def test_the_parts_are_the_models_stages(method, monkeypatch, counted_tiny):
    """Each part runs the model's own stage: a stage that does more shows in its part."""
    model = counted_tiny.build(method)
    images = torch.randn(2, 1, 8, 8)
    mask, _ = model.sample_corruption(2, torch.Generator().manual_seed(0))
    before = {name: counted_flops(run) for name, run in part_steps(model, images, mask).items()}
    decode = model.decode_pixels
    monkeypatch.setattr(
        model, "decode_pixels", lambda x, positions: decode(x, positions) + decode(x, positions)
    )
    after = {name: counted_flops(run) for name, run in part_steps(model, images, mask).items()}
    assert after["decoder_fwd_bwd"] == 2 * before["decoder_fwd_bwd"]
    assert after["student_fwd_bwd"] == before["student_fwd_bwd"]
    assert set(before) == {"student_fwd_bwd", "decoder_fwd_bwd"} | (
        {"teacher_fwd", "regressor_fwd_bwd"} if method == "dsmae" else set()
    )


def test_a_given_noise_changes_nothing_counted(counted_tiny):
    model = counted_tiny.build("dsmae")
    images = torch.randn(2, 1, 8, 8)
    mask, eps = model.sample_corruption(2, torch.Generator().manual_seed(3))
    given = count_step_flops(model, images, mask=mask, eps=eps)
    assert given == count_step_flops(model, images, mask=mask)  # noise drawn: seeded 0
    assert given == count_step_flops(model, images)
    assert set(given) == {"total", *PARTS}
