"""``dsmae export`` and ``dsmae.load_encoder``: an export is laid out as timm lays out its
Hub models, loads with timm alone (``local-dir:``, ``hf-hub:``) and gives the same
features; it holds tensors and JSON only; ``--onnx`` gives them in onnxruntime;
``--push-to-hub`` uploads a folder that timm loads. The docs' "Use the encoder
elsewhere" snippets run here as written."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import dsmae
from dsmae.checkpoint import Checkpoint, CheckpointError
from dsmae.config import ConfigError, build_config
from dsmae.evaluation.frozen import pooled_features
from dsmae.export import (
    ONNX_OPSET,
    HubError,
    encoder_from_checkpoint,
    export_encoder,
    push_to_hub,
)
from dsmae.features import Preprocessing, image_tensor

EXPORT_PAGE = Path(__file__).resolve().parents[1] / "docs" / "export.md"


@pytest.fixture(scope="module")
def cifar_run(cifar_folder, tmp_path_factory) -> Path:
    """A tiny DSMAE run on real CIFAR-10 photos (RGB, 16x16, patch 4); its checkpoint."""
    from dsmae.pretrain import pretrain

    overrides = {
        "data.source": str(cifar_folder), "data.subset": 128, "data.hflip": True,
        "model.in_chans": 3, "model.img_size": 16, "model.patch_size": 4, "model.depth": 1,
        "model.embed_dim": 32, "model.num_heads": 2, "model.decoder_depth": 1,
        "model.regressor_depth": 1, "train.batch_size": 32, "train.epochs": 2,
        "train.warmup_epochs": 1, "train.device": "cpu", "probe.after_pretrain": False,
        "out": str(tmp_path_factory.mktemp("cifar") / "run"),
    }  # fmt: skip
    return pretrain(build_config("quickstart", overrides=overrides)).out / "last.pt"


@pytest.fixture(scope="module")
def photos(cifar_folder) -> list[Path]:
    """A dozen real CIFAR-10 test photos (32x32 JPEGs), of several classes."""
    return sorted((cifar_folder / "test").rglob("*.jpg"))[::8][:12]


def test_an_export_loads_with_timm_alone_and_gives_the_same_features(digits_run, tmp_path):
    out = export_encoder(digits_run / "last.pt", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["img_size"] == 8 and config["model_args"]["patch_size"] == 4
    assert all(isinstance(t, torch.Tensor) for t in load_file(out / "model.safetensors").values())

    # exactly what a user writes, with timm and nothing of dsmae: the short way and the long
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    long_way = timm.create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
        num_classes=10,
        **config["model_args"],
    ).eval()
    assert long_way.head.out_features == 10 and model.num_classes == 0
    ours, _ = encoder_from_checkpoint(digits_run / "last.pt")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = ours.eval().forward_features(x)
        assert torch.allclose(model.forward_features(x), expected, atol=1e-6)
        assert torch.allclose(long_way.forward_features(x), expected, atol=1e-6)
        assert torch.allclose(dsmae.load_encoder(out).eval().forward_features(x), expected)
        from_checkpoint = dsmae.load_encoder(digits_run / "last.pt").eval()
        assert torch.equal(from_checkpoint.forward_features(x), expected)
        # the model's own output: the features DSMAE trains, the mean of the patch tokens
        assert torch.equal(model(x), pooled_features(model, x, "avg"))
        assert torch.allclose(model(x), pooled_features(ours, x, "avg"), atol=1e-6)


def test_the_config_is_timms_with_our_input_and_provenance(digits_run, tmp_path):
    checkpoint = Checkpoint.read(digits_run / "last.pt")
    cfg = checkpoint.config
    config = json.loads((export_encoder(checkpoint, tmp_path / "e") / "config.json").read_text())
    assert (config["num_classes"], config["num_features"]) == (0, 32)
    assert config["global_pool"] == config["model_args"]["global_pool"] == "avg"
    assert config["model_args"]["fc_norm"] is False  # the final norm is the trained one
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [1, 8, 8]
    assert pretrained["mean"] == cfg.data.mean and pretrained["std"] == cfg.data.std
    assert (pretrained["interpolation"], pretrained["crop_pct"]) == ("bilinear", 1.0)
    assert (pretrained["first_conv"], pretrained["classifier"]) == ("patch_embed.proj", "head")
    assert config["dsmae"] == {
        "method": "dsmae", "weights": "student", "step": checkpoint.state["step"],
        "checkpoint": "last.pt", "version": dsmae.__version__,
    }  # fmt: skip

    cls = json.loads((export_encoder(checkpoint, tmp_path / "c", pool="cls") / "config.json")
                     .read_text())  # fmt: skip
    assert cls["global_pool"] == cls["model_args"]["global_pool"] == "token"
    model = timm.create_model(f"local-dir:{tmp_path / 'c'}", pretrained=True).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), pooled_features(model, x, "cls"))
    with pytest.raises(ConfigError, match="pool must be one of avg, cls"):
        export_encoder(checkpoint, tmp_path / "p", pool="max")


def test_the_export_is_laid_out_as_timm_save_for_hf_lays_it_out(digits_run, tmp_path):
    ours = export_encoder(digits_run / "last.pt", tmp_path / "ours")
    config = json.loads((ours / "config.json").read_text())
    model = timm.create_model(
        config["architecture"], num_classes=config["num_classes"], **config["model_args"]
    )
    model.load_state_dict(load_file(ours / "model.safetensors"))
    data = {k: config["pretrained_cfg"][k] for k in ("mean", "std", "interpolation", "crop_pct")}
    timm.models.save_for_hf(model, tmp_path / "timm", safe_serialization=True, data_config=data)
    theirs = json.loads((tmp_path / "timm" / "config.json").read_text())

    assert sorted(p.name for p in (tmp_path / "timm").iterdir()) == sorted(
        p.name for p in ours.iterdir()
    )
    assert set(theirs) == set(config) - {"dsmae"}
    for key in ("architecture", "num_classes", "num_features", "global_pool"):
        assert config[key] == theirs[key], key
    for key, value in config["model_args"].items():  # timm writes img_size as [H, W]
        assert theirs["model_args"][key] in (value, [value, value]), key
    assert config["pretrained_cfg"].items() <= theirs["pretrained_cfg"].items()
    weights = load_file(ours / "model.safetensors")
    timm_weights = load_file(tmp_path / "timm" / "model.safetensors")
    assert weights.keys() == timm_weights.keys()
    assert all(torch.equal(weights[k], timm_weights[k]) for k in weights)


def test_timm_alone_loads_the_export_and_its_input_pipeline(cifar_run, photos, tmp_path):
    """In a process without dsmae: ``local-dir:``, ``resolve_data_config`` (our size, mean
    and std) and ``create_transform`` on real photos give dsmae's own features."""
    out = export_encoder(cifar_run, tmp_path / "export")
    timm_only = f"""
import sys, numpy, timm, torch
from PIL import Image
model = timm.create_model("local-dir:{out}", pretrained=True).eval()
config = timm.data.resolve_data_config(model=model)
print(config["input_size"], config["mean"], config["std"], sep=";")
transform = timm.data.create_transform(**config)
images = torch.stack([transform(Image.open(f)) for f in {[str(p) for p in photos]}])
with torch.no_grad():
    numpy.save("{tmp_path / "timm.npy"}", model(images).numpy())
assert "dsmae" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", timm_only], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cfg = Checkpoint.read(cifar_run).config
    size, mean, std = done.stdout.strip().splitlines()[-1].split(";")
    assert size == "(3, 16, 16)"
    assert json.loads(mean) == cfg.data.mean and json.loads(std) == cfg.data.std
    timm_features = torch.from_numpy(np.load(tmp_path / "timm.npy"))
    ours = dsmae.extract_features(cifar_run, photos, device="cpu")
    assert timm_features.shape == (12, 32)
    torch.testing.assert_close(timm_features, ours, atol=1e-5, rtol=0)


def test_the_teacher_can_be_exported_and_mae_has_none(digits_run, digits_mae_run, tmp_path):
    student, _ = encoder_from_checkpoint(digits_run / "last.pt")
    teacher, _ = encoder_from_checkpoint(digits_run / "last.pt", teacher=True)
    assert not torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    out = export_encoder(digits_run / "last.pt", tmp_path / "t", teacher=True)
    assert json.loads((out / "config.json").read_text())["dsmae"]["weights"] == "teacher"
    with pytest.raises(CheckpointError, match="has no teacher"):
        export_encoder(digits_mae_run / "last.pt", tmp_path / "m", teacher=True)


def test_load_encoder_refuses_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dsmae export"):
        dsmae.load_encoder(tmp_path)


def test_load_encoder_reads_the_first_export_layout(digits_run, tmp_path):
    """dsmae 0.1 wrote mean/std at the top of config.json and no pretrained_cfg."""
    encoder, cfg = encoder_from_checkpoint(digits_run / "last.pt")
    m = cfg.model
    first = {
        "architecture": "vit_tiny_patch16_224",
        "model_args": {"img_size": m.img_size, "patch_size": m.patch_size, "in_chans": 1,
                       "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads,
                       "mlp_ratio": m.mlp_ratio, "qkv_bias": True, "global_pool": "token"},
        "mean": cfg.data.mean, "std": cfg.data.std, "method": "dsmae", "weights": "student",
        "step": 8, "checkpoint": "last.pt", "dsmae_version": "0.1.0",
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(first))
    save_file(encoder.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"export of dsmae 0\.1, which timm cannot load"):
        push_to_hub(tmp_path, "someone/digits")  # refused before anything is sent
    loaded = dsmae.load_encoder(tmp_path).eval()
    assert loaded.global_pool == "token"  # as it was exported
    assert loaded.pretrained_cfg["mean"] == cfg.data.mean
    assert tuple(loaded.pretrained_cfg["input_size"]) == (1, 8, 8)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), encoder.eval().forward_features(x))
    assert dsmae.load_encoder(tmp_path, num_classes=3).head.out_features == 3


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_args": {"embed_dim": 65536, "depth": 64}}, "describes an encoder of about"),
        ({"architecture": "resnet50"}, "architecture 'resnet50' is not a ViT that dsmae"),
        ({"model_args": {"depth": "12"}}, "model_args.depth must be a positive number"),
        ({"model_args": None}, "no model_args mapping"),
        (
            {"model_args": {"img_size": 65536, "patch_size": 1}},
            "model_args.img_size / patch_size describe pos_embed [1, 4294967297, 32]",
        ),
        ({"model_args": {"num_heads": 5}}, "model_args.num_heads 5 does not divide embed_dim 32"),
        ({"model_args": {"patch_size": 3}}, "model_args.patch_size 3 does not divide img_size 8"),
        ({"model_args": {"mlp_ratio": float("inf")}}, "model_args.mlp_ratio must be a positiv"),
        ({"pretrained_cfg": {"mean": [float("nan")], "std": [0.3]}}, "mean must be 1 finite"),
        ({"pretrained_cfg": {"mean": [0.5], "std": [0.0]}}, "std must be 1 finite number(s)"),
    ],
    ids=[
        "huge",
        "not-a-vit",
        "a-string",
        "no-args",
        "terabytes",
        "heads",
        "patch",
        "mlp-inf",
        "nan-mean",
        "zero-std",
    ],
)
def test_load_encoder_refuses_an_export_it_cannot_build_before_building_it(
    digits_run, tmp_path, change, message
):
    import time

    out = export_encoder(digits_run / "last.pt", tmp_path / "e")
    config = json.loads((out / "config.json").read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)  # JSON writes a NaN or infinity as NaN / Infinity
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=re.escape(message)):
        dsmae.load_encoder(out)  # a 51 GB model would take minutes and all the memory
    assert time.monotonic() - started < 5


def test_load_encoder_refuses_a_config_that_is_no_json_object(digits_run, tmp_path):
    out = export_encoder(digits_run / "last.pt", tmp_path / "e")
    for text, message in (("{not", "is not JSON"), ("[1]", "expected a JSON object, got list")):
        (out / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            dsmae.load_encoder(out)


def test_load_encoder_of_a_checkpoint_pools_as_its_export(digits_run):
    encoder = dsmae.load_encoder(digits_run / "last.pt").eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(encoder(x), pooled_features(encoder, x, "avg"))  # as the export
    assert dsmae.load_encoder(digits_run / "last.pt", num_classes=4).global_pool == "avg"


def test_load_encoder_records_the_input_of_a_checkpoint(digits_run):
    encoder = dsmae.load_encoder(digits_run / "last.pt")
    config = timm.data.resolve_data_config(model=encoder)
    cfg = Checkpoint.read(digits_run / "last.pt").config
    assert tuple(config["input_size"]) == (1, 8, 8) and list(config["mean"]) == cfg.data.mean


# ------------------------------------------------------------------ ONNX


def test_onnx_matches_pytorch_on_real_photos(cifar_run, photos, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    for pool in ("avg", "cls"):
        out = export_encoder(cifar_run, tmp_path / pool, onnx=True, pool=pool)
        graph = onnx.load(out / "encoder.onnx")
        assert [o.version for o in graph.opset_import if o.domain == ""] == [ONNX_OPSET]
        session = onnxruntime.InferenceSession(str(out / "encoder.onnx"))
        assert session.get_inputs()[0].name == "images"
        assert session.get_inputs()[0].shape[0] == "batch" and session.get_outputs()[0].name == (
            "features"
        )
        checkpoint = Checkpoint.read(cifar_run)
        seen = Preprocessing.of_config(checkpoint.config)
        pixels = image_tensor(photos, seen).float().div(255)  # the real photos, 16x16
        x = (pixels - torch.tensor(seen.mean).view(1, 3, 1, 1)) / torch.tensor(seen.std).view(
            1, 3, 1, 1
        )
        with torch.no_grad():
            expected = pooled_features(checkpoint.encoder().eval(), x, pool)
        for batch in (x[:1], x):  # any batch size
            (got,) = session.run(["features"], {"images": batch.numpy()})
            diff = np.abs(got - expected[: len(batch)].numpy()).max()
            assert got.shape == (len(batch), 32) and diff <= 1e-4, (pool, diff)


def test_onnx_without_its_packages_says_how_to_install_them(digits_run, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name)
    )
    with pytest.raises(ConfigError, match=re.escape('pip install "dsmae[onnx]"')):
        export_encoder(digits_run / "last.pt", tmp_path / "e", onnx=True)
    assert not (tmp_path / "e").exists()  # refused before anything is written


def test_an_overwritten_export_keeps_no_stale_onnx(digits_run, tmp_path):
    export_encoder(digits_run / "last.pt", tmp_path / "e", onnx=True)
    assert (tmp_path / "e" / "encoder.onnx").is_file()
    export_encoder(digits_run / "last.pt", tmp_path / "e", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "config.json", "model.safetensors"
    ]  # fmt: skip


# ------------------------------------------------------------------ the Hub


class FakeHub:
    """``huggingface_hub.HfApi``'s create_repo / file_exists / upload_folder, offline: an
    upload lands in a local Hub cache (``cache``) under a fixed commit, where
    ``hf_hub_download`` finds it in offline mode."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, cache: Path, has_card: bool = False) -> None:
        self.cache, self.has_card, self.uploads = cache, has_card, []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import huggingface_hub
        from huggingface_hub import constants

        hub = self

        def create_repo(api, repo_id, private=False, exist_ok=False, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def file_exists(api, repo_id, filename, **kwargs):
            return hub.has_card

        def upload_folder(api, *, repo_id, folder_path, commit_message, **kwargs):
            hub.uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            hub.check_loads(Path(folder_path))
            repo = hub.cache / f"models--{repo_id.replace('/', '--')}"
            shutil.copytree(folder_path, repo / "snapshots" / hub.COMMIT, dirs_exist_ok=True)
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / "main").write_text(hub.COMMIT)

        for name, fake in [("create_repo", create_repo), ("file_exists", file_exists),
                           ("upload_folder", upload_folder)]:  # fmt: skip
            monkeypatch.setattr(huggingface_hub.HfApi, name, fake)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # downloads: from the cache only
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.cache))

    @staticmethod
    def check_loads(folder: Path) -> None:
        """The folder handed to the upload is one that timm's ``local-dir:`` loads."""
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        assert model.num_classes == 0 and model.global_pool == "avg"


