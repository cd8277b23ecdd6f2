"""A run's output directory: which files a run owns, and how a new, a resumed and an overwriting run treat
an existing directory.

A run marks its directory with `adarank_run.json` before it writes anything else; only a marked directory
holds a run. `adarank train` refuses a directory that holds a run unless told to `--resume` it or to
`--overwrite` it, and `--overwrite` removes only what a run writes (`RUN_FILES`), never other files. A
directory that has files of those names but no marker is not ours: it is refused, also with --overwrite.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import tempfile

MARKER = "adarank_run.json"
CHECKPOINTS = "checkpoints"
RUN_FILES = (MARKER, "config.yaml", "log.jsonl", "rank_events.jsonl", "results.json", "training.png", "model",
             CHECKPOINTS)


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message names the path and what to do."""


def read_marker(path: str) -> dict | None:
    """The run marker of `path` ({} when present but unreadable), or None where there is no run."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return None
    try:
        with open(marker, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_marker(path: str, **fields) -> None:
    """Create or update the run marker (atomically), stamping the time."""
    from .report import write_json

    data = read_marker(path) or {"format": 1}
    data.update(fields, updated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    write_json(os.path.join(path, MARKER), data)


def mark_running(path: str, step: int) -> None:
    """The marker of a run in progress: its step, and which process on which machine trains it."""
    write_marker(path, status="running", step=step, pid=os.getpid(), host=socket.gethostname())


def live_owner(marker: dict) -> int | None:
    """The process id training the run now, when the marker says it runs here and that process lives."""
    pid = marker.get("pid")
    if marker.get("status") != "running" or marker.get("host") != socket.gethostname() or not isinstance(pid, int):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return pid
    return pid


def describe(marker: dict) -> str:
    status = marker.get("status", "unknown")
    step = marker.get("step")
    return f"{status} at step {step}" if step is not None and status != "complete" else status


def check_output_dir(path: str, resume: bool = False, overwrite: bool = False) -> str:
    """Decide what a run may do with `path` before anything is loaded or written: "new", "resume" or
    "overwrite". Raises RunDirError with one line that says why not and what to do instead."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue the run or replace it")
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"train.output_dir: {path} exists and is not a directory")
    marker = read_marker(path) if os.path.isdir(path) else None
    if marker is None:
        ours = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
        if ours:
            raise RunDirError(f"train.output_dir: {path} holds {', '.join(ours)} but no {MARKER}, so it is not an "
                              "AdaRank run (or one from a version before run markers) and nothing in it is replaced; "
                              "choose another directory")
        if resume:
            raise RunDirError(f"--resume: {path} holds no AdaRank run to continue")
        probe_writable(path)
        return "new"
    owner = live_owner(marker)
    if owner is not None:
        raise RunDirError(f"train.output_dir: a run is in progress in {path} (process {owner} on this machine); stop it "
                          "before you resume or replace it")
    if resume:
        from .checkpoint import latest_checkpoint

        if marker.get("status") == "complete":
            raise RunDirError(f"--resume: the run in {path} is complete; there is nothing to continue "
                              "(--overwrite trains it again)")
        if latest_checkpoint(path) is None:
            raise RunDirError(f"--resume: the run in {path} ({describe(marker)}) has no complete checkpoint; "
                              "start it again with --overwrite")
        probe_writable(path)
        return "resume"
    if not overwrite:
        raise RunDirError(f"train.output_dir: {path} already holds an AdaRank run ({describe(marker)}); continue it "
                          "with --resume or replace it with --overwrite")
    probe_writable(path)
    return "overwrite"


def probe_writable(path: str) -> None:
    """Fail now, with the path, if a run could not write into `path`; leave nothing behind."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunDirError(f"train.output_dir: cannot create {path}: {existing} is not a directory")
    try:
        probe = tempfile.mkdtemp(dir=existing, prefix=".adarank-probe-")
        os.rmdir(probe)
    except OSError as exc:
        raise RunDirError(f"train.output_dir: cannot write in {existing} ({exc.strerror or exc})") from None


def clear_run(path: str) -> list[str]:
    """Remove what a run wrote into `path` (only a marked run directory); other files stay. Returns the
    names removed. The marker goes last, so an interrupted clear is still recognised as a run."""
    if read_marker(path) is None:
        raise RunDirError(f"{path} holds no AdaRank run; nothing is removed")
    removed = []
    for name in RUN_FILES[1:] + RUN_FILES[:1]:
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.unlink(target)
        else:
            continue
        removed.append(name)
    return removed


__all__ = ["CHECKPOINTS", "MARKER", "RUN_FILES", "RunDirError", "check_output_dir", "clear_run", "read_marker",
           "write_marker"]
