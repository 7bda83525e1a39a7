"""The closed sets of values, each listed once, and the table of what each method is."""

from dsmae.config import (
    DEFAULT_NOISE_RATIO,
    DSMAE_METHODS,
    METHOD_TRAITS,
    METHODS,
    METHODS_WITH_TEACHER,
    model_config,
)
from dsmae.models import DSMAE, MAE, build_model

SHAPE = {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}


def test_every_method_has_one_row_of_traits():
    assert tuple(METHOD_TRAITS) == METHODS == (*DSMAE_METHODS, "mae")
    assert METHODS_WITH_TEACHER == ("dsmae", "dsmae-lz")
    assert DEFAULT_NOISE_RATIO == {"dsmae": 0.9, "dsmae-ly": 0.9, "dsmae-lz": 0.9, "mae": 0.75}


def test_the_models_are_what_their_traits_say():
    for method, traits in METHOD_TRAITS.items():
        model = build_model(model_config(method, **SHAPE, decoder_depth=1, regressor_depth=1))
        assert isinstance(model, MAE if traits.drops_patches else DSMAE)
        assert (model.teacher is not None) == traits.teacher == (model.regressor is not None)
        assert (model.decoder is not None) == traits.pixel_decoder
        assert model.config.noise_ratio == traits.noise_ratio
