"""Nothing lost, nothing cryptic (issue #22): run folders are never overwritten by accident
(refused without --resume, --overwrite moves the old run aside, one process per run folder by
a lock a killed process does not leave stuck), outputs are checked before the work and written
atomically, the same tensors write the same bytes, option and config errors name what the user
wrote, stale fits are refused where asked for by name."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from toyconfig import toy_config

from difflab import files
from difflab.cli import main
from difflab.commands.common import ParameterError

ROOT = Path(__file__).resolve().parents[1]
TOY = toy_config()


def cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue().strip()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    (root / "toy.json").write_text(json.dumps(TOY))
    rc, err = cli(["train", str(root / "toy.json"), "--out", str(root / "run"), "--quiet"])
    assert rc == 0, err
    return root


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# --- runs ------------------------------------------------------------------------------------
def test_an_existing_run_is_refused_then_moved_aside_with_overwrite(toy, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(toy / "run", run)
    before = tree(run)
    rc, err = cli(["train", str(toy / "toy.json"), "--out", str(run), "--quiet"])
    assert rc == 2 and "already holds a training run" in err and "--resume" in err \
        and "--overwrite" in err, err
    assert tree(run) == before
    rc, err = cli(["train", str(toy / "toy.json"), "--out", str(run), "--quiet", "--overwrite"])
    assert rc == 0, err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and tree(moved[0]) == before  # never deleted
    assert (run / "checkpoint" / "checkpoint.json").is_file()


def test_resume_refuses_an_empty_folder_and_names_a_missing_file(toy, tmp_path):
    import shutil

    rc, err = cli(["train", str(toy / "toy.json"), "--out", str(tmp_path / "empty"), "--quiet",
                   "--resume"])
    assert rc == 2 and "nothing to resume" in err and "drop --resume" in err, err
    assert not (tmp_path / "empty").exists()
    for name in ("state.json", "optimizer.safetensors", "net.ema.safetensors",
                 "checkpoint.json", "net.json"):
        run = tmp_path / name
        shutil.copytree(toy / "run", run)
        (run / "checkpoint" / name).unlink()
        before = tree(run)
        rc, err = cli(["train", str(toy / "toy.json"), "--out", str(run), "--quiet",
                       "--resume"])
        assert rc == 2 and name in err and "--resume" in err, (name, err)
        assert tree(run) == before, name


def test_resume_refuses_a_truncated_checkpoint(toy, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(toy / "run", run)
    f = run / "checkpoint" / "net.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    rc, err = cli(["train", str(toy / "toy.json"), "--out", str(run), "--quiet", "--resume"])
    assert rc == 2 and "net.safetensors" in err and "corrupt or truncated" in err, err


LOCKER = """
import sys, time
from difflab.commands.runs import open_run
lock = open_run(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_one_process_per_run_folder_and_a_killed_one_leaves_no_stuck_lock(toy, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(run)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        rc, err = cli(["train", str(toy / "toy.json"), "--out", str(run), "--quiet"])
        assert rc == 2 and "in use by another difflab process" in err \
            and str(proc.pid) in err, err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rc, err = cli(["train", str(toy / "toy.json"), "--out", str(run), "--quiet"])
    assert rc == 0, err


def test_out_that_is_a_file_and_resume_with_overwrite_are_refused(toy, tmp_path):
    f = tmp_path / "file"
    f.write_text("precious")
    for extra, words in (([], "is an existing file"),
                         (["--resume", "--overwrite"], "exclude each other")):
        rc, err = cli(["train", str(toy / "toy.json"), "--out", str(f), "--quiet", *extra])
        assert rc == 2 and words in err, err
    assert f.read_text() == "precious"


# --- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["--max-minutes", "0"], "--max-minutes must be > 0"),
    (["--threads", "-2"], "--threads must be >= 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--device", "gpu"], "unknown --device 'gpu'"),
    (["--set", "train.lrr=1e-3"], "did you mean train.lr?"),
    (["--set", "net.hiden=3"], "did you mean net.hidden?"),
    (["--set", "net.hidden=-4"], "net.hidden must be >= 1"),
    (["--set", "train.max_minutes=0"], "train.max_minutes must be a number > 0"),
    (["--set", "train.sampler=dpmpp2m"], "did you mean dpmpp_2m?"),
    (["--steps", "x"], "argument --steps: invalid int value"),
])
def test_option_and_config_errors_name_what_the_user_wrote(toy, tmp_path, argv, words):
    rc, err = cli(["train", str(toy / "toy.json"), "--out", str(tmp_path / "r"), "--quiet",
                   *argv])
    assert rc == 2 and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error(toy, tmp_path):
    rc, err = cli(["sample", str(toy / "run"), "--out", str(tmp_path / "x.npy"),
                   "--device", "cuda"])
    assert rc == 2 and "CUDA is not available" in err, err


