"""A results folder: `meta.json` (format version) and `results.jsonl` (one JSON object a line).

Layout, like kvpress's evaluation folders, records how every number was made: each line carries the
full configuration, model, cache, corpus, seed, code version and device. Lines are appended with one
`os.write` of the whole line on an O_APPEND descriptor, so Ctrl-C (or a crash between samples) leaves
only complete lines; a line torn by a hard kill or a full disk is cut off when the folder is reopened.
A rerun with the same folder skips every record whose `key` is already there (resume).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ..errors import UserError

FORMAT = 1                 # bump when a record's meaning changes; old folders are then refused
META, RESULTS = "meta.json", "results.jsonl"


def record_key(**fields) -> str:
    """A stable text key for one measured unit (sample × cache, or window × cache)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """longkv.__version__ and, from a git checkout, `git describe --always --dirty`."""
    from .. import __version__

    git = None
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            git = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"longkv": __version__, "git": git}


def environment(device: str, dtype: str) -> dict:
    import torch

    env = {**code_version(), "device": device, "dtype": dtype, "torch": torch.__version__,
           "python": platform.python_version(), "cpus": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def read_folder(path: str | Path) -> list[dict]:
    """All complete records of a results folder; UserError when it is missing or of another format."""
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"no results folder {path}")
    _check_format(d)
    f = d / RESULTS
    if not f.exists():
        return []
    out = []
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue                     # a torn tail (hard kill): ignored, cut on the next write
        if rec.get("format") != FORMAT:
            raise UserError(f"{f} has a record of format {rec.get('format')}, this longkv reads format "
                            f"{FORMAT}; rerun into a new --out folder")
        out.append(rec)
    return out


def _check_format(d: Path) -> None:
    m = d / META
    if m.exists():
        try:
            meta = json.loads(m.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise UserError(f"{m} is not valid JSON; is {d} a longkv results folder?") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{d} holds results of format {meta.get('format')} (longkv "
                            f"{meta.get('longkv', '?')}); this longkv writes format {FORMAT}: use a new "
                            f"--out folder or the longkv version that wrote it")
    elif (d / RESULTS).exists():
        raise UserError(f"{d} has {RESULTS} but no {META}; is it a longkv results folder?")


class Results:
    """Append-only writer with resume. `Results(None)` keeps records in memory only."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.done: dict[str, dict] = {}
        self._fd = None
        if self.path is None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out folder {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise UserError(f"--out folder {self.path} is not writable")
        _check_format(self.path)
        for rec in read_folder(self.path):
            self.done[rec["key"]] = rec
        meta = self.path / META
        if not meta.exists():
            self._atomic_write(meta, json.dumps({"format": FORMAT, **code_version(),
                                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
        f = self.path / RESULTS
        try:
            self._fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise UserError(f"cannot write {f}: {e.strerror}") from None
        self._cut_torn_tail(f)

    def _atomic_write(self, p: Path, text: str) -> None:
        tmp = p.with_suffix(".tmp")
        try:
            tmp.write_text(text + "\n", encoding="utf-8")
            os.replace(tmp, p)
        except OSError as e:
            raise UserError(f"cannot write {p}: {e.strerror}") from None

    def _cut_torn_tail(self, f: Path) -> None:
        size = f.stat().st_size
        if size == 0:
            return
        with open(f, "rb") as fh:
            data = fh.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        os.truncate(f, keep)
        print(f"longkv: cut a torn last line ({size - keep} bytes) from {f}", file=sys.stderr)

    def write(self, rec: dict) -> None:
        rec = {"format": FORMAT, **rec}
        self.done[rec["key"]] = rec
        if self._fd is None:
            return
        line = (json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        n = os.write(self._fd, line)      # one syscall for the whole line
        if n != len(line):
            raise UserError(f"could not write a whole result line to {self.path} (disk full?)")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
