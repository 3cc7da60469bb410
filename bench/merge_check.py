"""What `prep merge`'s checks cost against the merge itself (issue 21).

    python bench/merge_check.py [--num-images 20000] [--num-parts 2] [--prep-size 160] [--repeats 3]

Builds (once, cached under --work) the parts of a --num-images build of `prep sample` data for
each store, then per repeat and store times: the parts' check (every part against its own
manifest: file digests, record table, names, store structure), the whole merge (which includes
that check, the copy with its per-record crc32, and the result's check before it is moved into
place), and the result's check alone. The copy is the merge less the two checks. Page cache
warm: every file was just written or read (the fixture fits in RAM), so this is CPU cost, the
part a shared filesystem's bandwidth would add to equally for check and copy. Medians of
--repeats, with min and max to show the noise of a shared machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from formats.jpeg import codec_report  # noqa: E402
from formats.manifest import read_manifest  # noqa: E402
from prep.build import BuildConfig, build  # noqa: E402
from prep.merge import check_parts, load_parts, merge  # noqa: E402
from prep.parts import PartSpec  # noqa: E402
from prep.sample import write_sample  # noqa: E402
from prep.verify import check_whole_files  # noqa: E402

NUM_CLASSES = 20


def build_parts(work: Path, src: Path, store: str, num_parts: int, prep_size: int) -> list[Path]:
    out = work / f"parts-{store}"
    for index in range(num_parts):
        build(
            BuildConfig(
                src_dir=src,
                out_dir=out,
                split="train",
                prep_sizes=(prep_size,),
                store=store,
                workers=os.cpu_count() or 1,
                quiet=True,
                part=PartSpec(index, num_parts),
            )
        )
    return sorted(out.glob(f"train-{prep_size}.part-*"))


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=20_000)
    parser.add_argument("--num-parts", type=int, default=2)
    parser.add_argument("--prep-size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE / ".cache" / "merge-check")
    args = parser.parse_args()
    src = args.work / f"src-{args.num_images}"
    if not (src / "ILSVRC2012_img_train.tar").is_file():
        write_sample(
            src,
            num_classes=NUM_CLASSES,
            train_per_class=args.num_images // NUM_CLASSES,
            val_per_class=1,
        )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {codec_report()}"
    )
    for store in ("lmdb", "msgpack"):
        part_dirs = build_parts(args.work, src, store, args.num_parts, args.prep_size)
        parts = load_parts(part_dirs)
        out = args.work / f"merged-{store}"
        merged = out / f"train-{args.prep_size}"
        times = {"check parts": [], "merge (all)": [], "check result": []}
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            times["check parts"].append(timed(lambda: check_parts(parts)))
            times["merge (all)"].append(timed(lambda: merge(part_dirs, out, quiet=True)))
            manifest = read_manifest(merged)
            times["check result"].append(timed(lambda: check_whole_files(merged, manifest)))
        count = read_manifest(merged).count
        print(
            f"\n{store}: {count:,} records in {len(part_dirs)} parts, "
            f"{dir_bytes(merged) / 2**20:,.1f} MiB merged"
        )
        median = {name: statistics.median(values) for name, values in times.items()}
        for name, values in times.items():
            print(
                f"  {name:13s} median {median[name]:6.2f} s  (min {min(values):.2f}, max "
                f"{max(values):.2f})"
            )
        checks = median["check parts"] + median["check result"]
        copy = median["merge (all)"] - checks
        print(
            f"  copy (merge less its checks) ~{copy:.2f} s; checks {checks:.2f} s = "
            f"{100 * checks / median['merge (all)']:.0f}% of the merge, "
            f"{100 * checks / copy:.0f}% of the copy"
        )


if __name__ == "__main__":
    main()
