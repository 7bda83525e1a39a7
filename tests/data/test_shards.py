"""WebDataset shards: written from real images by ``dsmae shards``, streamed for
pre-training (per process, per reader, seeded, resumable), end to end."""

import contextlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from shard_reading import members

from dsmae import distributed
from dsmae.checkpoint import load_checkpoint, save_checkpoint
from dsmae.cli import main
from dsmae.config import ConfigError, build_config
from dsmae.data.images import DataError
from dsmae.data.shard_writer import write_shards
from dsmae.data.shards import ShardStream, buffer_shuffle, open_stream, shard_urls
from dsmae.data.sources import is_shard_source, open_source
from dsmae.preemption import PREEMPTED_EXIT
from dsmae.pretrain import pretrain

IMAGES, SHARD_SIZE = 256, 32  # 8 shards of real digits
SETTINGS = {
    "data.samples_per_epoch": IMAGES,
    "data.workers": 2,
    "data.shuffle_buffer": 48,
    "model.patch_size": 4,
    "model.depth": 1,
    "model.embed_dim": 32,
    "model.num_heads": 2,
    "model.decoder_depth": 1,
    "model.regressor_depth": 1,
    "train.batch_size": 32,
    "train.epochs": 2,
    "train.warmup_epochs": 1,
    "train.log_every": 1,
    "probe.after_pretrain": False,
}
RUN = ["pretrain", "--preset", "quickstart", "--device", "cpu"]
for _key, _value in SETTINGS.items():
    RUN += ["--set", f"{_key}={json.dumps(_value)}"]


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """256 real 8x8 digits as grey PNG files in one sub-folder per class."""
    digits = open_source("digits", "train", root=".")
    folder = tmp_path_factory.mktemp("digits")
    for i in range(IMAGES):
        path = folder / str(int(digits.labels[i])) / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(digits.images[i, 0].numpy(), "L").save(path)
    return folder


@pytest.fixture(scope="module")
def shards(digits_folder, tmp_path_factory) -> str:
    """The digits as 8 shards of 32; their brace pattern."""
    out = tmp_path_factory.mktemp("shards")
    written = write_shards(digits_folder, out, SHARD_SIZE)
    assert written.shards == 8 and written.images == IMAGES and len(written.classes) == 10
    return written.pattern


def _stream(pattern: str, **fields) -> ShardStream:
    options = {"batch": 16, "size": 8, "channels": 1, "shuffle_buffer": 48, "workers": 2}
    return ShardStream(tuple(shard_urls(pattern)), **{**options, **fields})


def _read(stream: ShardStream, epoch: int = 0, start: int = 0, stop: int = 16):
    """(images (n, C, H, W), [(shard, key), ...]) of steps ``start`` to ``stop - 1``."""
    batches = list(stream.epoch(epoch, start, stop))
    images = torch.cat([b.images for b in batches])
    return images, [(s, k) for b in batches for s, k in zip(b.shards, b.keys)]


# ------------------------------------------------------------------ sources


def test_shard_patterns_urls_and_pipes_are_shards_and_data_sets_and_folders_are_not(tmp_path):
    urls = ("https://host/train-000001.tar?sig=abc", "pipe:curl -s https://host/x")
    for source in (
        "shards/train-{000000..000099}.tar",
        "a.tar",
        "x/b.tar.gz",
        "a.tar::b.tar",
        *urls,
    ):
        assert is_shard_source(source), source
    folder = tmp_path / "looks.tar"
    folder.mkdir()
    for source in ("digits", "cifar10", str(tmp_path), str(folder), "photos", "https://host/"):
        assert not is_shard_source(source), source


def test_shards_are_never_loaded_whole(shards):
    with pytest.raises(DataError, match=r"streamed for pre-training only.*test split"):
        open_source(shards, "test", root=".")


def test_a_stream_needs_its_epoch_length_and_refuses_a_subset(shards):
    with pytest.raises(ConfigError, match=r"data\.samples_per_epoch: .*WebDataset shards"):
        build_config("quickstart", overrides={"data.source": shards})
    changes = {"data.source": shards, "data.samples_per_epoch": 64, "data.subset": 10}
    with pytest.raises(ConfigError, match=r"data\.subset"):
        build_config("quickstart", overrides=changes)
    with pytest.raises(ConfigError, match=r"data\.workers"):
        build_config("quickstart", overrides={"data.workers": -1})


