"""The peer loaders' side of bench/loader_peers.py: runs under the PEER venv's python
(bench/setup_peers.sh), imports FFCV or DALI and nothing of ours.

  peers_runner.py write-ffcv --inputs DIR --out FILE.beton [--workers 2]
  peers_runner.py serve --loader {ffcv,ffcv-contiguous,dali} --data PATH --crop-size 128 ...

Inputs (written by loader_peers.py from our shards): DIR/images/NNNNNNN.jpg are our stored
records' JPEG bytes, unchanged; DIR/file_list.txt holds `images/NNNNNNN.jpg label` lines.

FFCV's format: its DatasetWriter, RGBImageField(write_mode="jpg", jpeg_quality=90,
max_resolution=None), fed the decoded pixels of those records, so every image keeps exactly
the (height, width) ours reads (shorter side = prep_size; max_resolution=None leaves sizes alone,
which equals max_resolution = each image's own long side) and is re-encoded by FFCV's encoder
(cv2.imencode) at q90. DALI reads the records' JPEG files themselves (fn.readers.file).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import window_server  # noqa: E402  (bench/window_server.py)

WARMUP_BATCHES = 8  # numba compiles FFCV's pipeline on the first batch


def read_file_list(inputs: Path) -> list[tuple[Path, int]]:
    entries = []
    for line in (inputs / "file_list.txt").read_text().splitlines():
        name, label = line.rsplit(" ", 1)
        entries.append((inputs / name, int(label)))
    return entries


class RecordPixels:
    """An indexed dataset for FFCV's writer: (RGB uint8 HWC, label) per record."""

    def __init__(self, entries):
        self.entries = entries

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        import cv2
        import numpy as np

        path, label = self.entries[index]
        bgr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), label


def write_ffcv(inputs: Path, out: Path, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    partial = out.with_name(out.name + ".partial")
    writer = DatasetWriter(
        str(partial),
        {
            "image": RGBImageField(write_mode="jpg", max_resolution=None, jpeg_quality=90),
            "label": IntField(),
        },
        num_workers=workers,
    )
    writer.from_indexed_dataset(RecordPixels(read_file_list(inputs)))
    partial.replace(out)


def ffcv_batches(args, contiguous: bool):
    """FFCV's ImageNet recipe pipeline, uint8 out: RandomResizedCrop decoder + flip, then its
    default ToTorchImage (NCHW view of NHWC memory) or ToTorchImage(channels_last=False)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    image_pipeline = [
        RandomResizedCropRGBImageDecoder((args.crop_size, args.crop_size)),
        RandomHorizontalFlip(),
        ToTensor(),
        ToTorchImage(channels_last=not contiguous),
    ]
    loader = Loader(
        str(args.data),
        batch_size=args.batch_size,
        num_workers=args.workers,
        order=OrderOption.RANDOM,
        drop_last=True,
        os_cache=True,
        seed=args.seed,
        pipelines={"image": image_pipeline, "label": [IntDecoder(), ToTensor(), Squeeze()]},
    )
    for _epoch in itertools.count():  # epoch after epoch, as a training loop iterates it
        for images, labels in loader:
            yield images, labels


def dali_batches(args):
    """DALI's CPU pipeline (device_id=None): file reader, fused random-crop decode
    (libjpeg-turbo ROI decode), antialiased resize, flip; uint8 NHWC batches to torch."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(
        batch_size=args.batch_size, num_threads=args.workers, device_id=None, seed=args.seed
    )
    def pipeline():
        jpegs, labels = fn.readers.file(
            file_root=str(args.data),
            file_list=str(args.data / "file_list.txt"),
            random_shuffle=True,
            name="reader",
        )
        images = fn.decoders.image_random_crop(
            jpegs,
            device="cpu",
            output_type=types.RGB,
            random_area=[0.08, 1.0],
            random_aspect_ratio=[0.75, 4 / 3],
        )
        images = fn.resize(images, resize_x=args.crop_size, resize_y=args.crop_size, antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        return images, labels

    pipe = pipeline()
    pipe.build()
    iterator = DALIGenericIterator(
        [pipe],
        ["images", "labels"],
        reader_name="reader",
        last_batch_policy=LastBatchPolicy.DROP,
        auto_reset=True,
    )
    while True:
        for batch in iterator:
            yield batch[0]["images"], batch[0]["labels"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write-ffcv")
    write.add_argument("--inputs", type=Path, required=True)
    write.add_argument("--out", type=Path, required=True)
    write.add_argument("--workers", type=int, default=2)
    serve = sub.add_parser("serve")
    serve.add_argument("--loader", choices=("ffcv", "ffcv-contiguous", "dali"), required=True)
    serve.add_argument(
        "--data", type=Path, required=True, help=".beton (FFCV) or an inputs dir (DALI)"
    )
    serve.add_argument("--crop-size", type=int, default=128)
    serve.add_argument("--batch-size", type=int, default=128)
    serve.add_argument("--workers", type=int, default=2)
    serve.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "write-ffcv":
        write_ffcv(args.inputs, args.out, args.workers)
        return 0
    import importlib.metadata as metadata

    if args.loader == "dali":
        facts = {
            "library": f"nvidia-dali {metadata.version('nvidia-dali-cuda120')}",
            "threads": args.workers,
        }
        return window_server.serve(lambda: dali_batches(args), facts, WARMUP_BATCHES)
    facts = {"library": f"ffcv {metadata.version('ffcv')}", "threads": args.workers}
    return window_server.serve(
        lambda: ffcv_batches(args, args.loader == "ffcv-contiguous"), facts, WARMUP_BATCHES
    )


if __name__ == "__main__":
    sys.exit(main())