def test_a_sample_count_that_cannot_fit_in_memory_is_refused_up_front(toy, tmp_path):
    rc, err = cli(["sample", str(toy / "run"), "--out", str(tmp_path / "x.npy"),
                   "--count", str(10**12)])
    assert rc == 2 and "GiB of memory" in err and "--count" in err, err


def test_outputs_are_checked_before_the_work_and_never_replaced_silently(toy, tmp_path):
    out = tmp_path / "x.npy"
    out.write_bytes(b"finished work")
    rc, err = cli(["sample", str(toy / "run"), "--out", str(out), "--count", "2",
                   "--steps", "2"])
    assert rc == 2 and "exists; pass --overwrite" in err, err
    assert out.read_bytes() == b"finished work"
    rc, err = cli(["sample", str(toy / "run"), "--out", str(out), "--count", "2",
                   "--steps", "2", "--overwrite"])
    assert rc == 0, err
    assert out.read_bytes() != b"finished work"
    (tmp_path / "res.json").write_text("{}")
    rc, err = cli(["eval", str(out), "--out", str(tmp_path / "res.json")])
    assert rc == 2 and "--out" in err and "exists" in err, err


# --- bytes -----------------------------------------------------------------------------------
def test_the_same_tensors_write_the_same_bytes(tmp_path):
    tensors = {f"layer{i}.weight": torch.full((3, i + 1), float(i)) for i in range(6)}
    meta = {k: str(i) for i, k in enumerate("qwertyuiop")}
    blobs = {files.safetensors_bytes(dict(reversed(list(tensors.items()))), meta)
             for _ in range(8)} | {files.safetensors_bytes(tensors, dict(sorted(meta.items())))}
    assert len(blobs) == 1
    from safetensors.torch import load

    back = load(blobs.pop())
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    # safetensors' own writer orders the metadata by a hash map: 8 saves, 8 different files
    from safetensors.torch import save

    assert len({save(tensors, metadata=meta) for _ in range(8)}) > 1


def test_write_bytes_is_atomic_and_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    files.write_json(path, {"b": 1, "a": 2})
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'

    def full(p, data):
        Path(p).write_bytes(data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_write_file", full)
    with pytest.raises(OSError, match=r"a\.json.*previous JSON file there is intact"):
        files.write_json(path, {"c": 3})
    assert json.loads(path.read_text()) == {"a": 2, "b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# --- fits ------------------------------------------------------------------------------------
def test_a_stale_fit_is_an_error_when_asked_for_and_a_notice_when_found(toy, tmp_path):
    import shutil
    import warnings

    from difflab.commands.model import choose_solver
    from difflab.fitting import Fit, save_fit

    run = tmp_path / "run"
    shutil.copytree(toy / "run", run)
    ck = run / "checkpoint"
    save_fit(ck, Fit(sampler="bespoke", ts=(1.0, 0.5, 0.0)))
    # the weights change after the fit (a resumed run, a replaced file)
    f = ck / "net.ema.safetensors"
    from safetensors.torch import load_file

    w = load_file(str(f))
    w = {k: v + 1 for k, v in w.items()}
    f.write_bytes(files.safetensors_bytes(w, {"format": "pt"}))
    with pytest.raises(ValueError, match="made for other weights"):
        choose_solver(ck, "bespoke", 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solver = choose_solver(ck, "auto", 2)
    assert solver.fit is None and any("other weights" in str(c.message) for c in caught)


def test_parameter_errors_render_flags():
    e = ParameterError("x")
    assert str(e) == "x"


def test_a_lock_file_left_by_a_dead_process_does_not_block(toy, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("99999999\n")  # a pid that does not run
    t0 = time.perf_counter()
    rc, err = cli(["train", str(toy / "toy.json"), "--out", str(run), "--quiet"])
    assert rc == 0 and time.perf_counter() - t0 < 60, err
    assert os.path.exists(run / "checkpoint")