def test_push_uploads_a_folder_that_timm_loads_and_hf_hub_finds(digits_run, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    out = export_encoder(digits_run / "last.pt", tmp_path / "e")
    assert push_to_hub(out, "someone/digits") == "https://huggingface.co/someone/digits"
    assert hub.uploads == [("someone/digits", ["README.md", "config.json", "model.safetensors"])]
    card = hub.cache / "models--someone--digits" / "snapshots" / hub.COMMIT / "README.md"
    assert "library_name: timm" in card.read_text()
    assert 'timm.create_model("hf-hub:someone/digits", pretrained=True)' in card.read_text()

    model = timm.create_model("hf-hub:someone/digits", pretrained=True).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), dsmae.load_encoder(out).eval()(x))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    hub.has_card = True  # a repo's own card is kept
    push_to_hub(out, "someone/digits")
    assert hub.uploads[-1] == ("someone/digits", ["config.json", "model.safetensors"])


@pytest.fixture
def refusing_hub(monkeypatch):
    """A local server in place of the Hub that answers every request 401 Unauthorized."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from huggingface_hub import constants

    class Refuse(BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            body = b'{"error": "Invalid credentials in Authorization header"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_HEAD = _refuse

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    server.server_close()


def test_a_push_the_hub_refuses_is_one_clear_error(digits_run, tmp_path, refusing_hub):
    out = export_encoder(digits_run / "last.pt", tmp_path / "e")
    with pytest.raises(HubError) as refusal:
        push_to_hub(out, "someone/digits")
    message = str(refusal.value)
    assert "\n" not in message and "401" in message
    assert "hf auth login" in message and "someone/digits" in message and ".." not in message
    with pytest.raises(FileNotFoundError, match="not a dsmae export"):
        push_to_hub(tmp_path, "someone/digits")


# ------------------------------------------------------------------ the docs


def page_snippets(page: Path) -> list[str]:
    """The python blocks of a documentation page."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


