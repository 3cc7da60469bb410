"""Issue-10 bench groundwork without the peers' venv: the ctypes TurboJPEG binding against
PyTurboJPEG, the prototype's crop decoder and batch ring, the window protocol, and the one-line
skip of FFCV/DALI rows when their venv is missing. Tiny data, seconds."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from formats import jpeg
from tests.conftest import jpeg_bytes
from tests.loader_shards import dataset_dir

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # as the bench scripts do for their siblings

tjdecode = importlib.import_module("prototypes.tjdecode")
crop_decode = importlib.import_module("prototypes.crop_decode")
batch_ring = importlib.import_module("prototypes.batch_ring")
window_server = importlib.import_module("window_server")
peer_servers = importlib.import_module("peer_servers")

needs_turbo = pytest.mark.skipif(jpeg.turbo() is None, reason="libturbojpeg missing")


@needs_turbo
@pytest.mark.parametrize("scale", [(1, 1), (1, 2), (1, 4), (1, 8)])
def test_ctypes_decode_equals_pyturbojpeg(scale):
    data = jpeg_bytes(75, 101, seed=3)
    expected = jpeg.turbo().decode(data, pixel_format=jpeg.TJPF_RGB, scaling_factor=scale)
    assert np.array_equal(tjdecode.decode(data, scale), expected)


@needs_turbo
def test_ctypes_decode_rejects_truncated_and_garbage():
    data = jpeg_bytes(64, 64, seed=1)
    with pytest.raises((ValueError, OSError)):
        tjdecode.decode(data[: len(data) // 2])
    with pytest.raises((ValueError, OSError)):
        tjdecode.decode(b"\xff\xd8\xff" + bytes(200))
    with pytest.raises(OSError):
        tjdecode.decode(b"not a jpeg at all" * 8)


@pytest.mark.parametrize("box_height,box_width,expected", [(100, 100, (1, 1)), (256, 300, (1, 2)),
                                                           (600, 512, (1, 4)), (1024, 1100, (1, 8)),
                                                           (1024, 200, (1, 1))])
def test_integer_dct_scale_matches_augment(box_height, box_width, expected):
    from train.augment import dct_scale_for_box

    assert crop_decode.dct_scale(box_height, box_width, 128, 128) == expected
    assert dct_scale_for_box(box_height, box_width, 128, 128) == expected


@needs_turbo
@pytest.mark.parametrize("resize", crop_decode.RESIZERS)
@pytest.mark.parametrize("flip", [False, True])
def test_crop_decoder_whole_image_at_its_own_size_is_the_decode(resize, flip):
    data = jpeg_bytes(48, 64, seed=5)
    decoded = tjdecode.decode(data)
    slot = np.zeros((48, 64, 3), np.uint8)
    crop_decode.CropDecoder(48 * 64, resize).into(slot, data, 48, 64, (0, 0, 48, 64), flip)
    expected = decoded[:, ::-1] if flip else decoded
    assert np.abs(slot.astype(int) - expected).max() <= 1


@needs_turbo
def test_crop_decoder_downscales_a_box_at_a_dct_scale():
    data = jpeg_bytes(320, 427, seed=7)
    slot = np.zeros((64, 64, 3), np.uint8)
    crop_decode.CropDecoder(320 * 427, "pil").into(slot, data, 320, 427, (10, 20, 300, 300))
    reference = jpeg.turbo().decode(data, pixel_format=jpeg.TJPF_RGB)[10:310, 20:320].astype(float)
    assert np.abs(slot.mean((0, 1)) - reference.mean((0, 1))).max() < 3  # the same picture, smaller
    assert slot.std() > 5  # and not a flat fill


def test_batch_ring_hands_batches_out_in_order_and_reuses_slots():
    ring = batch_ring.BatchRing(2, 1, 1, 1)

    def worker(numbers):
        for number in numbers:
            slot = ring.claim(number)
            slot.fill_(number)
            ring.publish(number, 1, number)

    late = threading.Thread(target=worker, args=([1, 3],))
    early = threading.Thread(target=worker, args=([0, 2],))
    late.start()
    early.start()
    seen = []
    for number in range(4):
        images, label = ring.take(number)
        seen.append((int(images[0, 0, 0, 0]), label))
    late.join(5)
    early.join(5)
    assert seen == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert not late.is_alive() and not early.is_alive()


def test_batch_ring_raises_a_workers_error_in_the_consumer():
    ring = batch_ring.BatchRing(2, 1, 1, 1)
    ring.publish(0, 0, None, ValueError("record 7: cannot decode"))
    with pytest.raises(ValueError, match="record 7"):
        ring.take(0)


def test_window_protocol_times_the_requested_batches(monkeypatch, capsys):
    import io

    import torch

    def batches():
        while True:
            yield torch.zeros((4, 3, 2, 2), dtype=torch.uint8), torch.zeros(4)

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"batches": 5, "warmup": 2}\n{"quit": true}\n'))
    assert window_server.serve(batches, {"library": "fake"}, 1) == 0
    ready, result = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ready["ready"]["shape"] == [4, 3, 2, 2] and ready["ready"]["contiguous"]
    assert result["batches"] == 5 and result["images"] == 20 and result["seconds"] > 0


def test_window_protocol_reports_a_broken_loader_as_one_line(monkeypatch, capsys):
    def batches():
        raise OSError("no such beton")
        yield

    assert window_server.serve(batches, {}, 1) == 1
    assert json.loads(capsys.readouterr().out) == {"error": "OSError: no such beton"}


def test_peer_rows_are_skipped_with_one_line_without_their_venv(tmp_path):
    class Args:
        peers_python = tmp_path / "nowhere" / "bin" / "python"
        workers, batch_size, repeats, seconds = 2, 8, 1, 0.1

    rows = peer_servers.peer_baselines(Args(), tmp_path, tmp_path)
    assert {(group, key) for group, key, _, _ in rows} == {
        (g, k) for g in ("train128", "train224") for k in ("ffcv", "ffcv-contiguous", "dali")}
    for _, _, _, thunk in rows:
        message = thunk()
        assert message.startswith("skipped: no peer venv") and "setup_peers.sh" in message


@needs_turbo
def test_thread_loader_batches_do_not_depend_on_the_thread_count(built_shards):
    thread_loader = importlib.import_module("prototypes.thread_loader")
    from train.augment import TrainCrop

    def first_batches(workers):
        loader = thread_loader.ThreadLoader(dataset_dir(built_shards), 4, TrainCrop(32), workers=workers,
                                            layout="nhwc", tune_process=False)
        batches = iter(loader)
        out = [tuple(t.clone() for t in next(batches)) for _ in range(6)]  # crosses an epoch (18 images)
        loader.close()
        return out

    one, two = first_batches(1), first_batches(2)
    assert all(a[0].equal(b[0]) and a[1].equal(b[1]) for a, b in zip(one, two))
    assert one[0][0].shape == (4, 32, 32, 3)


def test_peer_runner_is_self_contained():
    """peers_runner.py runs under a venv without our packages: it must not import them."""
    source = (BENCH / "peers_runner.py").read_text() + (BENCH / "window_server.py").read_text()
    for ours in ("formats", "train", "prep", "prototypes", "loader_baselines"):
        assert f"import {ours}" not in source and f"from {ours}" not in source
    done = subprocess.run([sys.executable, str(BENCH / "peers_runner.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "write-ffcv" in done.stdout
