"""One output of a build while it is unfinished: `<out>/.<split>-<prep_size>.partial/`.

Durability protocol (what makes kill -9 safe): records go to the store and to the append-only
`records.partial` / `names.partial` files, rejects and conversions to the append-only JSON-lines
`rejects.partial` / `conversions.partial` (rewriting them whole into progress.json at every commit
would cost time quadratic in their number); `commit` syncs those first and only then atomically
replaces `progress.json`. On reopen everything is rolled back to what progress.json says, so a store
that got ahead of its progress is cut back, and the build resumes from exactly that member.
`finalize` writes the record table, the names, the store's last files and the manifest (last), then
renames the directory into place: a directory without a manifest is never a dataset, and the final
name only ever holds complete ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from formats import DatasetError, fsync_dir, split_dir_name, write_atomic
from formats.lmdb_store import LmdbWriter, release_env
from formats.manifest import Manifest, file_digest, read_manifest, write_manifest
from formats.msgpack_store import MsgpackWriter
from formats.record import MANIFEST_FILE, NAMES_FILE, RECORD_DTYPE, RECORDS_FILE

PROGRESS_FILE = "progress.json"
RECORDS_PARTIAL = "records.partial"
NAMES_PARTIAL = "names.partial"
# Progress lists kept out of progress.json: list name -> its JSON-lines file.
LIST_FILES = {"rejects": "rejects.partial", "conversions": "conversions.partial"}


class BuildError(Exception):
    """A build cannot go on: one line for the user; partial output stays resumable."""


@dataclasses.dataclass
class Progress:
    fingerprint: dict  # settings that decide the output bytes; a resume must match them
    consumed: int = 0  # source members handled (records + rejects)
    num_records: int = 0
    names_bytes: int = 0
    rejects: list = dataclasses.field(default_factory=list)  # {"name", "reason"}
    conversions: list = dataclasses.field(default_factory=list)  # {"name", "conversion"}
    # Per output, in fingerprint["prep_sizes"] order: records that are the source's own bytes.
    stored_as_is: list = dataclasses.field(default_factory=list)
    finished: bool = False  # every member consumed and committed

    def saved_fields(self) -> dict:
        """What progress.json holds: everything but the lists, which live in LIST_FILES (and
        are not even copied: dataclasses.asdict would deep-copy them at every commit)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in LIST_FILES
        }


