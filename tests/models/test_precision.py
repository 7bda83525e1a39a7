"""The precision switches: what runs in bf16 under autocast with each, and nothing else
changed (the training runs with them: ``test_gpu_paths.py``)."""

import pytest
import torch
from timm.layers import is_fast_norm
from timm.models.vision_transformer import Block

from dsmae.config import model_config
from dsmae.models import build_model
from dsmae.models.precision import fast_norms, keep_residual_in_autocast_dtype

CPU_BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def _model(tiny, method: str = "dsmae", fast: bool = False):
    torch.manual_seed(0)
    with fast_norms(fast):
        return build_model(model_config(method, **tiny)).train()


def _dtypes_into(modules, kind) -> list[torch.dtype]:
    """A hook on every ``kind`` module of ``modules``: the dtypes they are called with."""
    seen = []
    for module in modules:
        if isinstance(module, kind):
            module.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    return seen


def _forward(model, images, amp: bool):
    with torch.autocast(enabled=amp, **CPU_BF16):
        return model(images, generator=torch.Generator().manual_seed(1))


def test_fast_norms_apply_to_the_model_built_inside_and_restore_timm_default(tiny):
    before = is_fast_norm()
    plain, fast = _model(tiny), _model(tiny, fast=True)
    assert is_fast_norm() == before
    assert plain.state_dict().keys() == fast.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 fast.state_dict().values()))  # fmt: skip
    norm = fast.encoder.blocks[0].norm1
    x = torch.randn(2, 5, tiny["embed_dim"])
    with torch.autocast(**CPU_BF16):
        assert norm(x).dtype == torch.bfloat16  # fast: in the autocast dtype
        assert plain.encoder.blocks[0].norm1(x).dtype == torch.float32  # autocast's fp32 list
    assert torch.equal(norm(x), plain.encoder.blocks[0].norm1(x))  # no autocast: the same


def test_fast_norms_restore_the_default_after_an_error():
    before = is_fast_norm()
    with pytest.raises(RuntimeError), fast_norms(not before):
        raise RuntimeError
    assert is_fast_norm() == before


@pytest.mark.parametrize("method", ["dsmae", "mae"])
def test_the_residual_stream_stays_bf16_under_autocast_only(tiny, method):
    images = torch.randn(2, 3, 16, 16)
    plain, hooked = _model(tiny, method), _model(tiny, method)
    count = keep_residual_in_autocast_dtype(hooked)
    # every transformer block: the student's, the teacher's, the decoder's, the regressor's
    expected = 2 * tiny["depth"] + 2 if method == "dsmae" else tiny["depth"] + 1
    assert count == expected
    hooked_blocks = _dtypes_into(hooked.modules(), Block)  # after the cast
    plain_blocks = _dtypes_into(plain.modules(), Block)
    out = _forward(hooked, images, amp=True)
    reference = _forward(plain, images, amp=True)
    assert len(hooked_blocks) == len(plain_blocks) > 0
    assert set(hooked_blocks) == {torch.bfloat16}
    assert torch.float32 in plain_blocks  # the position embedding's add: fp32 tokens
    assert out.loss.dtype == torch.float32  # the losses stay fp32
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=0.03)
    # without autocast the hook does nothing: bit-identical to the model without it
    assert torch.equal(_forward(hooked, images, False).loss, _forward(plain, images, False).loss)
