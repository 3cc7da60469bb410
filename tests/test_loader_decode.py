"""train.decode: the fused decode-to-crop against PIL references, the DCT-scaled path, flips,
record-table checks, and the GPU (nvJPEG) path's logic, run on CPU here and on CUDA when present."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

import train.decode as decode
import train.gpu_decode as gpu_decode
from formats import jpeg
from formats.dataset import RecordDataset
from train.augment import TrainCrop, center_crop_box
from tests.loader_shards import dataset_dir


@pytest.fixture(scope="module")
def records(built_shards):
    return RecordDataset(dataset_dir(built_shards))


def pil_reference(data, box, out_height, out_width):
    """torchvision's RandomResizedCrop on PIL: full-size decode, crop, antialiased bilinear resize."""
    top, left, height, width = box
    image = Image.fromarray(decode.decode_rgb(data)).crop((left, top, left + width, top + height))
    resized = image.resize((out_width, out_height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def decoded(records, index, box, out_height, out_width, flip=False):
    out = torch.empty((3, out_height, out_width), dtype=torch.uint8)
    decode.decode_crop_into(out, records.view(index), int(records.heights[index]), int(records.widths[index]), box, flip)
    return out


def test_crops_match_pil(records):
    """Full-scale decodes (torch's resize) match PIL's crop + resize to +-2; DCT-scaled ones (PIL's resize of a
    1/2..1/8 decode) differ from a full-size reference only by the decoder's downscale."""
    rng = random.Random(0)
    num_scaled = 0
    for index in range(len(records)):
        height, width = int(records.heights[index]), int(records.widths[index])
        for crop_size in (48, 64, 128, 224):
            box = TrainCrop(crop_size).box(height, width, rng)
            ours = decoded(records, index, box, crop_size, crop_size).int()
            reference = pil_reference(records.view(index), box, crop_size, crop_size).int()
            difference = (ours - reference).abs()
            if decode.decode_scale(box, crop_size, crop_size) == (1, 1):
                assert difference.max() <= 2 and difference.float().mean() < 0.3, (index, box, crop_size)
            else:  # same place: closer to the reference than the box moved by 2 px (libturbojpeg only)
                num_scaled += 1
                assert difference.float().mean() < 8, (index, box, crop_size)  # textured samples
                top, left, box_height, box_width = box
                moved = (min(top + 2, height - box_height), min(left + 2, width - box_width), box_height, box_width)
                if moved != box:
                    moved_reference = pil_reference(records.view(index), moved, crop_size, crop_size).int()
                    assert difference.float().mean() < (ours - moved_reference).abs().float().mean()
    assert num_scaled > 0 or jpeg.turbo() is None  # without it (SHARDTRAIN_NO_TURBOJPEG=1) PIL decodes in full


def test_flip_mirrors_exactly(records):
    box = (10, 20, 100, 120)
    assert torch.equal(decoded(records, 0, box, 64, 80, flip=True), decoded(records, 0, box, 64, 80).flip(-1))


@pytest.mark.skipif(jpeg.turbo() is None, reason="DCT-scaled decodes need libturbojpeg")
def test_large_box_decodes_at_reduced_dct_scale(records, monkeypatch):
    scales = []
    real = decode.decode_rgb
    monkeypatch.setattr(decode, "decode_rgb", lambda data, scale=(1, 1): scales.append(scale) or real(data, scale))
    index = 0  # 160 x 213
    box = center_crop_box(160, 213, 32)  # ~ 140 px box -> 32 px: 1/4 still covers it
    ours = decoded(records, index, box, 32, 32).int()
    assert scales == [(1, 4)]
    reference = pil_reference(records.view(index), box, 32, 32).int()
    assert (ours - reference).abs().float().mean() < 3


def test_upscaled_crop_of_a_small_record(records):
    index = int(np.argmin(records.heights))  # the 48 px sample image
    box = (0, 0, int(records.heights[index]), int(records.widths[index]))
    ours = decoded(records, index, box, 96, 128)
    assert ours.shape == (3, 96, 128)
    assert (ours.int() - pil_reference(records.view(index), box, 96, 128).int()).abs().max() <= 2


def test_size_mismatch_with_the_record_table_raises(records):
    out = torch.empty((3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match="record table says 100x100"):
        decode.decode_crop_into(out, records.view(0), 100, 100, (0, 0, 50, 50))


def test_pil_fallback_without_libturbojpeg(records, monkeypatch):
    monkeypatch.setattr(decode.jpeg, "turbo", lambda: None)
    box = (0, 0, 150, 150)
    ours = decoded(records, 0, box, 32, 32)  # no DCT scaling without turbo
    monkeypatch.undo()
    assert (ours.int() - decoded(records, 0, box, 32, 32).int()).abs().float().mean() < 3


def gpu_batch(records, device):
    rng = random.Random(1)
    indices = list(range(len(records)))
    boxes = [TrainCrop(64).box(int(records.heights[i]), int(records.widths[i]), rng) for i in indices]
    flips = [i % 2 == 1 for i in indices]
    jpegs = [torch.frombuffer(bytearray(records.view(i)), dtype=torch.uint8) for i in indices]
    sizes = [(int(records.heights[i]), int(records.widths[i])) for i in indices]
    images = gpu_decode.decode_crop_batch_gpu(jpegs, boxes, flips, (64, 64), device, sizes)
    expected = torch.stack([decoded(records, i, boxes[i], 64, 64, flips[i]) for i in indices])
    return images, expected


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gpu_path_matches_the_cpu_path(records, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    images, expected = gpu_batch(records, device)
    assert images.dtype == torch.uint8 and images.device.type == device and images.shape == (18, 3, 64, 64)
    difference = (images.cpu().int() - expected.int()).abs().float()
    assert difference.mean() < 2.0  # decoders differ in IDCT/upsampling; boxes and flips must not


def test_gpu_path_names_the_bad_image(records):
    jpegs = [torch.frombuffer(bytearray(records.view(i)), dtype=torch.uint8) for i in range(3)]
    jpegs[1] = torch.zeros(500, dtype=torch.uint8)
    with pytest.raises(gpu_decode.BatchDecodeError) as raised:
        gpu_decode.decode_crop_batch_gpu(jpegs, [(0, 0, 40, 40)] * 3, [False] * 3, (32, 32), "cpu")
    assert raised.value.position == 1
    assert gpu_decode.decode_crop_batch_gpu([], [], [], (32, 48), "cpu").shape == (0, 3, 32, 48)