def _json_line(entry: dict) -> bytes:
    return (json.dumps(entry, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def _read_json_lines(path: Path, count: int) -> list:
    """The first `count` entries of a JSON-lines file (a kill may have left more after them)."""
    if count == 0:
        return []
    with open(path, "rb") as handle:
        entries = [json.loads(line) for _, line in zip(range(count), handle)]
    if len(entries) != count:
        raise BuildError(f"{path}: holds {len(entries)} entries, progress says {count}")
    return entries


def _open_truncated(path: Path, length: int):
    """Append handle on `path`, cut back to `length` bytes first."""
    handle = open(path, "ab")
    if handle.tell() < length:
        raise BuildError(
            f"{path}: holds {handle.tell()} bytes, progress says {length}: the unfinished "
            "build is damaged; pass --overwrite to start it over"
        )
    handle.truncate(length)
    return handle


class PartialOutput:
    def __init__(
        self,
        out_dir: Path,
        split: str,
        prep_size: int,
        store: str,
        shard_bytes: int,
        dir_name: str | None = None,
    ):
        self.prep_size = prep_size
        self.store = store
        self.shard_bytes = shard_bytes
        dir_name = dir_name or split_dir_name(split, prep_size)  # a part has its own name
        self.final_dir = out_dir / dir_name
        self.partial_dir = out_dir / f".{dir_name}.partial"
        self.writer = None
        self._records_file = self._names_file = None
        self._list_files: dict = {}
        self._lists_written: dict = {}

    def saved_progress(self, fingerprint: dict, overwrite: bool) -> Progress | None:
        """What an earlier, interrupted build of the same settings left, or None."""
        progress_path = self.partial_dir / PROGRESS_FILE
        if overwrite or (
            self.partial_dir.exists()
            and not progress_path.exists()
            and not (self.partial_dir / MANIFEST_FILE).exists()
        ):
            shutil.rmtree(self.partial_dir, ignore_errors=True)  # nothing resumable in it
        if not progress_path.exists():
            return None
        try:
            saved = json.loads(progress_path.read_text(encoding="utf-8"))
            for name, file_name in LIST_FILES.items():
                if name not in saved:  # older progress files held the lists themselves
                    saved[name] = _read_json_lines(
                        self.partial_dir / file_name, saved.pop(f"num_{name}", 0)
                    )
            progress = Progress(**saved)
        # written atomically: only tampering gets here
        except (ValueError, TypeError, AttributeError) as err:
            raise BuildError(
                f"{progress_path}: unreadable ({type(err).__name__}: {err}); pass "
                "--overwrite to start the build over"
            ) from None
        if progress.fingerprint != fingerprint:
            raise BuildError(
                f"{self.partial_dir}: an unfinished build with other settings or another source; "
                "rerun the command that started it, or pass --overwrite"
            )
        return progress

    def open(self, progress: Progress) -> None:
        """Roll everything back to `progress` and open for appending."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        if self.store == "lmdb":
            self.writer = LmdbWriter(self.partial_dir, keep_records=progress.num_records)
        else:
            self.writer = MsgpackWriter(
                self.partial_dir, keep_records=progress.num_records, shard_bytes=self.shard_bytes
            )
        self._records_file = _open_truncated(
            self.partial_dir / RECORDS_PARTIAL, progress.num_records * RECORD_DTYPE.itemsize
        )
        self._names_file = _open_truncated(self.partial_dir / NAMES_PARTIAL, progress.names_bytes)
        if progress.num_records:
            self._check_kept(progress)
        for name, file_name in LIST_FILES.items():  # rewritten whole once: they are short
            self._list_files[name] = open(self.partial_dir / file_name, "wb")
            self._lists_written[name] = 0
        self.commit(progress)

    def _check_kept(self, progress: Progress) -> None:
        """Trust nothing an earlier run left (two builds once wrote one output at the same time):
        every kept record must be in place, with the bytes and label its table row says."""
        rows = np.fromfile(
            self.partial_dir / RECORDS_PARTIAL, RECORD_DTYPE, count=progress.num_records
        )
        with open(self.partial_dir / NAMES_PARTIAL, "rb") as names:
            num_names = names.read(progress.names_bytes).count(b"\n")
        bad = self.writer.first_mismatch(rows["crc32"], rows["label"])
        if bad is not None or num_names != progress.num_records:
            what = (
                f"record {bad} disagrees with its table row"
                if bad is not None
                else f"{num_names} names for {progress.num_records} records"
            )
            raise BuildError(
                f"{self.partial_dir}: the unfinished build is damaged ({what}); "
                "pass --overwrite to start it over"
            )

    def append(self, index: int, label: int, jpeg: bytes, row: bytes, name_line: bytes) -> None:
        """`row`: one RECORD_DTYPE row, packed with formats.record.RECORD_STRUCT."""
        self.writer.append(index, label, jpeg)
        self._records_file.write(row)
        self._names_file.write(name_line)

    def commit(self, progress: Progress) -> None:
        self.writer.commit()
        saved = progress.saved_fields()
        for name, handle in self._list_files.items():
            entries = getattr(progress, name)
            handle.write(b"".join(map(_json_line, entries[self._lists_written[name] :])))
            self._lists_written[name] = saved[f"num_{name}"] = len(entries)
        for handle in (self._records_file, self._names_file, *self._list_files.values()):
            handle.flush()
            os.fsync(handle.fileno())
        text = json.dumps(saved, sort_keys=True)
        write_atomic(self.partial_dir / PROGRESS_FILE, lambda f: f.write(text.encode("utf-8")))

    def finalize(self, progress: Progress, manifest_fields: dict, check=None) -> Manifest:
        """Write the remaining files and the manifest (last), then move into the final name.

        Build-state files stay until the manifest exists, so a kill anywhere in here resumes
        (and redoes this) or, once the manifest is written, just completes the move. `check`
        (dataset_dir, manifest) may raise to stop the move: the manifest is then taken back, so
        nothing unchecked is ever moved into place or completed by a rerun."""
        for handle in (self._records_file, self._names_file):
            handle.flush()
            os.fsync(handle.fileno())
        records = np.fromfile(self.partial_dir / RECORDS_PARTIAL, RECORD_DTYPE)
        if len(records) != progress.num_records:
            raise DatasetError(
                f"{self.partial_dir}: record table holds {len(records)}, expected "
                f"{progress.num_records}"
            )
        write_atomic(
            self.partial_dir / RECORDS_FILE, lambda f: np.save(f, records, allow_pickle=False)
        )
        with open(self.partial_dir / NAMES_PARTIAL, "rb") as names:
            write_atomic(self.partial_dir / NAMES_FILE, lambda f: shutil.copyfileobj(names, f))
        files = self.writer.finish()
        files.update(
            {name: file_digest(self.partial_dir / name) for name in (RECORDS_FILE, NAMES_FILE)}
        )
        manifest = Manifest(
            store=self.store,
            prep_size=self.prep_size,
            count=progress.num_records,
            counts_per_class=np.bincount(
                records["label"], minlength=len(manifest_fields["classes"])
            ).tolist(),
            rejects=progress.rejects,
            conversions=progress.conversions,
            files=files,
            **manifest_fields,
        )
        write_manifest(self.partial_dir, manifest)
        self.close()
        if check is not None:
            try:
                check(self.partial_dir, manifest)
            except BaseException:
                (self.partial_dir / MANIFEST_FILE).unlink()
                raise
            finally:
                release_env(self.partial_dir)  # the checked LMDB is about to be renamed
        self.complete_if_finalized()
        return manifest

    def complete_if_finalized(self) -> bool:
        """A partial directory whose manifest was written is complete: drop the build-state
        files the manifest does not list and move it into place."""
        if not (self.partial_dir / MANIFEST_FILE).is_file():
            return False
        listed = set(read_manifest(self.partial_dir).files) | {MANIFEST_FILE}
        for path in self.partial_dir.iterdir():
            if path.name not in listed:
                path.unlink()
        self._move_into_place()
        return True

    def _move_into_place(self) -> None:
        old = self.final_dir.with_name(f".{self.final_dir.name}.old")
        # --overwrite: the old dataset goes only once the new is in place
        if self.final_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final_dir, old)
        os.replace(self.partial_dir, self.final_dir)
        fsync_dir(self.final_dir.parent)
        shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        for handle in (self._records_file, self._names_file, *self._list_files.values()):
            if handle is not None and not handle.closed:
                try:
                    handle.close()
                except OSError:  # unsynced bytes a full disk refused: progress never counted them,
                    pass  # and closing after a failure must not hide the failure
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # closing after a failure must not hide the failure
                pass
