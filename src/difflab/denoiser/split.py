"""Inference network calls split over CPU threads: one torch thread per part of the batch.

Inside :func:`split_batch`, each network call a :class:`~difflab.denoiser.Denoiser` makes
without gradients on a CPU tensor is cut into as many parts as torch has threads; the parts
run concurrently in Python threads with torch set to one thread (torch's kernels release the
GIL) and are joined in order. A small network's forward pass scales unevenly over torch's
intra-op threads (a 28x28 U-Net at batch 24 on 2 cores: 1.4x to 1.85x from one thread to two,
depending on the host's other load), while its parts share nothing. ``difflab tune-grid
--fast`` on 2 cores, alternated with the unsplit code: 57.2-57.5 s against 60.3-67.6 s
(docs/results/fit_fast.md, session 25; session 19 had found no gain in an earlier form).

A part's outputs are, to the bit, those of the same rows called alone on one thread; against
the whole batch on several threads they differ by float round-off (a kernel's blocking may
depend on its batch size and thread count). Calls that record gradients, calls to a network
in training mode (its dropout draws would interleave across threads, and a run would no
longer repeat itself), calls on another device and calls made from inside a part run as they
are. torch's thread count is process-wide, so it is lowered to 1 only while the parts run and
restored after; that is why splitting is opt-in: the commands turn it on (threads belong to
the caller, not to a library function).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

__all__ = ["split_batch", "call_net"]

_ENABLED: ContextVar[bool] = ContextVar("difflab_split_batch", default=False)
_POOL: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


@contextmanager
def split_batch(enabled: bool = True) -> Iterator[None]:
    """Within this context, split inference network calls over torch's CPU threads (module
    docstring); ``enabled=False`` turns splitting off inside an enclosing one."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if workers not in _POOL:
            _POOL[workers] = ThreadPoolExecutor(workers, thread_name_prefix="difflab-split")
        return _POOL[workers]


def _part(value: Any, batch: int, a: int, b: int) -> Any:
    """Rows a:b of a batch-first tensor of ``batch`` rows; anything else as it is."""
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch:
        return value[a:b]
    return value


def call_net(net: Callable[..., Tensor], x: Tensor, time_in: Any, **kwargs: Any) -> Tensor:
    """``net(x, time_in, **kwargs)``, split over torch's threads inside :func:`split_batch`
    when it records no gradients, runs on the CPU and ``net`` is in eval mode (module
    docstring)."""
    if (not _ENABLED.get() or torch.is_grad_enabled() or x.device.type != "cpu"
            or getattr(net, "training", False)):  # every call passes here: cheap tests first
        return net(x, time_in, **kwargs)
    B = x.shape[0]
    workers = min(torch.get_num_threads(), B)
    if workers < 2:
        return net(x, time_in, **kwargs)
    bounds = [(i * B // workers, (i + 1) * B // workers) for i in range(workers)]
    inference = torch.is_inference_mode_enabled()

    def run(ab: tuple[int, int]) -> Tensor:  # grad modes are per thread: the caller's here
        a, b = ab
        with torch.no_grad(), torch.inference_mode(inference):
            return net(x[a:b], _part(time_in, B, a, b),
                       **{k: _part(v, B, a, b) for k, v in kwargs.items()})

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outs = list(_pool(workers).map(run, bounds))
    finally:
        torch.set_num_threads(threads)
    return torch.cat(outs)
