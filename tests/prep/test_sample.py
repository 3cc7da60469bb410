"""prep.sample.archives: the procedural dataset looks exactly like ILSVRC2012's archives, quirks
included."""

import gzip
import io
import re
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from prep.sample.archives import DEVKIT_DIR, class_words, write_sample

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REAL_META_FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(
        tmp_path_factory.mktemp("sample"), num_classes=4, train_per_class=5, val_per_class=3
    )


def read_train(info) -> dict[str, dict[str, bytes]]:
    """{outer member: {inner member: bytes}}, in archive order."""
    classes = {}
    with tarfile.open(info.train_tar_path) as outer:
        for class_member in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(class_member)) as inner:
                classes[class_member.name] = {
                    m.name: inner.extractfile(m).read() for m in inner.getmembers()
                }
    return classes


def read_val(info) -> dict[str, bytes]:
    with tarfile.open(info.val_tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def read_devkit(info) -> tuple[np.ndarray, list[int]]:
    """(synsets as loadmat squeezes them, ground-truth ILSVRC2012_IDs in val order)."""
    with tarfile.open(info.devkit_path) as tar:
        synsets = scipy.io.loadmat(tar.extractfile(f"{DEVKIT_DIR}/data/meta.mat"), squeeze_me=True)[
            "synsets"
        ]
        text = (
            tar.extractfile(f"{DEVKIT_DIR}/data/ILSVRC2012_validation_ground_truth.txt")
            .read()
            .decode()
        )
    return synsets, [int(line) for line in text.splitlines()]


def leaf_id_to_wnid(synsets) -> dict[int, str]:
    """torchvision's recipe (datasets.imagenet.parse_meta_mat), without torch."""
    nums_children = list(zip(*synsets))[4]
    leaves = [synsets[i] for i, n in enumerate(nums_children) if n == 0]
    idcs, wnids, _classes = list(zip(*leaves))[:3]
    return dict(zip(idcs, wnids))


def test_train_tar_is_a_tar_of_flat_class_tars(sample):
    classes = read_train(sample)
    assert list(classes) == [f"{wnid}.tar" for wnid in sample.wnids]
    assert list(sample.wnids) == sorted(sample.wnids)
    for wnid in sample.wnids:
        names = list(classes[f"{wnid}.tar"])
        assert len(names) == sample.train_per_class == len(set(names))
        assert all(re.fullmatch(rf"{wnid}_\d+\.JPEG", name) for name in names), names


def test_val_tar_is_flat_and_numbered_from_one(sample):
    names = list(read_val(sample))
    assert names == [
        f"ILSVRC2012_val_{i:08d}.JPEG"
        for i in range(1, sample.num_classes * sample.val_per_class + 1)
    ]
    assert len(sample.val_labels) == len(names)
    assert sorted(np.bincount(sample.val_labels)) == [sample.val_per_class] * sample.num_classes
    assert list(sample.val_labels) != sorted(sample.val_labels), "val classes must be interleaved"


def test_val_ground_truth_maps_through_meta_mat_to_each_image_class(sample):
    synsets, ground_truth = read_devkit(sample)
    id_to_wnid = leaf_id_to_wnid(synsets)
    assert len(ground_truth) == len(sample.val_labels)
    assert [id_to_wnid[i] for i in ground_truth] == [
        sample.wnids[label] for label in sample.val_labels
    ]


def test_devkit_ids_are_a_permutation_that_is_not_sorted_wnid_order(sample):
    synsets, _ = read_devkit(sample)
    id_to_wnid = leaf_id_to_wnid(synsets)
    num_classes = sample.num_classes
    assert sorted(sample.ilsvrc_ids) == list(range(1, num_classes + 1))
    assert sample.ilsvrc_ids != tuple(range(1, num_classes + 1))
    assert [id_to_wnid[i] for i in sample.ilsvrc_ids] == list(sample.wnids)
    assert [id_to_wnid[i] for i in range(1, num_classes + 1)] != sorted(sample.wnids)


def test_meta_mat_has_the_real_fields_and_a_hierarchy_above_the_leaves(sample):
    synsets, _ = read_devkit(sample)
    assert synsets.dtype.names == REAL_META_FIELDS
    ids = [int(s["ILSVRC2012_ID"]) for s in synsets]
    assert ids == list(range(1, len(synsets) + 1))
    parents = [s for s in synsets if s["num_children"] > 0]
    assert parents and all(int(s["ILSVRC2012_ID"]) > sample.num_classes for s in parents)
    covered = {int(c) for s in parents for c in np.atleast_1d(s["children"])}
    assert set(range(1, sample.num_classes + 1)) <= covered
    assert all(re.fullmatch(r"n\d{8}", s["WNID"]) for s in synsets)
    names = {s["WNID"]: s["words"].split(", ")[0] for s in synsets if s["num_children"] == 0}
    assert [names[w] for w in sample.wnids] == list(sample.class_names)


@pytest.mark.slow  # importing torch takes seconds; the test itself is fast
def test_torchvision_parses_the_devkit(sample, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    import torch
    from torchvision.datasets import imagenet

    (tmp_path / sample.devkit_path.name).write_bytes(sample.devkit_path.read_bytes())
    monkeypatch.setattr(imagenet, "_verify_archive", lambda *args: None)  # it checks the real md5
    imagenet.parse_devkit_archive(str(tmp_path))
    wnid_to_classes, val_wnids = torch.load(tmp_path / imagenet.META_FILE, weights_only=True)
    assert sorted(wnid_to_classes) == list(sample.wnids)
    assert [wnid_to_classes[w][0] for w in sample.wnids] == list(sample.class_names)
    assert val_wnids == [sample.wnids[label] for label in sample.val_labels]


def test_quirk_files_are_what_their_names_say(sample):
    train = {
        name: data for members in read_train(sample).values() for name, data in members.items()
    }
    val = read_val(sample)
    assert Image.open(io.BytesIO(train[sample.gray_train_name])).mode == "L"
    assert Image.open(io.BytesIO(train[sample.cmyk_train_name])).mode == "CMYK"
    png = train[sample.png_train_name]
    assert sample.png_train_name.endswith(".JPEG") and png.startswith(PNG_MAGIC)
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert Image.open(io.BytesIO(val[sample.gray_val_name])).mode == "L"
    quirks = {
        sample.gray_train_name,
        sample.cmyk_train_name,
        sample.png_train_name,
        sample.gray_val_name,
    }
    for name, data in {**train, **val}.items():
        if name not in quirks:
            image = Image.open(io.BytesIO(data))
            assert (image.format, image.mode) == ("JPEG", "RGB"), name


def test_sizes_include_landscape_portrait_large_and_tiny(sample):
    datas = [d for members in read_train(sample).values() for d in members.values()] + list(
        read_val(sample).values()
    )
    sizes = [Image.open(io.BytesIO(d)).size for d in datas]  # (width, height)
    assert sum(w > h for w, h in sizes) > len(sizes) / 2
    assert any(h > w for w, h in sizes)
    assert any(min(w, h) < 100 for w, h in sizes)
    assert any(max(w, h) > 500 for w, h in sizes)


def test_val_images_look_like_train_images_of_their_class(sample):
    """Nearest class colour (chromaticity, so brightness jitter cancels) must recover the labels."""

    def chroma(data: bytes) -> np.ndarray:
        rgb = (
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)
            .reshape(-1, 3)
            .mean(0)
        )
        return rgb / rgb.sum()

    train = read_train(sample)
    centroids = np.stack(
        [np.mean([chroma(d) for d in train[f"{w}.tar"].values()], 0) for w in sample.wnids]
    )
    val = read_val(sample)
    correct = [
        np.argmin(np.linalg.norm(centroids - chroma(data), axis=1)) == label
        for (name, data), label in zip(val.items(), sample.val_labels)
        if name != sample.gray_val_name
    ]
    assert np.mean(correct) >= 0.8


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kwargs = dict(num_classes=3, train_per_class=2, val_per_class=2)
    first = write_sample(tmp_path / "a", seed=7, **kwargs)
    again = write_sample(tmp_path / "b", seed=7, **kwargs)
    other = write_sample(tmp_path / "c", seed=8, **kwargs)
    for attr in ("train_tar_path", "val_tar_path", "devkit_path"):
        assert getattr(first, attr).read_bytes() == getattr(again, attr).read_bytes(), attr
    assert first.train_tar_path.read_bytes() != other.train_tar_path.read_bytes()
    assert first.val_tar_path.read_bytes() != other.val_tar_path.read_bytes()
    assert first.wnids == other.wnids and first.ilsvrc_ids == other.ilsvrc_ids


def test_archives_carry_no_clock_or_owner(tmp_path):
    """Runs within one second match anyway, so check directly that no time or user leaks in."""
    info = write_sample(tmp_path, num_classes=2, train_per_class=2, val_per_class=1)
    gz = info.devkit_path.read_bytes()
    assert gz[4:8] == bytes(4) and not gz[3] & 0x08  # gzip mtime 0, no file name
    tar_files = [
        info.train_tar_path.open("rb"),
        info.val_tar_path.open("rb"),
        gzip.open(info.devkit_path),
    ]
    with tarfile.open(info.train_tar_path) as outer:
        tar_files += [io.BytesIO(outer.extractfile(m).read()) for m in outer.getmembers()]
    headers = set()
    for tar_file in tar_files:
        with tar_file, tarfile.open(fileobj=tar_file) as tar:
            headers |= {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()}
    assert len(headers) == 1 and next(iter(headers))[1:] == (0, 0, "", "")
    with tarfile.open(info.devkit_path) as tar:
        assert b"Created on" not in tar.extractfile(f"{DEVKIT_DIR}/data/meta.mat").read()[:116]


def test_creates_out_dir_and_leaves_no_temp_files(tmp_path):
    out_dir = tmp_path / "nested" / "sample"
    write_sample(out_dir, num_classes=2, train_per_class=2, val_per_class=1)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "ILSVRC2012_devkit_t12.tar.gz",
        "ILSVRC2012_img_train.tar",
        "ILSVRC2012_img_val.tar",
    ]


