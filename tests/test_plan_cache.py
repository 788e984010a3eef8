"""The default call's plan kept between runs (difflab.commands.plan_cache): a command probes a
model once; a changed model, guidance, condition or step count probes again; a broken
or unwritable cache never stops a run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from difflab import samplers as S
from difflab import schedules
from difflab.cli import main
from difflab.commands import plan_cache as C
from difflab.denoiser import Denoiser
from difflab.guidance import classifier_free
from difflab.samplers import probe as P


class Net(torch.nn.Module):
    """A small class-conditional network on 4-vectors (eps-prediction, output scaled down)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()
        self.emb = torch.nn.Embedding(3, 4).double()  # label -1 (null) is row 2

    def forward(self, x, t, labels=None):
        h = self.lin(x)
        if labels is not None:
            h = h + self.emb(labels % 3)
        return 0.1 * torch.tanh(h)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "cache"))
    P.clear_probe_cache()
    yield tmp_path / "cache" / "plans"
    P.clear_probe_cache()


def model():
    torch.manual_seed(0)
    den = Denoiser(Net(), schedules.cosine(), prediction="eps")
    calls = []
    den.net.register_forward_hook(lambda m, a, o: calls.append(int(a[0].shape[0])))
    return den, calls


def test_a_second_run_reads_the_plan_and_makes_only_the_fingerprint_calls(cache):
    den, calls = model()
    noise = torch.randn(3, 4, dtype=torch.float64)
    plan = C.default_plan(den, 4, noise)
    assert plan == S.default_plan(den, 4, noise)  # the probe's own choice
    assert len(list(cache.glob("*.json"))) == 1
    P.clear_probe_cache()  # a new process: nothing in memory
    calls.clear()
    again = C.default_plan(den, 4, noise)
    assert again == plan
    # 6 times x 2 draws read the model's behaviour; no probe solve, no rollout
    assert calls == [2] * 6
    # steps out of the probe's range, and DIFFLAB_CACHE=off: no file, the library's answer
    assert C.default_plan(den, 1, noise) is None and C.default_plan(den, 41, noise) is None
    assert len(list(cache.glob("*.json"))) == 1


def test_the_key_follows_the_model_guidance_condition_and_steps(cache):
    den, _ = model()
    noise = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    key = C.plan_key(den, 4, noise, labels)
    assert C.plan_key(copy.deepcopy(den), 4, noise, labels) == key  # saved elsewhere: the same
    assert C.plan_key(den, 4, torch.randn(5, 4, dtype=torch.float64), labels) == key  # the noise
    others = [C.plan_key(den, 5, noise, labels),
              C.plan_key(den, 4, noise, torch.tensor([1, 1, 0])),
              C.plan_key(den, 4, noise, None),
              C.plan_key(classifier_free(den, 2.0), 4, noise, labels),
              C.plan_key(classifier_free(den, 2.5), 4, noise, labels)]
    with torch.no_grad():
        den.net.lin.weight[0, 0] += 1e-3  # one more training step
    others.append(C.plan_key(den, 4, noise, labels))
    assert len({key, *others}) == len(others) + 1


def test_a_corrupt_or_unwritable_cache_never_stops_a_run(cache, tmp_path, monkeypatch):
    den, calls = model()
    noise = torch.randn(3, 4, dtype=torch.float64)
    plan = C.default_plan(den, 4, noise)
    (path,) = cache.glob("*.json")
    for junk in ("{not json", '{"format": "difflab-plan-1", "plan": {"sampler": "unipc"}}',
                 '{"format": "difflab-plan-1", "plan": {"sampler": "unipc", "ts": [0.5, 1]}}'):
        path.write_text(junk)
        P.clear_probe_cache()
        assert C.default_plan(den, 4, noise) == plan  # probed again, and written again
        assert C._read(path) == plan
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(C.CACHE_ENV, str(blocker))  # plans/ cannot be made under a file
    P.clear_probe_cache()
    assert C.default_plan(den, 4, noise) == plan
    monkeypatch.setenv(C.CACHE_ENV, "off")
    assert C.plan_cache_dir() is None
    assert C.default_plan(den, 4, noise) == plan


def test_sample_command_probes_once_and_writes_the_same_images(cache, tmp_path, capsys):
    from conftest import mlp_checkpoint

    ckpt = mlp_checkpoint(tmp_path / "run")
    outs = [tmp_path / f"s{i}.npy" for i in range(2)]
    for out in outs:
        P.clear_probe_cache()
        assert main(["sample", str(ckpt), "--out", str(out), "--count", "5", "--steps", "4",
                     "--npy-dtype", "float"]) == 0
        assert "a probe of this model chose" in capsys.readouterr().out
    assert len(list(cache.glob("*.json"))) == 1
    assert np.array_equal(np.load(outs[0]), np.load(outs[1]))
