"""train.data.decode: both backends (the native extension and the pure-Python fallback) against PIL
references, against each other, at full and DCT-reduced scales, flips, record-table checks and
corrupt data; the native call's own contract (region decode, GIL, arguments); and the GPU
(nvJPEG) path's logic, run on CPU here and on CUDA when present."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train.data.decode as decode
import train.data.gpu_decode as gpu_decode
from formats import jpeg
from formats.dataset import RecordDataset
from tests.conftest import jpeg_bytes
from tests.loader_shards import dataset_dir
from tests.train.data import one_box
from train.data.crops import TrainCrop, center_crop_box

REPO = Path(__file__).resolve().parents[3]
needs_native = pytest.mark.skipif(
    decode.native_module() is None, reason="train.data.decode_native is not built"
)
BACKENDS = [pytest.param("native", marks=needs_native), "python"]


@pytest.fixture(scope="module")
def records(built_shards):
    return RecordDataset(dataset_dir(built_shards))


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(decode, "native_module", lambda: None)
    assert decode.backend() == request.param
    return request.param


def pil_reference(data, box, out_height, out_width):
    """torchvision's RandomResizedCrop on PIL: full-size decode, crop, antialiased bilinear
    resize (HWC)."""
    top, left, height, width = box
    image = Image.fromarray(decode.decode_rgb(data)).crop((left, top, left + width, top + height))
    return np.array(image.resize((out_width, out_height), Image.Resampling.BILINEAR))


def decoded(records, index, box, out_height, out_width, flip=False):
    """One image through `decode_crops_into` (whichever backend is active), HWC."""
    out = np.zeros((1, out_height, out_width, 3), dtype=np.uint8)
    failure = decode.decode_crops_into(
        out,
        [records.view(index)],
        records.heights[[index]],
        records.widths[[index]],
        np.array([box]),
        np.array([flip]),
    )
    assert failure is None, failure
    return out[0]


def mean_abs(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_crops_match_pil(records, backend):
    """Full-scale crops match PIL's crop + resize to +-2; DCT-scaled ones (a 1/2..1/8 decode)
    differ from a full-size reference only by the decoder's downscale."""
    rng = random.Random(0)
    num_scaled = 0
    for index in range(len(records)):
        height, width = int(records.heights[index]), int(records.widths[index])
        for crop_size in (48, 64, 128, 224):
            box = one_box(TrainCrop(crop_size), height, width, rng)
            ours = decoded(records, index, box, crop_size, crop_size).astype(np.int16)
            difference = np.abs(
                ours - pil_reference(records.view(index), box, crop_size, crop_size)
            )
            # the python backend decodes in full without libturbojpeg (SHARDTRAIN_NO_TURBOJPEG=1)
            scale = (
                decode.decode_scale(box, crop_size, crop_size)
                if backend == "python"
                else decode.dct_scale_for_box(box[2], box[3], crop_size, crop_size)
            )
            if scale == (1, 1):
                assert difference.max() <= 2 and difference.mean() < 0.3, (index, box, crop_size)
            else:  # same place: closer to the reference than the box moved by 2 px
                num_scaled += 1
                assert difference.mean() < 8, (index, box, crop_size)  # textured samples
                top, left, box_height, box_width = box
                moved = (
                    min(top + 2, height - box_height),
                    min(left + 2, width - box_width),
                    box_height,
                    box_width,
                )
                if moved != box:
                    moved_reference = pil_reference(
                        records.view(index), moved, crop_size, crop_size
                    )
                    assert difference.mean() < np.abs(ours - moved_reference).mean()
    assert num_scaled > 0 or (backend == "python" and jpeg.turbo() is None)