def test_the_export_page_snippets_run_as_written(
    cifar_run, photos, cifar_folder, tmp_path, monkeypatch
):
    export = export_encoder(cifar_run, tmp_path / "exported", onnx=True)
    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    push_to_hub(export, "someone/dsmae-cifar")
    where = {
        "exported/c10": str(export), "runs/c10/last.pt": str(cifar_run),
        "photos/": str(cifar_folder / "test"), "USER/REPO": "someone/dsmae-cifar",
        "photo.jpg": str(photos[0]), "photo2.jpg": str(photos[1]),
    }  # fmt: skip
    snippets = page_snippets(EXPORT_PAGE)
    assert f"opset {ONNX_OPSET}" in EXPORT_PAGE.read_text()
    assert len(snippets) == 4  # timm local-dir, timm hf-hub, ONNX, extract_features
    results = []
    for snippet in snippets:
        for written, real in where.items():
            snippet = snippet.replace(written, real)
        namespace: dict = {}
        exec(compile(snippet, str(EXPORT_PAGE), "exec"), namespace)
        results.append(namespace)
    local, hf, onnx, ours = results
    expected = dsmae.extract_features(cifar_run, photos[:2], device="cpu")
    torch.testing.assert_close(local["features"], expected[:1], atol=1e-5, rtol=0)
    assert local["classifier"].num_classes == 10
    assert hf["model"].pretrained_cfg["mean"] == local["config"]["mean"]
    assert np.abs(onnx["features"] - expected.numpy()).max() <= 1e-4
    assert ours["features"].shape == (len(list((cifar_folder / "test").rglob("*.jpg"))), 32)
    assert ours["cls"].shape == (1, 32) and ours["from_tensor"].shape == (1, 32)
