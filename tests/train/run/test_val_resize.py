"""The phase key val_resize_size reaches the validation loader's center crop: torchvision's
Resize(232) + CenterCrop(224) (its v2 recipe's eval), not crop / 0.875."""

from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms

from tests.loader_shards import dataset_dir
from tests.train.data.test_crops import crop_then_resize, mean_abs_diff, smooth_image
from tests.train.data.test_loaders import batches_of, expected_image
from train.data.crops import center_crop_box, resize_center_crop_box
from train.data.loaders import ValLoader
from train.data.samplers import center_val_batches, val_plans
from train.plan.dry_run import epoch_rows, format_table
from train.plan.rebuilds import loader_changes, loader_settings
from train.plan.schedule import Schedule

PHASE = {"prep_size": 256, "crop_size": 176, "batch_size": 8, "lr": 0.1}


def schedule(*phases) -> Schedule:
    return Schedule.from_dicts(list(phases))


def test_a_phase_of_232_to_224_crops_as_torchvision_does() -> None:
    tv_v2 = schedule({**PHASE, "epochs": [0, 1], "val_crop_size": 224, "val_resize_size": 232})
    settings = loader_settings(tv_v2, 0)
    assert (settings.val_crop_size, settings.val_resize_size) == (224, 232)
    reference = transforms.Compose([transforms.Resize(232), transforms.CenterCrop(224)])
    sizes = [(256, 341), (341, 256), (256, 256), (300, 259), (256, 600)]
    heights, widths = np.array([h for h, _ in sizes]), np.array([w for _, w in sizes])
    (plan,) = val_plans(center_val_batches(len(sizes), 8), 224, False, settings.val_resize_size)
    boxes, flips = plan.boxes_and_flips(heights, widths)
    assert not flips.any()
    for index, (height, width) in enumerate(sizes):
        image = smooth_image(height, width, seed=index)
        ours = crop_then_resize(image, tuple(int(v) for v in boxes[index]), 224, 224)
        assert mean_abs_diff(ours, reference(image)) < 3, (height, width, boxes[index])
        # the default (224 / 0.875 = 256) is another, larger box: the key is not ignored
        assert tuple(boxes[index]) != center_crop_box(height, width, 224)


def test_default_resize_is_crop_over_0875_and_a_change_is_in_place() -> None:
    two = schedule(
        {**PHASE, "epochs": [0, 1], "val_crop_size": 224},
        {**PHASE, "epochs": [1, 2], "val_crop_size": 224, "val_resize_size": 232},
    )
    assert [loader_settings(two, e).val_resize_size for e in (0, 1)] == [256, 232]
    change = loader_changes(two, 1)
    assert not change.rebuild_val and change.in_place == ("val_resize_size",)
    rows = epoch_rows(two)
    assert [r.val_resize_size for r in rows] == [256, 232]
    header, first, second = format_table(rows).splitlines()
    column = header.split().index("val_resize")
    assert first.split()[column] == "256" and second.split()[column] == "232"


def test_the_loader_crops_the_stored_image_with_the_resize_it_is_given(built_shards) -> None:
    loader = ValLoader(dataset_dir(built_shards, "lmdb", "val"), 5, 64, workers=0, resize_size=96)
    images = torch.cat([images for images, _ in batches_of(loader)])
    records, differs = loader.records, 0
    for index in range(len(records)):
        height, width = int(records.heights[index]), int(records.widths[index])
        box = resize_center_crop_box(height, width, 96, 64, 64)
        assert torch.equal(images[index], expected_image(records, index, box, 64, 64))
        differs += box != center_crop_box(height, width, 64)
    assert differs == len(records)
    loader.set_crop_size(64)  # back to the default resize, 64 / 0.875 = 73
    again = torch.cat([images for images, _ in batches_of(loader)])
    height, width = int(records.heights[0]), int(records.widths[0])
    box = center_crop_box(height, width, 64)
    assert torch.equal(again[0], expected_image(records, 0, box, 64, 64))
    loader.close()
