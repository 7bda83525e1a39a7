"""An export is a Hugging Face transformers model too (its ``TimmWrapper`` classes): the
same features as timm's, a classifier fine-tuned with ``Trainer``, and an image processor
with the export's normalisation and size. Needs the ``hf`` extra."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dsmae.checkpoint import Checkpoint
from dsmae.data.sources import open_source
from dsmae.export import export_encoder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory):
    """The tiny digits run's encoder, exported."""
    return export_encoder(digits_run / "last.pt", tmp_path_factory.mktemp("hf") / "export")


def _digits(n: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` real digits of ``split``: (n, 1, 8, 8) uint8 and (n,) labels (the
    source gives them as RGB of three equal channels; the quickstart reads one)."""
    digits = open_source("digits", split, root=".")
    images = digits.images[:n]
    assert torch.equal(images[:, :1].expand_as(images), images)
    return images[:, :1], digits.labels[:n]


def _normalised(images: torch.Tensor, digits_run) -> torch.Tensor:
    """(B, 1, 8, 8) uint8 -> float, normalised as the run's encoder saw its images."""
    data = Checkpoint.read(digits_run / "last.pt").config.data
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def test_auto_model_gives_timms_features(exported, digits_run):
    model = transformers.AutoModel.from_pretrained(exported).eval()
    assert type(model).__name__ == "TimmWrapperModel"
    reference = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    x = _normalised(_digits(16)[0], digits_run)
    with torch.no_grad():
        features = model(pixel_values=x).pooler_output
        expected = reference(x)
    assert features.shape == (16, 32)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_the_image_processor_has_the_exports_normalisation_and_size(exported, digits_run):
    processor = transformers.AutoImageProcessor.from_pretrained(exported)
    data = Checkpoint.read(digits_run / "last.pt").config.data
    assert tuple(processor.data_config["input_size"]) == (1, 8, 8)
    assert processor.data_config["mean"] == pytest.approx(tuple(data.mean))
    assert processor.data_config["std"] == pytest.approx(tuple(data.std))
    images, _ = _digits(4)
    pil = [Image.fromarray(image[0].numpy(), mode="L") for image in images]
    pixels = processor(pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, _normalised(images, digits_run), rtol=0, atol=1e-6)


class _Digits(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def test_a_classifier_from_the_export_fine_tunes_with_trainer(exported, digits_run, tmp_path):
    model = transformers.AutoModelForImageClassification.from_pretrained(exported, num_labels=10)
    reference = timm.create_model(f"local-dir:{exported}", pretrained=True)
    block = "blocks.0.attn.qkv.weight"  # the encoder's weights come from the export
    assert torch.equal(model.timm_model.state_dict()[block], reference.state_dict()[block])
    images, labels = _digits(64)
    data = _Digits(_normalised(images, digits_run), labels)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=16,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
    )  # fmt: skip
    before = model.timm_model.head.weight.detach().clone()
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 4 and np.isfinite(result.training_loss)
    assert not torch.equal(model.timm_model.head.weight, before)  # the head trained
    with torch.no_grad():
        logits = model(pixel_values=data.pixels[:8]).logits
    assert logits.shape == (8, 10)
