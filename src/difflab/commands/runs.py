"""Run directories are never overwritten by accident: the one guard every command that writes
a training run calls (``train``, ``demo``, ``train-classifier``, and any other trainer command).

    with open_run("runs/fm", resume=False, overwrite=False):
        ...train into runs/fm...

:func:`open_run` (with :func:`check_run`, its read-only part, for checks before any work):

* ``out`` must be a directory (or creatable): an existing file, or a parent that is a file or
  not writable, is refused;
* a run that holds a checkpoint is refused unless ``resume`` (continue it) or ``overwrite``
  (the old run is *moved aside* to ``<out>.old-<UTC time>``, never deleted);
* ``resume`` refuses a folder with no checkpoint and a checkpoint it cannot fully read, naming
  the missing or corrupt file (:func:`check_resumable`);
* one process at a time: an exclusive ``fcntl.flock`` on ``<out>/.lock``, released by the
  kernel when the process ends however it ends (a killed run leaves no stale lock).

Under torchrun only rank 0 (``RANK`` unset or 0) checks, locks and moves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from difflab.commands.common import MissingFileError, ParameterError, param

__all__ = ["open_run", "check_run", "check_resumable", "has_checkpoint", "RunLock",
           "check_writable_dir", "LOCK_NAME"]

LOCK_NAME = ".lock"


def has_checkpoint(out: str | os.PathLike) -> bool:
    """Whether run directory ``out`` holds a checkpoint (whole, partial, or mid-swap)."""
    p = Path(out)
    return any((p / name).exists() for name in ("checkpoint", ".checkpoint.old",
                                                "checkpoint.json")) \
        or ((p / "config.json").is_file() and (p / "model.safetensors").is_file())


def check_writable_dir(path: str | os.PathLike, name: str = "out") -> Path:
    """``path`` as a directory difflab can create or write into, else ParameterError naming
    parameter ``name``: not an existing file, below no file, in a writable parent."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ParameterError(f"{param(name)} {p} is an existing file; give a directory")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ParameterError(f"{param(name)} {p}: {probe} is a file, not a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ParameterError(f"{param(name)} {p}: {probe} is not writable")
    return p


def check_resumable(out: str | os.PathLike) -> None:
    """Raise MissingFileError / ParameterError naming the file unless the checkpoint in run
    directory ``out`` can be read whole: its config, every component's config and weights (and
    EMA), the optimizer state and the training state."""
    from difflab.train import checkpoint as ckpt

    run = Path(out)
    path = ckpt.resolve(run / "checkpoint")
    if not path.exists():
        raise MissingFileError(f"nothing to resume in {param('out')} {run}: it holds no "
                               f"checkpoint; drop {param('resume')} to start a new run there")
    for required in (ckpt.STATE, ckpt.OPTIMIZER):
        if not (path / required).is_file():
            raise MissingFileError(f"cannot {param('resume')} {run}: {path / required} is "
                                   "missing (the checkpoint can be loaded, not continued)")
    try:
        ck = ckpt.read(path)
        state = ck.state()
        if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
            raise ValueError(f"{path / ckpt.STATE} lacks the step or optimizer entry")
        modules = state.get("modules") or {}
        trainable = modules.get("trainable", ["net"]) if isinstance(modules, dict) else ["net"]
        updates = state.get("ema_updates", {})
        for name in trainable:
            if ck.layout == 2:
                ck.component_config(name)
            ck.weights(name)
            if (isinstance(updates, dict) and name in updates) or ck.has_weights(name, True):
                ck.weights(name, ema=True)
        ck.optimizer()
    except FileNotFoundError as e:
        raise MissingFileError(f"cannot {param('resume')} {run}: {e}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ParameterError(f"cannot {param('resume')} {run}: {e}") from e


def check_run(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
              holds_run: Callable[[Path], bool] = has_checkpoint,
              resumable: Callable[[Path], None] | None = check_resumable,
              what: str = "a training run") -> Path:
    """The read-only checks of :func:`open_run` (call it before any work); returns ``out``.
    A run whose directory holds more than a checkpoint (the stages of a text-to-image run)
    passes its own ``holds_run`` test, ``resumable`` check (None: the trainer checks on
    resume) and name ``what``."""
    if resume and overwrite:
        raise ParameterError(f"{param('resume')} and {param('overwrite')} exclude each other")
    p = check_writable_dir(out)
    if resume:
        if resumable is not None:
            resumable(p)
    elif holds_run(p) and not overwrite:
        raise ParameterError(
            f"{param('out')} {p} already holds {what}; continue it with "
            f"{param('resume')}, or pass {param('overwrite')} to move it aside "
            f"(to {p.name}.old-<time>) and start afresh")
    return p


class RunLock:
    """An exclusive lock on a run directory (``fcntl.flock`` on ``<out>/.lock``); a context
    manager; :meth:`release` unlocks. ``moved_to``: where ``overwrite`` put the old run."""

    def __init__(self, out: Path | None, moved_to: Path | None = None):
        self.out, self.moved_to, self._fd = out, moved_to, None

    def acquire(self) -> RunLock:
        if self.out is None:
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ParameterError(
                f"{param('out')} {self.out} is in use by another difflab process (pid {other}); "
                "wait for it to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def open_run(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
             holds_run: Callable[[Path], bool] = has_checkpoint,
             resumable: Callable[[Path], None] | None = check_resumable,
             what: str = "a training run") -> RunLock:
    """Claim run directory ``out`` for one training process (module docstring): checks
    (:func:`check_run`, with its ``holds_run`` / ``resumable`` / ``what``), locks it, and with
    ``overwrite`` moves an existing run aside. Returns the held :class:`RunLock` (use it as a
    context manager)."""
    from difflab.files import move_aside

    p = Path(out)
    if not _is_main_rank():
        return RunLock(None)
    checks = {"holds_run": holds_run, "resumable": resumable, "what": what}
    check_run(p, resume=resume, overwrite=overwrite, **checks)
    lock = RunLock(p).acquire()
    try:  # checked again under the lock: another process may have written meanwhile
        check_run(p, resume=resume, overwrite=overwrite, **checks)
    except BaseException:
        lock.release()
        raise
    if overwrite and holds_run(p):
        lock.release()
        moved = move_aside(p)
        lock = RunLock(p, moved).acquire()
    return lock
