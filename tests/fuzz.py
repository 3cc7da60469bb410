"""Time-bounded fuzzing helpers (used by tests/prep/test_fuzz.py; `python -m tests.fuzz SECONDS`
runs the same loops for longer, to hunt): each case is a seeded mutation of a valid input, so a
failure names the seed that reproduces it."""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import time
from typing import Callable, Iterator


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout in the main thread if the block runs longer than `seconds` (a hang)."""

    def expire(signum, frame):
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def mutate(data: bytes, rng: random.Random, protect: int = 0) -> bytes:
    """A few random edits: flipped, overwritten, inserted or deleted bytes, a cut, a repeated span.
    The first `protect` bytes stay (so the format sniffer still routes it to the same decoder)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if len(out) <= protect + 1:
            break
        # Headers (where the parsers' bugs live) sit at the start: aim half the edits there.
        head_end = min(len(out), protect + 512) if rng.random() < 0.5 else len(out)
        at = rng.randrange(protect, head_end)
        edit = rng.randrange(7)
        if edit == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif edit == 1:
            out[at] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif edit == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif edit == 3:
            del out[at : at + rng.randint(1, 64)]
        elif edit == 4:
            del out[at:]
        elif edit == 5:
            out[at : at + 4] = rng.choice(
                (
                    b"\xff\xff\xff\xff",
                    b"\x00\x00\x00\x00",
                    b"\x7f\xff\xff\xff",
                    b"\x80\x00\x00\x00",
                    b"9999",
                )
            )
        else:
            end = min(len(out), at + rng.randint(1, 512))
            out[at:at] = out[at:end]
    return bytes(out)


def fix_tar_checksums(data: bytes) -> bytes:
    """Recompute the checksum of every block that looks like a tar header, so that mutated
    header fields get past the checksum and reach the parsing behind it."""
    out = bytearray(data)
    for at in range(0, len(out) - 511, 512):
        if out[at + 257 : at + 262] == b"ustar":
            out[at + 148 : at + 156] = b" " * 8
            out[at + 148 : at + 156] = b"%06o\0 " % sum(out[at : at + 512])
    return bytes(out)


def run_cases(
    seeds: Iterator[int], budget_s: float, case: Callable[[int], None], per_case_s: float = 5.0
) -> int:
    """Call `case(seed)` for successive seeds until `budget_s` is spent; return how many ran."""
    deadline = time.monotonic() + budget_s
    count = 0
    for seed in seeds:
        if time.monotonic() > deadline:
            break
        with time_limit(per_case_s):
            case(seed)
        count += 1
    return count


if __name__ == "__main__":  # hunt for longer: python -m tests.fuzz 120
    from tests.prep import test_fuzz

    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    print("images:", test_fuzz.fuzz_images(seconds / 2), "cases")
    print("tars:", test_fuzz.fuzz_tars(seconds / 2), "cases")
    # the mirror readers: tar.gz, parquet, WebDataset
    from tests.prep.test_fuzz_mirrors import fuzz_all

    print("mirrors:", fuzz_all(seconds / 2), "cases")