def test_rejects_counts_that_cannot_hold_the_quirks(tmp_path):
    with pytest.raises(ValueError):
        write_sample(tmp_path, num_classes=1)
    with pytest.raises(ValueError):
        write_sample(tmp_path, num_classes=2, train_per_class=1)
    assert not any(tmp_path.iterdir())


def test_more_classes_than_imagenette_still_map_through_the_devkit(tmp_path):
    info = write_sample(tmp_path, num_classes=12, train_per_class=1, val_per_class=1)
    synsets, ground_truth = read_devkit(info)
    id_to_wnid = leaf_id_to_wnid(synsets)
    assert len(id_to_wnid) == 12 and len(read_train(info)) == 12
    assert [id_to_wnid[i] for i in ground_truth] == [info.wnids[label] for label in info.val_labels]


def test_class_words_use_imagenette_then_plausible_made_up_synsets():
    assert class_words(2) == [
        ("n01440764", "tench, Tinca tinca"),
        ("n02102040", "English springer, English springer spaniel"),
    ]
    many = class_words(120)
    wnids = [wnid for wnid, _ in many]
    assert wnids == sorted(set(wnids)) and len(wnids) == 120
    assert all(re.fullmatch(r"n\d{8}", wnid) for wnid in wnids)
    assert {wnid for wnid, _ in class_words(10)} <= set(wnids)
    assert len({words for _, words in many}) == 120
    assert class_words(120) == many
