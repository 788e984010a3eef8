"""Fault injection and kill-and-resume (issue #22): an I/O error (ENOSPC) injected at every
write of a training run, of a checkpoint save and of a sample output leaves the last good
checkpoint / output whole and loadable, and the run resumes from it to the same bytes as an
uninterrupted run; SIGKILL at random steps, resumed each time, ends bit-identical.

The one function that writes a file is :func:`difflab.files._write_file`; the tests patch it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from toyconfig import toy_config

from difflab import files
from difflab.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY = toy_config(steps=6, ckpt_every=3)
WEIGHTS = ("net.safetensors", "net.ema.safetensors", "optimizer.safetensors")
FIGURES: dict[str, int] = {}


def cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


@contextlib.contextmanager
def fail_at(k: int | None, counter: list[int] | None = None):
    """Patch the one write function: the k-th write raises OSError(ENOSPC) (None: count)."""
    real = files._write_file
    calls = [0]

    def write(path, data):
        calls[0] += 1
        if counter is not None:
            counter.append(1)
        if k is not None and calls[0] == k:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    files._write_file = write
    try:
        yield calls
    finally:
        files._write_file = real


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def no_temporaries(path: Path) -> bool:
    return not any(".tmp-" in p.name for p in path.parent.rglob("*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the toy config (its final checkpoint's bytes)."""
    root = tmp_path_factory.mktemp("ref")
    (root / "toy.json").write_text(json.dumps(TOY))
    rc, err = cli(["train", str(root / "toy.json"), "--out", str(root / "run"), "--quiet"])
    assert rc == 0, err
    return root


def test_enospc_at_every_write_of_a_training_run_loses_nothing(reference, tmp_path,
                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the quick PIL loss plot
    cfg = str(reference / "toy.json")
    counted: list[int] = []
    with fail_at(None, counted):
        assert cli(["train", cfg, "--out", str(tmp_path / "count"), "--quiet"])[0] == 0
    n = len(counted)  # config.json, 3 checkpoint saves (steps 3, 6, final) of 7 files, loss.png
    assert n == 23
    for k in range(1, n + 1):
        run = tmp_path / f"run{k}"
        with fail_at(k):
            rc, err = cli(["train", cfg, "--out", str(run), "--quiet"])
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "No space left on device" in lines[0], err
        assert "Traceback" not in err
        assert no_temporaries(run / "checkpoint")
        ck = run / "checkpoint"
        if ck.exists():  # the last good checkpoint is whole and loads
            from difflab.train.checkpoint import load_denoiser

            load_denoiser(run)
        resume = ["--resume"] if ck.exists() else []
        rc, err = cli(["train", cfg, "--out", str(run), "--quiet", *resume])
        assert rc == 0, (k, err)
        for name in WEIGHTS:
            assert (ck / name).read_bytes() == (reference / "run" / "checkpoint" /
                                                name).read_bytes(), (k, name)
    FIGURES["training-run writes"] = n


def test_enospc_at_every_write_of_a_checkpoint_save(reference, tmp_path):
    from difflab.train.checkpoint import load_denoiser
    from difflab.train.config import load_config
    from difflab.train.trainer import Trainer

    config = load_config(str(reference / "toy.json"))
    tr = Trainer(config, tmp_path / "run")
    for _ in range(3):
        tr._step()
    counted: list[int] = []
    with fail_at(None, counted):
        tr.save()
    good = tree(tmp_path / "run" / "checkpoint")
    tr._step()
    for k in range(1, len(counted) + 1):
        with fail_at(k), pytest.raises(OSError, match="No space left.*previous checkpoint"):
            tr.save()
        assert tree(tmp_path / "run" / "checkpoint") == good, k
        assert no_temporaries(tmp_path / "run" / "checkpoint")
        load_denoiser(tmp_path / "run")
    resumed = Trainer(config, tmp_path / "run", resume=True)
    assert resumed.step == 3
    resumed.run()
    for name in WEIGHTS:
        assert (tmp_path / "run" / "checkpoint" / name).read_bytes() == \
            (reference / "run" / "checkpoint" / name).read_bytes(), name
    FIGURES["checkpoint-save writes"] = len(counted)


@pytest.mark.parametrize("name", ["x.npy", "grid.png", "pngs"])
def test_enospc_at_every_write_of_a_sample_output(tmp_path, name):
    from difflab.commands.images import write_samples

    out = tmp_path / name
    old = torch.rand(5, 1, 8, 8) * 2 - 1
    write_samples(old, out)

    def output() -> dict[str, bytes]:
        return tree(out) if out.is_dir() else {"": out.read_bytes()}

    good = output()
    new = torch.rand(5, 1, 8, 8) * 2 - 1
    counted: list[int] = []
    with fail_at(None, counted):
        write_samples(new, tmp_path / "counted" / name)
    for k in range(1, len(counted) + 1):
        with fail_at(k), pytest.raises(OSError, match="No space left"):
            write_samples(new, out, overwrite=True)
        assert output() == good, k
        assert no_temporaries(out)
    write_samples(new, out, overwrite=True)
    assert output() == tree(tmp_path / "counted" / name) if out.is_dir() else \
        out.read_bytes() == (tmp_path / "counted" / name).read_bytes()
    FIGURES[f"sample output {name} writes"] = len(counted)


def test_enospc_during_difflab_sample_is_one_line(reference, tmp_path):
    out = tmp_path / "x.npy"
    out.write_bytes(b"previous output")
    with fail_at(1):
        rc, err = cli(["sample", str(reference / "run"), "--out", str(out), "--count", "3",
                       "--steps", "2", "--overwrite"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "No space left" in err, err
    assert out.read_bytes() == b"previous output"


def test_a_nonfinite_loss_stops_the_run_with_the_last_checkpoint_intact(reference, tmp_path,
                                                                       monkeypatch):
    from difflab.train.trainer import Trainer

    real = Trainer._step

    def diverging(self):
        loss = real(self)
        return loss * float("nan") if self.step >= 5 else loss

    monkeypatch.setattr(Trainer, "_step", diverging)
    run = tmp_path / "run"
    rc, err = cli(["train", str(reference / "toy.json"), "--out", str(run), "--quiet"])
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "loss became nan by step 5" in err and "last checkpoint is intact" in err
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    monkeypatch.setattr(Trainer, "_step", real)
    assert cli(["train", str(reference / "toy.json"), "--out", str(run), "--quiet",
                "--resume"])[0] == 0
    for name in WEIGHTS:
        assert (run / "checkpoint" / name).read_bytes() == \
            (reference / "run" / "checkpoint" / name).read_bytes(), name


def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from reliability import kill_and_resume
    finally:
        sys.path.remove(str(ROOT / "bench"))
    def reference(cfg: Path, out: Path) -> None:  # in this process: one torch thread, as theirs
        assert cli(["train", str(cfg), "--out", str(out), "--threads", "1", "--quiet"])[0] == 0

    result = kill_and_resume(tmp_path, kills=3, steps=18, seed=1, reference=reference)
    assert result["kills"] == 3, result
    assert result["all_identical"], result
    FIGURES["kills"] = result["kills"]