@needs_native
def test_native_and_python_backends_agree(records, monkeypatch):
    """The same crops from both backends, to resampler rounding: every plan-drawn box of every
    record at 4 crop sizes (full and DCT-reduced scales, flips, upscales)."""
    rng, cases = random.Random(5), []
    for index in range(len(records)):
        height, width = int(records.heights[index]), int(records.widths[index])
        for crop_size in (32, 64, 128, 224):
            box = one_box(TrainCrop(crop_size), height, width, rng)
            # without libturbojpeg the python backend decodes in full: compare full-scale crops only
            if jpeg.turbo() is not None or decode.dct_scale_for_box(
                box[2], box[3], crop_size, crop_size
            ) == (1, 1):
                cases.append((index, box, crop_size, rng.random() < 0.5))
    native = [decoded(records, index, box, size, size, flip) for index, box, size, flip in cases]
    monkeypatch.setattr(decode, "native_module", lambda: None)
    python = [decoded(records, index, box, size, size, flip) for index, box, size, flip in cases]
    differences = [mean_abs(a, b) for a, b in zip(native, python)]
    assert max(differences) < 0.5 and float(np.mean(differences)) < 0.1, max(differences)


def test_flip_mirrors_exactly(records, backend):
    box = (10, 20, 100, 120)
    assert np.array_equal(
        decoded(records, 0, box, 64, 80, flip=True), decoded(records, 0, box, 64, 80)[:, ::-1]
    )


@pytest.mark.skipif(jpeg.turbo() is None, reason="DCT-scaled decodes need libturbojpeg")
def test_large_box_decodes_at_reduced_dct_scale(records, monkeypatch):
    scales = []
    real = decode.decode_rgb
    monkeypatch.setattr(decode, "native_module", lambda: None)
    monkeypatch.setattr(
        decode, "decode_rgb", lambda data, scale=(1, 1): scales.append(scale) or real(data, scale)
    )
    box = center_crop_box(
        160, 213, 32
    )  # record 0 is 160 x 213; a ~140 px box -> 32 px: 1/4 covers it
    ours = decoded(records, 0, box, 32, 32)
    assert scales == [(1, 4)]
    assert mean_abs(ours, pil_reference(records.view(0), box, 32, 32)) < 3


def test_upscaled_crop_of_a_small_record(records, backend):
    index = int(np.argmin(records.heights))  # the 48 px sample image
    box = (0, 0, int(records.heights[index]), int(records.widths[index]))
    ours = decoded(records, index, box, 96, 128)
    assert ours.shape == (96, 128, 3)
    assert (
        np.abs(ours.astype(np.int16) - pil_reference(records.view(index), box, 96, 128)).max() <= 2
    )


def test_size_mismatch_with_the_record_table_fails(records, backend):
    out = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    position, reason = decode.decode_crops_into(
        out,
        [records.view(0)],
        np.array([100]),
        np.array([100]),
        np.array([[0, 0, 50, 50]]),
        np.array([False]),
    )
    assert position == 0 and "record table says 100x100" in reason


def test_pil_fallback_without_libturbojpeg(records, monkeypatch):
    monkeypatch.setattr(decode, "native_module", lambda: None)
    box = (0, 0, 150, 150)
    full_speed = decoded(records, 0, box, 32, 32)
    monkeypatch.setattr(decode.jpeg, "turbo", lambda: None)
    assert (
        mean_abs(decoded(records, 0, box, 32, 32), full_speed) < 3
    )  # no DCT scaling without turbo


