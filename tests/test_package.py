"""The dsmae package: its public names, each imported from its module on first use."""

import subprocess
import sys

import pytest

import dsmae
from dsmae.config import ARCHS, ConfigError
from dsmae.export import load_encoder
from dsmae.models import DSMAE, MAE


def test_every_public_name_is_there_and_listed():
    for name in dsmae.__all__:
        assert getattr(dsmae, name) is not None, name
    assert set(dsmae.__all__) <= set(dir(dsmae))
    assert dsmae.ARCHS is ARCHS and dsmae.ConfigError is ConfigError
    assert dsmae.DSMAE is DSMAE and dsmae.load_encoder is load_encoder
    assert isinstance(dsmae.build("mae", arch="vit_tiny", img_size=8, patch_size=4), MAE)
    assert isinstance(dsmae.build("dsmae-ly", arch="vit_tiny", img_size=8, patch_size=4), DSMAE)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        dsmae.nothing  # noqa: B018


def test_importing_the_package_waits_for_no_torch():
    code = (
        "import sys, dsmae; assert 'torch' not in sys.modules and 'timm' not in sys.modules; "
        "dsmae.momentum_at(1, 2); assert 'torch' not in sys.modules; "
        "dsmae.DSMAE; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
