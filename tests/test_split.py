"""Inference network calls split over CPU threads (difflab.denoiser.split)."""

import json
import threading

import numpy as np
import pytest
import torch
from torch import nn

import difflab
from difflab.cli import main
from difflab.denoiser import Condition, Denoiser, split, split_batch
from difflab.schedules import cosine


class Recorder(nn.Module):
    """A per-sample network (x * (1 + t) + the label's embedding) that records, per call, the
    batch size, the torch thread count and the Python thread it ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 1)
        self.calls: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()

    def forward(self, x, t, labels=None):
        with self.lock:
            self.calls.append((x.shape[0], torch.get_num_threads(),
                               threading.current_thread().name))
        out = x * (1 + t.view(-1, 1, 1, 1))
        if labels is not None:
            out = out + self.embed(labels).view(-1, 1, 1, 1)
        return out


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_split_call_equals_the_whole_batch_and_runs_one_thread_per_part(two_threads):
    net = Recorder().eval()
    den = Denoiser(net, cosine(), prediction="eps")
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.2, 0.9, 5)
    cond = Condition(labels=torch.tensor([0, 1, 2, 3, 4]))
    with torch.no_grad():
        whole = den.predict(x, t, cond).x0
        assert [c[0] for c in net.calls] == [5]
        net.calls.clear()
        with split_batch():
            parts = den.predict(x, t, cond).x0
    # the labels and per-sample times were cut with the batch: the rows are the same rows
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6)
    assert sorted(c[0] for c in net.calls) == [2, 3]
    assert all(c[1] == 1 for c in net.calls)  # one torch thread per part while they ran
    assert all(c[2].startswith("difflab-split") for c in net.calls)
    assert torch.get_num_threads() == 2  # restored


def test_no_split_with_gradients_in_training_mode_one_thread_or_outside_the_context(
        two_threads):
    net = Recorder().eval()
    den = Denoiser(net, cosine(), prediction="v")
    x = torch.randn(4, 1, 4, 4)
    with split_batch():
        den.predict(x.requires_grad_(), 0.5).x0.sum().backward()  # training: as it is
        assert [c[:2] for c in net.calls] == [(4, 2)]
        net.calls.clear()
        with torch.no_grad(), split_batch(False):
            den.predict(x, 0.5)
        net.train()  # dropout would draw across threads: a training-mode net is not split
        with torch.no_grad():
            den.predict(x, 0.5)
        net.eval()
        torch.set_num_threads(1)
        with torch.no_grad():
            den.predict(x, 0.5)
    assert [c[0] for c in net.calls] == [4, 4, 4]
    assert all(c[2] == threading.current_thread().name for c in net.calls)


def test_a_sampler_inside_the_context_gives_each_parts_own_samples(two_threads):
    """A whole DDIM run through split calls is, to the bit, the run of each part alone on one
    thread: splitting changes which rows share a call, nothing else."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16),
                         nn.Unflatten(1, (1, 4, 4)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, x, t):
            sizes.append(x.shape[0])
            return self.body(x) * (1 + t.view(-1, 1, 1, 1))

    sizes: list[int] = []
    den = Denoiser(Net().eval(), cosine(), prediction="v")
    noise = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with split_batch():
            split = difflab.sample(den, noise, sampler="ddim", steps=8)
        torch.set_num_threads(1)
        alone = torch.cat([difflab.sample(den, noise[:3], sampler="ddim", steps=8),
                           difflab.sample(den, noise[3:], sampler="ddim", steps=8)])
    assert torch.equal(split, alone)
    assert sizes[:2] == [3, 3] and set(sizes) == {3}  # every call was split, then halves alone


def test_difflab_sample_splits_a_guided_unets_calls_and_keeps_its_images(tmp_path, two_threads,
                                                                          monkeypatch):
    """`difflab sample` with classifier-free guidance on a trained class-conditional U-Net: with
    two torch threads its network calls are split (labels and the guided batch cut with the
    images), and its images are those of the same command on one thread, unsplit, to float
    round-off."""
    unet = {"type": "unet", "in_channels": 1, "out_channels": 1, "model_channels": 8,
            "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
            "image_size": 8, "num_classes": None}
    cfg = {"net": unet, "schedule": {"type": "cosine", "timesteps": 1000}, "prediction": "v",
           "data": {"name": "digits", "resolution": 8, "channels": 1, "num_classes": 10},
           "train": {"steps": 3, "batch_size": 8, "log_every": 1, "sample_steps": 2,
                     "grid_size": 10, "target": "v"}}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "tiny.json"), "--out", str(run), "--quiet",
                 "--conditional", "--steps", "2", "--threads", "1"]) == 0
    parts: list[int] = []
    pool = split._pool
    monkeypatch.setattr(split, "_pool", lambda workers: parts.append(workers) or pool(workers))
    outs = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        npy = tmp_path / f"t{threads}.npy"
        assert main(["sample", str(run), "--out", str(npy), "--count", "6", "--steps", "4",
                     "--sampler", "dpmpp_2m", "--cfg", "1.5", "--label", "3", "--seed", "11",
                     "--npy-dtype", "float"]) == 0
        outs[threads] = np.load(npy)
        if threads == 2:
            assert parts and set(parts) == {2}  # every guided call of the sampler, split
            parts.clear()
    assert not parts  # one thread: nothing split
    np.testing.assert_allclose(outs[2], outs[1], rtol=0, atol=1e-5)
