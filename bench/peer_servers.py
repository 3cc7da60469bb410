"""Loaders in their own processes, timed on command (bench/window_server.py's protocol): the peers
(FFCV, DALI) under the peer venv's python, ours (bench/peer_servers.py serve) under this one; plus
the peers' inputs, made once from our shards and cached beside them.

    python bench/peer_servers.py serve {ours,ours-processes,ours-python} \\
        --data DIR --crop-size 128 ...

is how the driver starts ours (public API only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_PEERS_VENV = HERE / ".peers-venv"
WARMUP_BATCHES = 8  # untimed before every window: flushes what a loader prefetched while idle
PEER_LOADERS = ("ffcv", "ffcv-contiguous", "dali")
OUR_LOADERS = ("ours", "ours-processes", "ours-python")


def peers_python(path: Path | None) -> tuple[Path | None, str]:
    """(python of the peer venv, or None, and one line saying why not)."""
    python = Path(path) if path else DEFAULT_PEERS_VENV / "bin" / "python"
    if not python.is_file():
        return (
            None,
            f"skipped: no peer venv at {python.parent.parent} (run bash bench/setup_peers.sh)",
        )
    return python, ""


def peer_has(python: Path, module: str) -> bool:
    done = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
    return done.returncode == 0


def prepare_inputs(dataset_dir: Path, cache: Path) -> Path:
    """<cache>/peer-inputs-<name>/: every record's stored JPEG bytes as images/NNNNNNN.jpg and
    DALI's file_list.txt (`images/NNNNNNN.jpg label`), written once."""
    import loader_baselines as base

    out = cache / f"peer-inputs-{dataset_dir.name}"
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    lines = []
    for index, (data, label) in enumerate(base.stored_records(dataset_dir)):
        (out / "images" / f"{index:07d}.jpg").write_bytes(data)
        lines.append(f"images/{index:07d}.jpg {label}")
    (out / "file_list.txt").write_text("\n".join(lines) + "\n")
    (out / "done").write_text(str(len(lines)))
    return out


def ffcv_dataset(python: Path, inputs: Path, cache: Path, workers: int) -> Path:
    """FFCV's .beton of the same records, written once by FFCV's own writer."""
    out = cache / f"{inputs.name.replace('peer-inputs-', 'ffcv-')}.beton"
    if not out.is_file():
        args = [
            str(python),
            str(HERE / "peers_runner.py"),
            "write-ffcv",
            "--inputs",
            str(inputs),
            "--out",
            str(out),
            "--workers",
            str(workers),
        ]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"FFCV's writer failed: {done.stderr.strip().splitlines()[-1:]}")
    return out


class Server:
    """One loader process; `window(...)` runs one timed window and returns its result dict."""

    def __init__(self, name: str, args: list[str], log_path: Path):
        self.name = name
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=REPO,
        )
        self.facts: dict = {}
        self.error = ""

    def ready(self) -> bool:
        reply = self._reply()
        if "ready" in reply:
            self.facts = reply["ready"]
            return True
        self.error = reply.get("error", "no answer")
        return False

    def window(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            return {"error": f"exited with {self.process.wait()} (log: {self.log.name})"}
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write('{"quit": true}\n')
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def start(
    name: str,
    data: Path,
    crop_size: int,
    batch_size: int,
    workers: int,
    log_dir: Path,
    python: Path | None = None,
) -> Server:
    common = [
        "--data",
        str(data),
        "--crop-size",
        str(crop_size),
        "--batch-size",
        str(batch_size),
        "--workers",
        str(workers),
    ]
    if name in PEER_LOADERS:
        args = [str(python), str(HERE / "peers_runner.py"), "serve", "--loader", name] + common
    else:
        args = [sys.executable, str(HERE / "peer_servers.py"), "serve", name] + common
    return Server(name, args, log_dir / f"{name}-{crop_size}.log")


def best_of_windows(server: Server, repeats: int, seconds: float, workers: int) -> dict:
    """bench/loader.py's protocol: the best of `repeats` windows of >= `seconds`."""
    windows = [
        server.window(seconds=seconds, warmup=WARMUP_BATCHES) | {"workers": workers}
        for _ in range(repeats)
    ]
    return max(windows, key=lambda w: w["images"] / w["seconds"]) | {"windows": windows}


def peer_baselines(args, shards_dir: Path, cache: Path) -> list[tuple]:
    """bench/loader.py's optional rows: (group, key, label, thunk -> raw result | 'skipped: ...'),
    FFCV (default and contiguous output) and DALI's CPU pipeline, on train-160 and train-320."""
    python, why = peers_python(getattr(args, "peers_python", None))
    rows = []
    for group, prep_size, crop_size in (("train128", 160, 128), ("train224", 320, 224)):
        for name, label in (
            ("ffcv", "FFCV default (NCHW view of NHWC)"),
            ("ffcv-contiguous", "FFCV contiguous NCHW"),
            ("dali", "DALI CPU pipeline (NHWC)"),
        ):

            def thunk(name=name, prep_size=prep_size, crop_size=crop_size):
                if python is None:
                    return why
                module = "nvidia.dali" if name == "dali" else "ffcv"
                if not peer_has(python, module):
                    return f"skipped: {module} does not import in {python}"
                inputs = prepare_inputs(shards_dir / f"train-{prep_size}", cache)
                data = (
                    inputs if name == "dali" else ffcv_dataset(python, inputs, cache, args.workers)
                )
                log_dir = cache / "peer-logs"
                log_dir.mkdir(exist_ok=True)
                server = start(
                    name, data, crop_size, args.batch_size, args.workers, log_dir, python
                )
                try:
                    if not server.ready():
                        return f"skipped: {name} failed to start: {server.error}"
                    return best_of_windows(server, args.repeats, args.seconds, args.workers)
                finally:
                    server.close()

            rows.append((group, name, f"(7) {label}, train-{prep_size}", thunk))
    return rows


# --------------------------------------------------------------------------- ours


OUR_VARIANTS = {  # loader name: (TrainLoader's executor, pure-Python decode)
    "ours": ("threads", False),  # the default: worker threads around the native decoder
    "ours-processes": ("processes", False),  # the same decoder in worker processes
    "ours-python": ("processes", True),  # no native extension: the pure-Python fallback
}


def _ours_batches(args, executor: str):
    """Our TrainLoader through its public API, epoch after epoch as a training loop runs it."""
    from train.data.crops import TrainCrop
    from train.data.loaders import TrainLoader

    loader = TrainLoader(
        args.data,
        args.batch_size,
        TrainCrop(args.crop_size),
        workers=args.workers,
        executor=executor,
    )
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def main(argv=None) -> int:
    sys.path[:0] = [str(REPO), str(HERE)]
    import window_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("serve",))
    parser.add_argument("loader", choices=OUR_LOADERS)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    from train.data.decode import PYTHON_DECODE_ENV, backend

    executor, python_decode = OUR_VARIANTS[args.loader]
    if python_decode:
        os.environ[PYTHON_DECODE_ENV] = "1"  # read at the first decode, not at import
    facts = {"library": "shardtrain TrainLoader", executor: args.workers, "decode": backend()}
    return window_server.serve(lambda: _ours_batches(args, executor), facts, WARMUP_BATCHES)


if __name__ == "__main__":
    sys.exit(main())