# ------------------------------------------------------------------ writing


# ------------------------------------------------------------------ the stream


def test_buffer_shuffle_is_seeded_and_moves_nothing_more_than_a_buffer_ahead():
    items = list(range(1000))
    a, b = (list(buffer_shuffle(items, 50, random.Random(1))) for _ in range(2))
    assert a == b and sorted(a) == items and a != items
    assert all(position >= item - 49 for position, item in enumerate(a))
    assert list(buffer_shuffle(items, 1, random.Random(1))) == items


def test_an_epoch_is_its_sample_count_in_batches_of_decoded_images(shards):
    images, read = _read(_stream(shards))  # 16 steps of 16 images: the 8 shards, once
    assert images.shape == (IMAGES, 1, 8, 8) and images.dtype == torch.uint8
    assert sorted(read) == sorted(members(shards))
    samples = members(shards)
    for image, sample in zip(images[:20], read[:20]):
        png = np.array(Image.open(io.BytesIO(samples[sample]["png"])))
        assert torch.equal(image[0], torch.from_numpy(png))


def test_the_same_seed_gives_the_same_stream_and_another_seed_or_epoch_another(shards):
    _, a = _read(_stream(shards))
    assert _read(_stream(shards))[1] == a
    assert _read(_stream(shards, workers=1))[1] == _read(_stream(shards, workers=0))[1]
    assert _read(_stream(shards, seed=1))[1] != a
    assert _read(_stream(shards), epoch=1)[1] != a


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_a_resumed_epoch_continues_each_reader_exactly(shards):
    stream = _stream(shards, workers=3)  # readers of 3, 3 and 2 shards
    images, read = _read(stream, epoch=1)
    for start in (1, 5, 9):
        resumed, resumed_read = _read(stream, epoch=1, start=start)
        assert resumed_read == read[start * 16 :]
        assert torch.equal(resumed, images[start * 16 :])


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (gloo on the CPU), which must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _read_as_this_rank(source: str, out: str) -> None:
    """As one process of torchrun (gloo): read epoch 0 of its stream; rank 0 writes what
    every rank read (``all_gather_object``) to ``out``."""
    proc, _ = distributed.setup("cpu")
    cfg = build_config("quickstart", overrides={**SETTINGS, "data.source": source})
    stream = open_stream(cfg, proc.rank, proc.world_size)
    read = [(s, k) for b in stream.epoch(0, 0, IMAGES // 32) for s, k in zip(b.shards, b.keys)]
    everyone: list = [None] * proc.world_size
    dist.all_gather_object(everyone, read)
    if proc.is_main:
        Path(out).write_text(json.dumps(everyone))
    distributed.teardown()


def test_two_processes_read_disjoint_shards_that_together_make_the_epoch(shards, tmp_path):
    out = tmp_path / "read.json"
    _torchrun(__file__, shards, str(out))  # runs _read_as_this_rank on each rank
    ranks = [[tuple(x) for x in read] for read in json.loads(out.read_text())]
    assert [len(read) for read in ranks] == [IMAGES // 2] * 2  # 8 steps x 16 images each
    urls = [{url for url, _ in read} for read in ranks]
    assert len(urls[0]) == len(urls[1]) == 4 and not urls[0] & urls[1]
    assert sorted(ranks[0] + ranks[1]) == sorted(members(shards))


def test_pipe_and_http_urls_stream_as_local_files_do(shards, serve):
    local = _read(_stream(shards), stop=4)[0]
    first = shard_urls(shards)[0]
    base = serve(Path(first)).rsplit("/", 1)[0]
    for source in (f"pipe:cat {shards}", f"{base}/shard-{{000000..000007}}.tar"):
        assert torch.equal(_read(_stream(source), stop=4)[0], local), source


def _bad_shard(folder: Path, good: str) -> str:
    """A copy of the shard ``good`` whose second image is not an image; its path."""
    path = folder / "bad-000000.tar"
    with tarfile.open(good) as src, tarfile.open(path, "w") as dst:
        for i, member in enumerate(src.getmembers()):
            data = b"not a png" if i == 2 else src.extractfile(member).read()
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return str(path)


def test_a_bad_image_is_named_in_one_line_or_skipped(shards, tmp_path, caplog):
    bad = _bad_shard(tmp_path, shard_urls(shards)[0])
    stream = _stream(bad, batch=8, workers=1, shuffle_buffer=1)
    with pytest.raises(DataError, match=r"Cannot read image 000000001\.png of shard .*bad-"):
        _read(stream, stop=1)
    try:
        _read(stream, stop=1)
    except DataError as err:
        assert "\n" not in str(err) and "--skip-bad-images" in str(err)
    with caplog.at_level(logging.WARNING):
        _, read = _read(_stream(bad, batch=8, workers=0, skip_bad=True), stop=4)
    assert "skipped: Cannot read image 000000001.png" in caplog.text
    assert len(read) == 32 and "000000001" not in {key for _, key in read}


def test_missing_too_few_or_empty_shards_and_no_webdataset_are_clear_errors(
    shards, tmp_path, monkeypatch
):
    with pytest.raises(DataError, match=r"1 of the 9 shards .* are not files: .*000008\.tar"):
        shard_urls(shards.replace("000007", "000008"))
    cfg = build_config("quickstart", overrides={**SETTINGS, "data.source": shards})
    with pytest.raises(DataError, match=r"8 shard.* for 16 processes"):
        open_stream(cfg, 0, 16)
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(DataError, match=r"no samples in the shards .*empty\.tar"):
        _read(_stream(str(empty), workers=0), stop=1)
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(DataError, match=r'pip install "dsmae\[shards\]"'):
        shard_urls(shards)


# ------------------------------------------------------------------ pre-training


def test_pretrain_streams_shards_end_to_end(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*RUN, "--data", shards, "--out", str(out)]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt")["step"] == 2 * IMAGES // 32
    assert load_checkpoint(out / "last.pt")["stream"] == {"processes": 1, "workers": 2}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["source"] == shards and len(saved["data"]["mean"]) == 1
    assert 0.2 < saved["data"]["mean"][0] < 0.4  # measured on the digits: about 0.31
    assert (out / "denoise.png").is_file()
    missing = shards.replace("000007", "000009")
    assert main([*RUN, "--data", missing, "--out", str(tmp_path / "x")]) == 2
    assert "shards of" in capsys.readouterr().err


def test_a_failing_pipe_command_is_named_by_its_exit_status_alone(tmp_path, capsys):
    assert main([*RUN, "--data", "pipe:exit 3", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Cannot read shard pipe:exit 3: its command exited with status 3" in err, err
    assert "(('" not in err and "{'shell'" not in err  # not WebDataset's subprocess arguments


def test_a_shard_image_that_is_no_image_file_is_named_in_words(shards, tmp_path, capsys):
    bad = _bad_shard(tmp_path, shard_urls(shards)[0])
    assert main([*RUN, "--data", bad, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"Cannot read image 000000001.png of shard {bad}: " in err, err
    assert "not an image file that can be read" in err
    assert "object at 0x" not in err  # not PIL's name of an in-memory file


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    moments = state["optimizer"]["state"].items()
    slots = {f"{k}.{slot}": v for k, s in moments for slot, v in s.items()}
    return {**state["model"], **slots}


def test_a_run_on_shards_resumed_mid_epoch_ends_bit_identical(shards, tmp_path, caplog):
    config = {**SETTINGS, "data.source": shards, "train.device": "cpu"}
    straight = build_config("quickstart", overrides={**config, "out": str(tmp_path / "a")})
    pretrain(straight)
    every_step = {"train.checkpoint_minutes": 1e-9, "train.keep_checkpoints": 0}
    every_step["out"] = str(tmp_path / "b")
    broken = build_config("quickstart", overrides={**config, **every_step})
    pretrain(broken)
    out = Path(broken.out)
    for path in out.glob("*.pt"):  # back to step 11: the middle of epoch 2 (8 steps each)
        if path.name == "last.pt" or path.name > "checkpoint-00000011.pt":
            path.unlink()
    with caplog.at_level(logging.INFO):
        pretrain(broken, resume="auto")
    assert "the stream of epoch 1 continues exactly at its step 3" in caplog.text
    a, b = _weights(Path(straight.out) / "last.pt"), _weights(out / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stream_resumed_mid_epoch_on_other_processes_is_refused_unless_forced(
    shards, tmp_path, caplog
):
    every_step = {"train.checkpoint_minutes": 1e-9, "train.keep_checkpoints": 0}
    config = {**SETTINGS, **every_step, "data.source": shards, "train.device": "cpu"}
    cfg = build_config("quickstart", overrides={**config, "out": str(tmp_path / "run")})
    pretrain(cfg)
    state = load_checkpoint(tmp_path / "run" / "checkpoint-00000003.pt")  # epoch 0, step 3
    state["stream"]["processes"] = 2  # as if a run on 2 processes had written it
    moved = save_checkpoint(tmp_path / "moved.pt", state)
    refused = r"step 3 of epoch 0 of a stream dealt over 2 process.*add --force"
    with pytest.raises(ConfigError, match=refused):
        pretrain(cfg, resume=str(moved))
    with caplog.at_level(logging.WARNING):
        assert pretrain(cfg, resume=str(moved), force=True).last_metrics["step"] == 16
    assert "its rest is dealt anew over 1 process(es) with data.workers=2" in caplog.text
    state["step"] = 8  # at an epoch's end any number of processes continues
    pretrain(cfg, resume=str(save_checkpoint(tmp_path / "at-8.pt", state)))


def test_two_ranks_under_torchrun_pretrain_on_disjoint_shards(shards, tmp_path):
    out = tmp_path / "two"
    done = _torchrun("-m", "dsmae", *RUN, "--data", shards, "--epochs", "1", "--out", str(out))
    assert "process 1 of 2 streams 4 of 8 shards" in done.stderr
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == IMAGES // 32 and state["stream"]["processes"] == 2


if __name__ == "__main__":  # a process of the torchrun above
    _read_as_this_rank(*sys.argv[1:])


def test_a_signal_to_the_whole_process_group_stops_a_run_on_shards_cleanly(shards, tmp_path):
    """Slurm's --signal and Ctrl-C reach the readers too: only the training process acts."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "dsmae", *RUN, "--data", shards, "--epochs", "50"]
    child = subprocess.Popen([*argv, "--out", str(out)], stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 12:  # in epoch 2
            break
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGUSR1)
    _, err = child.communicate(timeout=120)
    assert child.returncode == PREEMPTED_EXIT, err[-3000:]
    assert err.count("SIGUSR1 received") == 1 and "Traceback" not in err
    assert main([*RUN, "--data", shards, "--epochs", "2", "--out", str(out), "--resume", "auto",
                 "--force"]) == 0  # fmt: skip


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``, from /proc (Linux)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, parent, ...
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has ended: gone from /proc, or a zombie not reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux: prctl and /proc")
def test_the_readers_of_a_run_killed_outright_die_with_it_at_once(shards, tmp_path):
    out = tmp_path / "run"
    # epochs of 800 steps: no epoch's end (and new readers) while the test looks
    long_epochs = ["--set", f"data.samples_per_epoch={100 * IMAGES}"]
    argv = [sys.executable, "-m", "dsmae", *RUN, "--data", shards, *long_epochs, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        child = subprocess.Popen(argv, env=env, stderr=stderr, start_new_session=True)
    try:
        metrics, readers = out / "metrics.jsonl", set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert child.poll() is None, log.read_text()[-3000:]
            if metrics.is_file() and metrics.read_text().count("\n") >= 3:  # both readers read
                readers = _children(child.pid)
                if len(readers) >= 2:  # data.workers=2: a DataLoader worker per reader
                    break
            time.sleep(0.1)
        assert len(readers) >= 2, log.read_text()[-3000:]

        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        while not all(map(_ended, readers)) and time.monotonic() - killed < 1.0:
            time.sleep(0.01)
        alive = [pid for pid in readers if not _ended(pid)]
        assert not alive, f"readers {alive} outlived their run by more than a second"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # whatever is left of the run
        child.wait(timeout=60)