def corrupt_variants(data: bytes) -> dict[str, bytes]:
    sos = data.index(b"\xff\xda")
    return {
        "empty": b"",
        "garbage": b"not a jpeg" * 20,
        "header only": data[:sos],
        "cut in half": data[: len(data) // 2],
        "cut, EOI kept": data[: len(data) // 2]
        + b"\xff\xd9",  # libjpeg: only a warning, grey below
        "junk before a marker": data[:sos] + b"\x00\x11\x22" + data[sos:],  # a warning only too
    }


@pytest.mark.parametrize("variant", list(corrupt_variants(jpeg_bytes(64, 64))))
def test_corrupt_jpeg_is_an_error_never_grey_pixels(backend, variant):
    """Every libjpeg warning rejects the image (issue 9): libjpeg itself would decode past them.
    A good image before the bad one is decoded; the failure names the bad one's position."""
    good = jpeg_bytes(64, 64, seed=1)
    bad = corrupt_variants(jpeg_bytes(64, 64, seed=2))[variant]
    if (
        backend == "python"
        and decode.jpeg.turbo() is None
        and variant in ("junk before a marker", "cut, EOI kept")
    ):
        pytest.skip("PIL does not report libjpeg's warnings")
    out = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    failure = decode.decode_crops_into(
        out,
        [good, bad],
        np.array([64, 64]),
        np.array([64, 64]),
        np.array([[0, 0, 64, 64]] * 2),
        np.array([False, False]),
    )
    assert failure is not None and failure[0] == 1 and failure[1], (variant, failure)
    assert out[0].std() > 5  # the good image went in


@needs_native
def test_native_region_decode_equals_a_full_decode_inside_the_box(records):
    """Box at its own size (an identity resize): exactly the full decode's pixels, whatever the
    box's alignment to libjpeg's iMCU columns (chroma upsampling at the region's edges)."""
    native, rng = decode.native_module(), random.Random(3)
    for _ in range(200):
        index = rng.randrange(len(records))
        height, width = int(records.heights[index]), int(records.widths[index])
        box_height, box_width = rng.randint(1, min(height, 80)), rng.randint(1, min(width, 80))
        top, left = rng.randint(0, height - box_height), rng.randint(0, width - box_width)
        out = np.zeros((1, box_height, box_width, 3), dtype=np.uint8)
        params = np.array([[height, width, top, left, box_height, box_width, 0]], dtype=np.int64)
        assert (
            native.decode_crops(out, box_height, box_width, [records.view(index)], params) is None
        )
        full = decode.decode_rgb(records.view(index))
        assert np.array_equal(out[0], full[top : top + box_height, left : left + box_width]), (
            index,
            top,
            left,
        )


@needs_native
def test_native_decode_releases_the_gil(records):
    """While one thread is inside a long native call, another keeps running Python."""
    native = decode.native_module()
    count = 400
    views = [records.view(i % len(records)) for i in range(count)]
    params = np.array(
        [
            [
                records.heights[i % len(records)],
                records.widths[i % len(records)],
                0,
                0,
                records.heights[i % len(records)],
                records.widths[i % len(records)],
                0,
            ]
            for i in range(count)
        ],
        dtype=np.int64,
    )
    out = np.zeros((count, 96, 96, 3), dtype=np.uint8)
    window, ticks, stop = [], [], threading.Event()

    def call():
        window.append(time.perf_counter())
        native.decode_crops(out, 96, 96, views, params)
        window.append(time.perf_counter())
        stop.set()

    caller = threading.Thread(target=call)
    caller.start()
    while not stop.is_set():
        ticks.append(time.perf_counter())
    caller.join()
    inside = sum(window[0] < tick < window[1] for tick in ticks)
    assert window[1] - window[0] > 0.01 and inside > 100, (window[1] - window[0], inside)


@needs_native
def test_native_call_checks_its_arguments(records):
    native = decode.native_module()
    params = np.array([[160, 213, 0, 0, 50, 50, 0]], dtype=np.int64)
    view = records.view(0)
    with pytest.raises(ValueError, match="out holds"):
        native.decode_crops(np.zeros((1, 8, 8, 3), np.uint8), 16, 16, [view], params)
    with pytest.raises(ValueError, match="params must hold"):
        native.decode_crops(np.zeros((1, 8, 8, 3), np.uint8), 8, 8, [view], params[:, :5].copy())
    with pytest.raises(TypeError):
        native.decode_crops(np.zeros((1, 8, 8, 3), np.uint8), 8, 8, [12345], params)
    with pytest.raises((TypeError, BufferError)):  # read-only output
        native.decode_crops(bytes(192), 8, 8, [view], params)
    position, reason = native.decode_crops(
        np.zeros((1, 8, 8, 3), np.uint8),
        8,
        8,
        [view],
        np.array([[160, 213, 150, 200, 50, 50, 0]], dtype=np.int64),
    )
    assert position == 0 and "outside the 160x213 image" in reason


def test_env_var_forces_the_python_backend_and_worker_processes(built_shards):
    script = (
        "import sys; from train.data import decode; from train.data.loaders import TrainLoader; "
        "from train.data.crops import TrainCrop; "
        "print(decode.backend(), TrainLoader(sys.argv[1], 4, TrainCrop(32)).executor)"
    )
    env = dict(os.environ, **{decode.PYTHON_DECODE_ENV: "1"})
    done = subprocess.run(
        [sys.executable, "-c", script, str(dataset_dir(built_shards))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["python", "processes"]


def gpu_batch(records, device):
    rng = random.Random(1)
    indices = list(range(len(records)))
    boxes = [
        one_box(TrainCrop(64), int(records.heights[i]), int(records.widths[i]), rng)
        for i in indices
    ]
    flips = [i % 2 == 1 for i in indices]
    jpegs = [torch.frombuffer(bytearray(records.view(i)), dtype=torch.uint8) for i in indices]
    sizes = [(int(records.heights[i]), int(records.widths[i])) for i in indices]
    images = gpu_decode.decode_crop_batch_gpu(jpegs, boxes, flips, (64, 64), device, sizes)
    expected = torch.stack(
        [
            torch.from_numpy(decoded(records, i, boxes[i], 64, 64, flips[i])).permute(2, 0, 1)
            for i in indices
        ]
    )
    return images, expected


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gpu_path_matches_the_cpu_path(records, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images, expected = gpu_batch(records, device)
    assert (
        images.dtype == torch.uint8
        and images.device.type == device
        and images.shape == (18, 3, 64, 64)
    )
    difference = (images.cpu().int() - expected.int()).abs().float()
    assert difference.mean() < 2.0  # decoders differ in IDCT/upsampling; boxes and flips must not


def test_gpu_path_names_the_bad_image(records):
    jpegs = [torch.frombuffer(bytearray(records.view(i)), dtype=torch.uint8) for i in range(3)]
    jpegs[1] = torch.zeros(500, dtype=torch.uint8)
    with pytest.raises(gpu_decode.BatchDecodeError) as raised:
        gpu_decode.decode_crop_batch_gpu(jpegs, [(0, 0, 40, 40)] * 3, [False] * 3, (32, 32), "cpu")
    assert raised.value.position == 1
    assert gpu_decode.decode_crop_batch_gpu([], [], [], (32, 48), "cpu").shape == (0, 3, 32, 48)


def test_grayscale_decodes_to_rgb_and_cmyk_is_refused(backend):
    """A grayscale JPEG gives three equal channels; a CMYK one (prep converts those) is an
    error for that image, never garbage pixels (PIL, without libturbojpeg, converts it)."""
    import io

    gray = (np.random.RandomState(0).rand(60, 80) * 255).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(gray, "L").save(encoded, "JPEG", quality=90)
    cmyk = io.BytesIO()
    Image.fromarray(np.full((60, 80, 4), 40, np.uint8), "CMYK").save(cmyk, "JPEG")
    out = np.zeros((2, 32, 32, 3), np.uint8)
    sizes, boxes = np.array([60, 60]), np.array([[5, 5, 50, 60]] * 2)
    failure = decode.decode_crops_into(
        out,
        [encoded.getvalue(), cmyk.getvalue()],
        sizes,
        np.array([80, 80]),
        boxes,
        np.array([True, False]),
    )
    if backend == "python" and jpeg.turbo() is None:
        assert (
            failure is None and np.abs(out[1].astype(int) - out[1, 0, 0]).max() <= 2
        )  # a flat colour
    else:
        assert failure is not None and failure[0] == 1
    assert (out[0, ..., 0] == out[0, ..., 2]).all() and out[0].std() > 10
