"""What releases the GIL, and what scales on this machine: one per-image operation run by 1 or 2
threads of one process, or by 1 or 2 processes, over the same records (issue 10's questions a-c).

    python bench/prototypes/probe.py [--data DIR] [--crop-size 128] [--seconds 3] [--ops a,b]

Per op and mode: img/s (all workers together), img/CPU-s, and the scaling of 2 workers over 1.
An op whose C part holds the GIL scales ~1x in threads and ~2x in processes; one that releases
it scales alike in both. Ops:
  decode-pyturbojpeg  PyTurboJPEG 1.8.3 decode (handle per call, new array)
  decode-ctypes       tjDecompress2 via ctypes into a preallocated buffer, reused handle
  resize-torch        torch uint8 antialiased interpolate of the crop (1 intra-op thread)
  resize-pil          PIL resize(box=...) of an RGBX image mapped over the decoded buffer
  crop-pil            the prototype's whole per-image step (decode + resize + flip + copy), PIL
  crop-torch          the same with torch's resize
  batch-alloc         a new (pinned if CUDA) NHWC batch per 128 images vs `ring` reuse (c)
  nchw-copy           NHWC slot -> contiguous NCHW copy per batch, per image (c)
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from prototypes import tjdecode  # noqa: E402
from prototypes.crop_decode import CropDecoder, keep_freed_memory  # noqa: E402
from train.augment import TrainCrop  # noqa: E402

OPS = ("decode-pyturbojpeg", "decode-ctypes", "resize-torch", "resize-pil", "crop-pil", "crop-torch",
       "batch-alloc", "batch-ring", "nchw-copy")
_records: dict = {}


def load(data_dir: Path, crop_size: int) -> dict:
    from formats.dataset import RecordDataset
    from formats.lmdb_store import release_env

    records = RecordDataset(data_dir)
    datas = [bytes(records.view(i)) for i in range(len(records))]
    heights, widths = records.heights.tolist(), records.widths.tolist()
    records.close()
    release_env(data_dir)
    crop, rng = TrainCrop(crop_size), random.Random(0)
    boxes = [crop.box(h, w, rng) for h, w in zip(heights, widths)]
    flips = [rng.random() < 0.5 for _ in datas]
    decoded = [tjdecode.decode(data) for data in datas]  # for the resize-only ops
    return {"datas": datas, "heights": heights, "widths": widths, "boxes": boxes, "flips": flips,
            "decoded": decoded, "crop_size": crop_size}


def make_op(name: str, rec: dict):
    """A function of a record index doing one image's work of op `name` (thread-local state inside)."""
    size, n = rec["crop_size"], len(rec["datas"])
    if name == "decode-pyturbojpeg":
        from formats import jpeg
        turbo = jpeg.turbo()
        return lambda i: turbo.decode(rec["datas"][i], pixel_format=0)
    if name == "decode-ctypes":
        decoder, buffer = tjdecode.Decompressor(), np.empty(max(h * w for h, w in zip(rec["heights"], rec["widths"])) * 3, np.uint8)
        addresses = [tjdecode.address_of(d) for d in rec["datas"]]
        def decode(i):
            w, h = rec["widths"][i], rec["heights"][i]
            decoder.decode_into(*addresses[i], buffer.ctypes.data, w, w * 3, h)
        return decode
    if name == "resize-torch":
        def resize_torch(i):
            t, l, h, w = rec["boxes"][i]
            x = torch.from_numpy(rec["decoded"][i]).permute(2, 0, 1)[None, :, t:t + h, l:l + w]
            return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return resize_torch
    if name == "resize-pil":
        images = [Image.fromarray(a).convert("RGBX") for a in rec["decoded"]]
        def resize_pil(i):
            t, l, h, w = rec["boxes"][i]
            return images[i].resize((size, size), Image.Resampling.BILINEAR, box=(l, t, l + w, t + h))
        return resize_pil
    if name in ("crop-pil", "crop-torch"):
        decoder = CropDecoder(max(h * w for h, w in zip(rec["heights"], rec["widths"])), name.split("-")[1])
        slot = np.empty((size, size, 3), np.uint8)
        return lambda i: decoder.into(slot, rec["datas"][i], rec["heights"][i], rec["widths"][i], rec["boxes"][i],
                                      rec["flips"][i])
    pin = torch.cuda.is_available()
    ring = torch.empty((128, size, size, 3), dtype=torch.uint8, pin_memory=pin)
    if name == "batch-alloc":  # per image: 1/128 of a fresh batch, first-touched
        return lambda i: torch.empty((128, size, size, 3), dtype=torch.uint8, pin_memory=pin).fill_(1) if i % 128 == 0 else None
    if name == "batch-ring":
        return lambda i: ring.fill_(1) if i % 128 == 0 else None
    if name == "nchw-copy":
        out = torch.empty((128, 3, size, size), dtype=torch.uint8)
        return lambda i: out.copy_(ring.permute(0, 3, 1, 2)) if i % 128 == 0 else None
    raise ValueError(name)


