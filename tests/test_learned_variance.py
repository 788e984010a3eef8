"""Learned variances (Nichol & Dhariwal 2021): the hybrid loss's stop-gradient, the ddpm sampler's
learned variance at its endpoints, the discrete bound in bits/dim, and ``eval --nll`` on a tiny
checkpoint from the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from difflab import schedules
from difflab.denoiser import Denoiser
from difflab.objectives import HybridObjective, variational_bound
from difflab.samplers.ddpm import sample_ddpm
from difflab.toy import GaussianMixture

F64 = torch.float64
CHAIN = {"type": "cosine", "timesteps": 1000}


class Constant(nn.Module):
    """A network whose output ignores x: (mean part, r) from two parameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.mean = nn.Parameter(torch.randn(1, dim, dtype=F64))
        self.r = nn.Parameter(torch.randn(1, dim, dtype=F64))

    def forward(self, x, t):
        B = x.shape[0]
        return torch.cat([self.mean.expand(B, -1), self.r.expand(B, -1)], 1)


def grid_points(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    k = torch.randint(0, 256, (n, dim), generator=torch.Generator().manual_seed(seed))
    return (2 * k / 255 - 1).to(F64)


def test_hybrid_vlb_term_gives_no_gradient_to_the_mean():
    schedule = schedules.from_config(CHAIN)
    net = Constant(4)
    x = grid_points(64, 4)
    grads = {}
    for lam in (0.0, 0.001):
        obj = HybridObjective(schedule, "eps", lambda_vlb=lam)
        loss, logs = obj({"net": net}, {"image": x}, torch.Generator().manual_seed(0))
        net.zero_grad()
        loss.backward()
        grads[lam] = (net.mean.grad.clone(), net.r.grad.clone())
        assert {"simple", "vlb_bpd_term"} <= set(logs)
    # the mean's gradient is L_simple's alone; v's is L_vlb's alone
    assert torch.equal(grads[0.0][0], grads[0.001][0])
    assert torch.count_nonzero(grads[0.0][1]) == 0
    assert torch.count_nonzero(grads[0.001][1]) > 0


class WithV(nn.Module):
    """An exact network with a constant learned-variance channel r (v = (r + 1) / 2)."""

    def __init__(self, inner: nn.Module, r: float):
        super().__init__()
        self.inner, self.r = inner, r

    def forward(self, x, t):
        out = self.inner(x, t)
        return torch.cat([out, torch.full_like(out, self.r)], 1)


def models():
    schedule = schedules.from_config(CHAIN)
    mix = GaussianMixture.ring()
    plain = mix.denoiser(schedule, "eps")
    learned = {v: Denoiser(WithV(plain.net, 2 * v - 1), schedule, "eps", learned_variance=True)
               for v in (0.0, 1.0)}
    return plain, learned


@pytest.mark.parametrize("v, variance", [(1.0, "beta"), (0.0, "posterior")])
def test_ddpm_learned_variance_at_its_endpoints(v, variance):
    plain, learned = models()
    ts = torch.linspace(1, 0, 21, dtype=F64)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = sample_ddpm(plain, x, ts, variance=variance, generator=torch.Generator().manual_seed(1))
    got = sample_ddpm(learned[v], x, ts, variance="learned",
                      generator=torch.Generator().manual_seed(1))
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_learned_variance_needs_a_prediction_that_carries_one():
    plain, _ = models()
    with pytest.raises(ValueError, match="learned variance"):
        sample_ddpm(plain, torch.zeros(2, 2, dtype=F64), torch.tensor([1.0, 0.5, 0.0]),
                    variance="learned")


def test_discrete_bound_with_v_zero_is_the_fixed_variance_bound():
    # Sigma = beta~: the learned-variance KL is VDM's fixed-variance term
    plain, learned = models()
    x = grid_points(256, 2, seed=1)
    ref = variational_bound(plain, x, steps="chain", generator=torch.Generator().manual_seed(2))
    got = variational_bound(learned[0.0], x, steps="chain",
                            generator=torch.Generator().manual_seed(2))
    assert torch.allclose(got.diffusion, ref.diffusion, rtol=1e-4)  # two formulas, rounding
    assert torch.allclose(got.prior, ref.prior)
    # the decoders differ only in variance (beta_1 vs the clipped interpolation at v = 0)
    assert torch.isfinite(got.reconstruction).all()
    assert torch.allclose(got.bits_per_dim, got.total / (2 * torch.log(torch.tensor(2.0))))


def test_eval_nll_on_a_tiny_hybrid_checkpoint(tmp_path, capsys):
    from difflab.cli import main

    cfg = {"net": {"type": "unet", "in_channels": 1, "out_channels": 1, "model_channels": 8,
                   "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
                   "image_size": 8, "num_classes": None},
           "schedule": CHAIN, "prediction": "eps",
           "data": {"name": "digits", "resolution": 8, "channels": 1, "num_classes": 10},
           "train": {"steps": 2, "batch_size": 8, "log_every": 1, "grid_size": 0,
                     "threads": 1, "objective": "hybrid", "fit_steps": []}}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--quiet"]) == 0
    saved = json.loads((run / "checkpoint" / "net.json").read_text())
    assert saved["out_channels"] == 2  # the prediction and v
    capsys.readouterr()
    out_json = tmp_path / "nll.json"
    assert main(["eval", str(run), "--nll", "--count", "4", "--rtol", "1e-2",
                 "--batch-size", "4", "--out", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "ODE" in text and "VLB (chain)" in text and "bits/dim" in text
    res = json.loads(out_json.read_text())
    assert res["count"] == 4 and res["split"] == "test"
    for key in ("ode", "vlb", "vlb_chain"):
        assert res[key]["bits_per_dim"] > 0 and res[key]["stderr"] >= 0
    capsys.readouterr()
    assert main(["eval", str(run), "--nll", "--probes", "0"]) != 0
    assert "--probes must be an integer >= 1" in capsys.readouterr().err
    # the multistep solver in two worker processes gives the numbers of one process (each
    # batch has its own generator), with steps + 1 calls a batch
    figures = []
    for workers in ("1", "2"):
        out = tmp_path / f"nll_{workers}.json"
        assert main(["eval", str(run), "--nll", "--count", "8", "--batch-size", "4",
                     "--nll-solver", "multistep", "--nll-steps", "12", "--workers", workers,
                     "--dequantize", "decoder", "--out", str(out)]) == 0
        figures.append(json.loads(out.read_text())["ode"])
    assert figures[0]["bits_per_dim"] == figures[1]["bits_per_dim"]
    assert figures[0]["nfe"] == 2 * 13 and figures[1]["workers"] == 2
    assert "12 multistep steps" in capsys.readouterr().out
    for flags, message in [(["--nll-solver", "rk4"], "--nll-solver must be one of"),
                           (["--nll-steps", "1"], "--nll-steps must be an integer >= 2"),
                           (["--dequantize", "cells"], "--dequantize must be 'uniform' or"),
                           (["--workers", "0"], "--workers must be an integer >= 1")]:
        assert main(["eval", str(run), "--nll", *flags]) != 0
        assert message in capsys.readouterr().err
