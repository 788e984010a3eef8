"""Kill-and-resume: ``difflab train`` killed with SIGKILL at random steps, resumed each time,
ends with the same bytes as an uninterrupted run (docs/reliability.md records the figure).

    python bench/reliability.py --kills 20            # the figure in docs/reliability.md
    python bench/reliability.py --kills 3 --steps 24  # what tests/test_faults.py runs

A tiny MLP on the toy "ring" data, a checkpoint every 3 steps, one progress line per step.
Each run is a fresh ``python -m difflab.cli train`` process (``--resume`` whenever the run
directory holds a checkpoint; before the first checkpoint the run starts afresh); it is killed
as soon as it reports the next of ``--kills`` random steps. The weights, EMA and optimizer
files of the final checkpoint are then compared byte for byte with an uninterrupted run's
(the same tensors write the same bytes, :func:`difflab.files.safetensors_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("net.safetensors", "net.ema.safetensors", "optimizer.safetensors")


def toy_config(steps: int, ckpt_every: int = 3) -> dict:
    return {
        "net": {"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "num_classes": None},
        "schedule": {"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999},
        "prediction": "eps",
        "data": {"name": "ring", "resolution": None, "channels": 2, "num_classes": None,
                 "split": "train", "n": 512},
        "train": {"steps": steps, "batch_size": 32, "lr": 1e-3, "warmup": 5,
                  "ema_decay": 0.99, "ckpt_every": ckpt_every, "log_every": 1,
                  "grid_size": 0, "fit_steps": [], "sample_every": 0},
    }


def _command(cfg: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "difflab.cli", "train", str(cfg), "--out", str(out),
            "--threads", "1"] + (["--resume"] if resume else [])


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_until(cfg: Path, out: Path, kill_at: int | None) -> tuple[int, int]:
    """One ``difflab train`` process into ``out`` (resuming when it holds a checkpoint),
    SIGKILLed once it reports step ``kill_at`` (None: let it finish). Returns (exit code,
    last step seen)."""
    resume = (out / "checkpoint").exists() or (out / ".checkpoint.old").exists()
    proc = subprocess.Popen(_command(cfg, out, resume), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    seen, tail = 0, []
    assert proc.stderr is not None
    for line in proc.stderr:
        tail = (tail + [line])[-5:]
        if line.startswith("step "):
            seen = int(line.split()[1].split("/")[0])
            if kill_at is not None and seen >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
    rc = proc.wait()
    if kill_at is None and rc != 0:
        raise RuntimeError(f"difflab train failed ({rc}): {''.join(tail)}")
    return rc, seen


def kill_and_resume(work: Path, kills: int, steps: int = 40, seed: int = 0,
                    reference: Callable[[Path, Path], None] | None = None) -> dict:
    """Train ``steps`` steps uninterrupted and again with ``kills`` SIGKILLs at random steps,
    resumed each time; returns the figures (kills delivered, files identical, seconds).
    ``reference(config_path, out)`` trains the uninterrupted run (default: one more
    ``difflab train`` process)."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "toy.json"
    cfg.write_text(json.dumps(toy_config(steps)))
    if reference is None:
        run_until(cfg, work / "reference", None)
    else:
        reference(cfg, work / "reference")
    rng = random.Random(seed)
    targets = sorted(rng.randint(1, steps - 1) for _ in range(kills))
    killed = work / "killed"
    delivered, resumed_from = 0, []
    for target in targets:
        state = killed / "checkpoint" / "state.json"
        resumed_from.append(json.loads(state.read_text())["step"] if state.is_file() else 0)
        rc, seen = run_until(cfg, killed, target)
        delivered += rc == -signal.SIGKILL
    run_until(cfg, killed, None)
    same = {name: (work / "reference" / "checkpoint" / name).read_bytes()
            == (killed / "checkpoint" / name).read_bytes() for name in COMPARED}
    ref_state = json.loads((work / "reference" / "checkpoint" / "state.json").read_text())
    end_state = json.loads((killed / "checkpoint" / "state.json").read_text())
    same["state"] = all(ref_state[k] == end_state[k] for k in ("step", "rng", "ema_updates",
                                                               "data_order", "optimizer"))
    return {"kills": delivered, "kill_steps": targets, "resumed_from": resumed_from,
            "steps": steps, "identical": same, "all_identical": all(same.values()),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="directory (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = kill_and_resume(Path(args.work or tmp), args.kills, args.steps, args.seed)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["all_identical"] else 1)


if __name__ == "__main__":
    main()