def run_worker(args) -> tuple[int, float]:
    """(images done, CPU seconds of this worker) for `seconds` of op in this thread."""
    name, seconds, start, result, slot = args
    torch.set_num_threads(1)
    op = make_op(name, _records)
    n = len(_records["datas"])
    for i in range(32):
        op(i % n)
    start.wait()
    cpu_started, deadline, done = time.thread_time(), time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        for i in range(64):
            op((done + i) % n)
        done += 64
    result[slot] = (done, time.thread_time() - cpu_started)
    return result[slot]


def measure(name: str, workers: int, mode: str, seconds: float) -> dict:
    if mode == "threads":
        start, result = threading.Barrier(workers), [None] * workers
        threads = [threading.Thread(target=run_worker, args=((name, seconds, start, result, s),)) for s in range(workers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall, rows = time.perf_counter() - started, result
    else:
        ctx = get_context("fork")  # the children inherit the loaded records and the barrier
        start, queue = ctx.Barrier(workers), ctx.SimpleQueue()
        processes = [ctx.Process(target=_process_worker, args=(name, seconds, start, queue)) for _ in range(workers)]
        started = time.perf_counter()
        for process in processes:
            process.start()
        rows = [queue.get() for _ in processes]
        for process in processes:
            process.join()
        wall = time.perf_counter() - started
    images, cpu = sum(r[0] for r in rows), sum(r[1] for r in rows)
    return {"img_per_s": images / seconds, "img_per_cpu_s": images / max(cpu, 1e-9), "wall": wall}


def _process_worker(name, seconds, start, queue) -> None:
    queue.put(run_worker((name, seconds, start, [None], 0)))


def gil_ops() -> dict:
    """Ops on LARGE inputs (tens of ms per call), for `gil_check`."""
    from formats import jpeg

    big = np.random.default_rng(0).integers(0, 255, (6000, 8000, 3), dtype=np.uint8)
    big[:, :4000] //= 3  # some structure, so the JPEG is not pure noise
    data = jpeg.encode_jpeg(big, 90)
    buffer = np.empty(big.size, np.uint8)
    decompressor = tjdecode.Decompressor()
    address, size = tjdecode.address_of(data)
    turbo = jpeg.turbo()
    image = Image.fromarray(big).convert("RGBX")
    tensor = torch.from_numpy(big).permute(2, 0, 1)[None]
    stack = tensor.expand(6, -1, -1, -1).contiguous()  # ~0.9 GB: one copy or flip takes ~100 ms
    target = torch.empty_like(stack)
    return {
        "decode-pyturbojpeg": lambda: turbo.decode(data, pixel_format=0),
        "decode-ctypes": lambda: decompressor.decode_into(address, size, buffer.ctypes.data, 8000, 24000, 6000),
        "resize-pil": lambda: image.resize((7000, 5000), Image.Resampling.BILINEAR),
        "transpose-pil": lambda: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "tobytes-pil": lambda: image.tobytes("raw", "RGB"),
        "resize-torch-1thread": lambda: F.interpolate(tensor, size=(5000, 7000), mode="bilinear", antialias=True),
        "copy-torch": lambda: target.copy_(stack),
        "flip-torch": lambda: stack.flip(-1),
        "copy-numpy": lambda: np.copyto(target.numpy(), stack.numpy()),
        "strided-copy-numpy": lambda: np.copyto(buffer.reshape(big.shape)[:, ::-1], big),
    }


def gil_check(op, repeats: int = 3) -> tuple[float, float]:
    """(ms per call, longest stall in ms of a pure-Python loop in the main thread while another
    thread runs `op`): a stall near the call's length means the op holds the GIL throughout;
    one far shorter means it runs without it (what's left is the OS and the switch interval).
    Calls are made ~50-500 ms long (`gil_ops`), far above that ~10 ms background."""
    torch.set_num_threads(1)
    op()
    started = time.perf_counter()
    for _ in range(repeats):
        op()
    call_ms = (time.perf_counter() - started) / repeats * 1000
    done = threading.Event()

    def run():
        for _ in range(repeats):
            op()
        done.set()

    thread = threading.Thread(target=run)
    last, stall = time.perf_counter(), 0.0
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        stall, last = max(stall, now - last), now
    thread.join()
    return call_ms, stall * 1000


def breakdown(rec: dict) -> dict[str, float]:
    """CPU microseconds per image of each step of the prototype's "pil" path, one thread."""
    from prototypes.crop_decode import TJPF_RGBX, dct_scale
    from train.augment import scaled_image_size

    size, n = rec["crop_size"], len(rec["datas"])
    scratch = np.empty(max(h * w for h, w in zip(rec["heights"], rec["widths"])) * 4, np.uint8)
    decompressor, mapped, slot = tjdecode.Decompressor(), {}, np.empty((size, size, 3), np.uint8)
    lib, crop = decompressor.lib, TrainCrop(size)
    totals: dict[str, float] = {}
    clock = time.thread_time

    def tick(step, since):
        now = clock()
        totals[step] = totals.get(step, 0.0) + now - since
        return now

    for _pass in range(2):
        totals.clear()
        for i in range(n):
            t = clock()
            height, width = rec["heights"][i], rec["widths"][i]
            box = crop.box(height, width, random.Random(i))
            flip = random.Random(i).random() < 0.5
            t = tick("box+flip draw (random.Random per sample)", t)
            num, den = dct_scale(box[2], box[3], size, size)
            scaled_height, scaled_width = scaled_image_size(height, width, num, den)
            t = tick("DCT scale + scaled size", t)
            address, nbytes = tjdecode.address_of(rec["datas"][i])
            t = tick("buffer address (np.frombuffer)", t)
            lib.tjDecompress2(decompressor.handle, address, nbytes, scratch.ctypes.data, scaled_width,
                              scaled_width * 4, scaled_height, TJPF_RGBX, tjdecode.TJFLAG_NOREALLOC)
            t = tick("decode RGBX (tjDecompress2)", t)
            image = mapped.get((scaled_width, scaled_height))
            if image is None:
                image = mapped[scaled_width, scaled_height] = Image.frombuffer(
                    "RGBX", (scaled_width, scaled_height), scratch, "raw", "RGBX", 0, 1)
            t = tick("PIL view of the scratch (cached)", t)
            top, left, box_height, box_width = box
            resized = image.resize((size, size), Image.Resampling.BILINEAR,
                                   box=(left, top, left + box_width, top + box_height))
            t = tick("PIL resize(box=...)", t)
            if flip:
                resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            t = tick("PIL flip (half the images)", t)
            data = resized.tobytes("raw", "RGB")
            t = tick("tobytes RGBX -> RGB", t)
            slot.reshape(-1)[:] = np.frombuffer(data, dtype=np.uint8)
            tick("copy into the slot", t)
    return {step: seconds / n * 1e6 for step, seconds in totals.items()}


def main(argv=None) -> int:
    global _records
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parent / ".cache/fixture-2000/loader-bench/lmdb/train-160")
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--gil", action="store_true", help="only the GIL check (large inputs, no records)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    print(f"GIL check (switch interval {sys.getswitchinterval() * 1000:g} ms): ms per call | longest stall of "
          "a Python loop in another thread")
    for name, op in gil_ops().items():
        call_ms, stall_ms = gil_check(op)
        print(f"  {name:<22} {call_ms:8.1f} ms | {stall_ms:8.1f} ms  {'HOLDS the GIL' if stall_ms > 0.6 * call_ms else 'releases it'}",
              flush=True)
    if args.gil:
        return 0
    _records = load(args.data, args.crop_size)
    steps = breakdown(_records)
    print(f"per-image steps of the prototype, one thread, CPU us: total {sum(steps.values()):.0f}")
    for step, micros in steps.items():
        print(f"  {step:<42} {micros:6.1f}")
    print(f"{len(_records['datas'])} records of {args.data}, crop {args.crop_size}; img/s (img/CPU-s)")
    print(f"  {'op':<20} {'1 thread':>16} {'2 threads':>16} {'1 process':>16} {'2 processes':>16}  2/1 thr  2/1 proc")
    for name in args.ops.split(","):
        cells = {(mode, w): measure(name, w, mode, args.seconds) for mode in ("threads", "processes") for w in (1, 2)}
        text = " ".join(f"{c['img_per_s']:8.0f} ({c['img_per_cpu_s']:5.0f})" for c in cells.values())
        thread_gain = cells["threads", 2]["img_per_s"] / cells["threads", 1]["img_per_s"]
        process_gain = cells["processes", 2]["img_per_s"] / cells["processes", 1]["img_per_s"]
        print(f"  {name:<20} {text}  {thread_gain:6.2f}x  {process_gain:6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
