"""Every paper preset carries SPEC section 5 exactly, as --print-config shows it, in a few
lines of overrides of the defaults."""

import pytest
import yaml

from dsmae.cli import main
from dsmae.config import Config, available_presets, read_preset

# SPEC section 5 and 4: data set, backbone, image / patch, batch; (depth, width, heads)
PAPER = {
    "cifar10-vit-tiny": ("cifar10", "vit_tiny", 32, 2, 2048),
    "cifar10-vit-small": ("cifar10", "vit_small", 32, 2, 2048),
    "cifar100-vit-tiny": ("cifar100", "vit_tiny", 32, 2, 2048),
    "cifar100-vit-small": ("cifar100", "vit_small", 32, 2, 2048),
    "stl10-vit-small": ("stl10", "vit_small", 96, 6, 2048),
    "stl10-vit-base": ("stl10", "vit_base", 96, 6, 1024),
}
SIZES = {"vit_tiny": (12, 192, 3), "vit_small": (12, 384, 6), "vit_base": (12, 768, 12)}


def _printed(capsys, *args):
    assert main(["pretrain", *args, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_paper_configuration_has_a_preset():
    assert set(PAPER) | {"quickstart"} == set(available_presets())


@pytest.mark.parametrize("name", PAPER)
def test_preset_matches_spec_section_5(name, capsys):
    source, arch, img, patch, batch = PAPER[name]
    cfg = _printed(capsys, "--preset", name)
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    assert (m["method"], m["arch"], m["img_size"], m["patch_size"]) == ("dsmae", arch, img, patch)
    assert (m["depth"], m["embed_dim"], m["num_heads"], m["mlp_ratio"]) == (*SIZES[arch], 4.0)
    assert (img // patch) ** 2 == 256
    assert (m["noise_ratio"], m["noise_std"], m["lam"]) == (0.9, 1.0, 0.6)
    mae = _printed(capsys, "--preset", name, "--method", "mae")["model"]
    assert mae["noise_ratio"] == 0.75  # SPEC section 6: the preset's 0.9 is DSMAE's
    assert (m["decoder_depth"], m["regressor_depth"], m["decoder_dim"]) == (4, 2, SIZES[arch][1])
    assert d["source"] == source and d["crop_scale"] == [0.2, 1.0] and d["hflip"] is True
    assert (t["batch_size"], t["epochs"], t["warmup_epochs"]) == (batch, 500, 20)
    assert t["base_lr"] == 1.5e-4 and t["lr"] == pytest.approx(1.5e-4 * batch / 256)
    assert (t["betas"], t["weight_decay"]) == ([0.9, 0.95], 0.05)
    assert (t["momentum_start"], t["momentum_end"], t["ema_every"]) == (0.96, 0.99, "epoch")
    assert m["target_norm"] == "layernorm"  # SPEC section 3, as SdAE's code
    assert t["micro_batch"] == batch  # one process, no accumulation


def test_print_config_shows_the_per_device_micro_batch(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # as under torchrun
    cfg = _printed(capsys, "--preset", "cifar10-vit-small")
    assert cfg["train"]["micro_batch"] == 256 and cfg["train"]["batch_size"] == 2048
    cfg = _printed(capsys, "--preset", "cifar10-vit-small", "--micro-batch", "64")
    assert cfg["train"]["micro_batch"] == 64  # 4 accumulation steps on each of 8 devices
    assert main(["pretrain", "--preset", "stl10-vit-base", "--micro-batch", "48"]) == 2
    assert "train.micro_batch" in capsys.readouterr().err


def test_overrides_on_top_of_a_preset(capsys, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  warmup_epochs: 5\n")
    cfg = _printed(capsys, "--preset", "stl10-vit-base", "--config", str(mine),
                   "--set", "train.epochs=100", "--batch-size", "512")  # fmt: skip
    assert cfg["train"]["epochs"] == 100 and cfg["train"]["warmup_epochs"] == 5
    assert cfg["train"]["lr"] == pytest.approx(1.5e-4 * 512 / 256)


@pytest.mark.parametrize("name", sorted(set(PAPER) | {"quickstart"}))
def test_a_preset_states_only_what_differs_from_the_defaults(name):
    defaults = Config().to_dict()
    for section, values in read_preset(name).items():
        if not isinstance(values, dict):
            assert values != defaults[section], f"{name}: {section} restates the default"
            continue
        for key, value in values.items():
            assert value != defaults[section][key], f"{name}: {section}.{key} is the default"
