"""What a training run shows and leaves behind: a progress bar (for the caller: the trainer
reports through ``callback(record)`` and never prints; a :class:`ProgressBar` is such a
callback), a JSONL metrics log, sample grids (PNG) and a loss-curve plot (matplotlib if
installed, else drawn with PIL).

The trainer's records (:class:`difflab.train.trainer.Trainer`), each a dict with an "event":

    start       step, total, budget_s          before the first step (step > 0 after resume)
    step        step, total, seconds           after every optimizer step (no device sync)
    log         step, loss, lr, images_per_s, seconds, and the objective's logs
                                               every train.log_every steps (also metrics.jsonl)
    checkpoint  step, path                     a checkpoint was saved
    samples     step, path                     a sample grid was saved
    message     text                           something worth telling (a skipped fit, a fit)
    end         summary                        the run's summary
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from torch import Tensor

import difflab.files as files

__all__ = ["ProgressBar", "MetricsLog", "to_uint8", "save_grid", "save_points",
           "plot_loss", "read_metrics"]


class ProgressBar:
    """``step 120/1000 [####------] loss 0.0412  312 img/s  0:41 / 10:00`` on one line (the bar
    fills with the larger of steps done and wall-clock budget spent).

    Called with the trainer's records (``bar(record)``, the module docstring) it is the
    trainer's ``callback``: on a terminal it redraws after every step, elsewhere it writes a
    line at every logged step; messages go on their own lines. ``total`` and ``budget_s`` may
    be left out: the "start" record brings them."""

    def __init__(self, total: int | None = None, stream: TextIO | None = None, width: int = 24,
                 enabled: bool = True, budget_s: float = math.inf):
        self.total, self.width, self.enabled, self.budget_s = total, width, enabled, budget_s
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._loss, self._ips = float("nan"), 0.0

    def update(self, step: int, loss: float, images_per_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        total = self.total or max(step, 1)
        frac = min(1.0, max(step / max(1, total), el / self.budget_s))
        filled = int(frac * self.width)
        clock = f"{int(el) // 60}:{int(el) % 60:02d}"
        if math.isfinite(self.budget_s):  # a wall-clock budget: show time of budget
            b = int(self.budget_s)
            clock += f" / {b // 60}:{b % 60:02d}"
        line = (f"step {step}/{total} [{'#' * filled}{'-' * (self.width - filled)}] "
                f"loss {loss:.4f}  {images_per_s:.0f} img/s  {clock}{extra}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def __call__(self, record: dict[str, Any]) -> None:
        """Show one of the trainer's records."""
        event = record.get("event")
        if event == "start":
            self.total = int(record.get("total") or self.total or 0) or None
            budget = record.get("budget_s")
            self.budget_s = math.inf if budget is None else float(budget)
            self.t0 = time.perf_counter()
        elif event == "log":
            self._loss, self._ips = float(record["loss"]), float(record["images_per_s"])
            self.update(int(record["step"]), self._loss, self._ips)
        elif event == "step" and self.tty:
            self.update(int(record["step"]), self._loss, self._ips)
        elif event == "message" and self.enabled:
            if self.tty:
                self.stream.write("\n")
            self.stream.write(str(record["text"]) + "\n")
            self.stream.flush()
        elif event == "end":
            self.close()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLog:
    """Append one JSON object per line to ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records beyond ``step`` (after resuming from a checkpoint at ``step``)."""
        if not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        files.write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode(),
                          what="metrics log")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                continue
    return out


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (NCHW float) -> uint8 NHWC (:func:`difflab.data.to_uint8`, then
    channels last)."""
    from difflab.data.dataset import to_uint8 as to_uint8_nchw

    return to_uint8_nchw(x.detach().cpu().clamp(-1, 1)).permute(0, 2, 3, 1).contiguous()


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, pad: int = 2,
              scale: int = 1) -> Path:
    """Tile images (NCHW in [-1, 1]) into one PNG; ``scale`` enlarges with nearest pixels."""
    from PIL import Image

    u8 = to_uint8(images).numpy()
    n, h, w, c = u8.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y:y + h, x:x + w] = u8[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return files.write_bytes(path, files.png_bytes(img), what="sample grid")


def save_points(points: Tensor, path: str | Path, size: int = 256, extent: float = 2.0
                ) -> Path:
    """Scatter 2-D samples (N, 2) into a PNG (for toy data)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    p = points.detach().float().cpu().numpy()
    xy = (p / extent * 0.5 + 0.5) * (size - 1)
    for x, y in xy:
        draw.point((float(x), float(size - 1 - y)), fill=0)
    return files.write_bytes(path, files.png_bytes(img), what="sample plot")


def plot_loss(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Loss against step (log scale), with a moving average; matplotlib if available."""
    steps = np.array([r["step"] for r in records if "loss" in r], dtype=float)
    loss = np.array([r["loss"] for r in records if "loss" in r], dtype=float)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if len(loss) else loss
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, loss, alpha=0.35, label="loss")
        if len(smooth):
            ax.plot(steps[k - 1:], smooth, label=f"moving average ({k})")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return files.write_bytes(path, buf.getvalue(), what="loss plot")
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    W, H, m = 600, 350, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((m, m // 2, W - m // 2, H - m), outline="black")
    if len(loss) >= 2:
        ly = np.log10(np.maximum(loss, 1e-12))
        lo, hi = ly.min(), max(ly.max(), ly.min() + 1e-6)
        x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)

        def pt(s: float, v: float) -> tuple[float, float]:
            return (m + (s - x0) / (x1 - x0) * (W - 1.5 * m),
                    H - m - (v - lo) / (hi - lo) * (H - 1.5 * m))

        d.line([pt(s, v) for s, v in zip(steps, ly)], fill=(120, 160, 220))
        d.text((m, H - m + 5), f"step {int(x0)} .. {int(x1)}; log10 loss {lo:.2f} .. {hi:.2f}",
               fill="black")
    return files.write_bytes(path, files.png_bytes(img), what="loss plot")
