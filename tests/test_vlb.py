"""The variational bound (difflab.objectives.vlb): closed forms on a Gaussian, the discrete bound's
limit, the learned schedule trained by the trainer and restored from its checkpoint, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from difflab import schedules
from difflab.objectives import VLBObjective, variational_bound
from difflab.objectives.vlb import gamma_and_rate, vlb_grid
from difflab.schedules.learned import LearnedSchedule
from difflab.toy import GaussianMixture

F64 = torch.float64
M, S = 0.3, 0.5  # the 1-D data set N(M, S^2)


def gaussian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return M + S * torch.randn(n, 1, generator=g, dtype=F64)


def closed_form(schedule) -> float:
    """E_x of the continuous VLB with the exact denoiser and the 'gaussian' decoder (nats):
    prior + decoder + 0.5 log((1 + SNR_0 S^2) / (1 + SNR_1 S^2))."""
    with torch.no_grad():
        g0, g1 = (float(gamma_and_rate(schedule, torch.tensor(t, dtype=F64))[0]) for t in (0., 1.))
    a1, s1 = 1 / (1 + math.exp(g1)), 1 / (1 + math.exp(-g1))
    prior = 0.5 * (s1 + a1 * (M * M + S * S) - math.log(s1) - 1)
    recon = 0.5 * (math.log(2 * math.pi) + g0) + 0.5
    diffusion = 0.5 * math.log((1 + math.exp(-g0) * S * S) / (1 + math.exp(-g1) * S * S))
    return prior + recon + diffusion


def exact(schedule):
    return GaussianMixture(torch.tensor([[M]]), S).denoiser(schedule, "eps")


@pytest.mark.parametrize("init_std", [0.01, 2.0])
def test_continuous_vlb_of_the_exact_denoiser_equals_its_closed_form(init_std):
    # the continuous bound does not depend on the schedule's interior (VDM Eq. 18): two
    # interiors, one closed form
    schedule = LearnedSchedule(gamma_0=-6.0, gamma_1=6.0, hidden=16, init_std=init_std,
                               seed=3).requires_grad_(False)
    x = gaussian(20000)
    r = variational_bound(exact(schedule), x, decoder="gaussian",
                          generator=torch.Generator().manual_seed(1))
    se = float(r.total.std() / math.sqrt(len(x)))
    assert abs(float(r.total.mean()) - closed_form(schedule)) < 4 * se
    # it bounds the true negative log-likelihood
    nll = 0.5 * math.log(2 * math.pi * S * S) + 0.5
    assert closed_form(schedule) > nll


def discrete_exact(schedule, steps: int) -> float:
    """The discrete diffusion term of the exact denoiser, summed over the steps:
    0.5 sum_i expm1(gamma_i - gamma_{i-1}) SNR_i S^2 / (1 + SNR_i S^2)."""
    grid = vlb_grid(schedule, steps)
    with torch.no_grad():
        gam = gamma_and_rate(schedule, grid)[0]
    snr = torch.exp(-gam[1:])
    return float((0.5 * torch.expm1(gam[1:] - gam[:-1]) * snr * S * S / (1 + snr * S * S)).sum())


def test_discrete_bound_tends_to_the_continuous_one():
    schedule = LearnedSchedule(gamma_0=-6.0, gamma_1=6.0, hidden=16, init_std=1.0,
                               seed=0).requires_grad_(False)
    g0, g1 = -6.0, 6.0
    continuous = 0.5 * math.log((1 + math.exp(-g0) * S * S) / (1 + math.exp(-g1) * S * S))
    gaps = [discrete_exact(schedule, T) - continuous for T in (10, 100, 1000, 10000)]
    assert all(g > 0 for g in gaps)  # the discrete bound is looser
    for a, b in zip(gaps[1:], gaps[2:]):
        assert 9 < a / b < 11  # O(1/T)
    assert gaps[-1] < 1e-3 * continuous
    # the Monte-Carlo estimate of the discrete bound (antithetic times) matches the sum
    x = gaussian(20000, seed=2)
    for T in (10, 1000):
        r = variational_bound(exact(schedule), x, decoder="gaussian", steps=T,
                              generator=torch.Generator().manual_seed(5))
        se = float(r.diffusion.std() / math.sqrt(len(x)))
        assert abs(float(r.diffusion.mean()) - discrete_exact(schedule, T)) < 4 * se


def test_bad_input_is_named():
    den = exact(schedules.from_config({"type": "cosine_continuous"}))
    with pytest.raises(ValueError, match="no discrete form"):
        variational_bound(den, gaussian(4), steps="chain")
    with pytest.raises(ValueError, match="no discrete form"):
        VLBObjective(den.schedule, steps="chain")
    with pytest.raises(ValueError, match="steps must be"):
        variational_bound(den, gaussian(4), steps=0)
    with pytest.raises(ValueError, match="8-bit"):
        variational_bound(den, gaussian(4))  # the default decoder is VDM's 8-bit one
    with pytest.raises(ValueError, match="variance-preserving"):
        variational_bound(exact(schedules.from_config({"type": "edm"})), gaussian(4))


def test_vdm_decoder_on_8_bit_data_gives_bits_per_dim():
    # images on the 8-bit grid; a model whose t_0 is nearly clean decodes them almost surely
    schedule = LearnedSchedule(gamma_0=-13.3, gamma_1=5.0, hidden=8).requires_grad_(False)
    k = torch.randint(0, 256, (8, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    x = (2 * k / 255 - 1).to(F64)
    den = GaussianMixture(torch.zeros(1, 16), 0.5).denoiser(schedule, "eps")
    r = variational_bound(den, x.reshape(8, 16), generator=torch.Generator().manual_seed(0))
    # sigma~_0 = 1.3e-3: a pixel is decoded wrongly only past 3 sigma~ (half a bin, 3.9e-3)
    assert float(r.reconstruction.mean()) / 16 < 0.05
    assert torch.allclose(r.bits_per_dim, r.total / (16 * math.log(2)))


TOY = {
    "net": {"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "num_classes": None},
    "schedule": {"type": "cosine", "timesteps": 1000},
    "prediction": "eps",
    "data": {"name": "ring", "resolution": None, "channels": 2, "num_classes": None,
             "split": "train", "n": 256},
    "train": {"steps": 4, "batch_size": 32, "lr": 1e-2, "warmup": 0, "ema_decay": 0.9,
              "objective": "vlb", "grid_size": 0, "fit_steps": [], "log_every": 1},
}


def test_learned_schedule_trains_and_round_trips_through_a_checkpoint(tmp_path):
    from difflab.train import checkpoint as ckpt
    from difflab.train.config import apply_overrides
    from difflab.train.trainer import Trainer

    # the spelling: schedule.kind=learned -> {"type": "learned"} with its defaults
    cfg = apply_overrides(TOY, ["schedule.kind=learned", "train.objective=vlb"])
    assert cfg["schedule"] == {"type": "learned"}
    # the ring is not 8-bit data: the continuous decoder
    trainer = Trainer(cfg, tmp_path, objective=VLBObjective(
        schedules.from_config(cfg["schedule"]), "eps", decoder="gaussian"))
    schedule = trainer.modules["schedule"]
    assert "schedule" in trainer.objective.trainable
    before = {k: v.detach().clone() for k, v in schedule.state_dict().items()}
    n_params = sum(p.numel() for p in trainer.params)
    assert n_params == sum(p.numel() for p in trainer.net.parameters()) + sum(
        p.numel() for p in schedule.parameters())
    trainer.train_step()
    for name, p in schedule.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for _ in range(3):
        trainer.train_step()
    after = schedule.state_dict()
    for k in ("gamma_0", "log_gamma_span", "w2", "w3"):
        assert not torch.equal(before[k], after[k]), k  # endpoints and interior both moved
    assert {"vlb_bpd", "gamma_0", "gamma_1"} <= set(trainer.last_logs)
    path = trainer.save()
    assert (path / "schedule.safetensors").is_file() and (path / "schedule.json").is_file()
    den, _ = ckpt.load_denoiser(path)
    t = torch.linspace(0, 1, 33, dtype=F64)
    with torch.no_grad():
        assert torch.equal(den.schedule.gamma(t), schedule.gamma(t))
    # and a resumed trainer continues from the saved schedule
    resumed = Trainer(cfg, tmp_path, resume=True, objective=VLBObjective(
        schedules.from_config(cfg["schedule"]), "eps", decoder="gaussian"))
    with torch.no_grad():
        assert torch.equal(resumed.modules["schedule"].gamma(t), schedule.gamma(t))


def test_variance_trick_changes_only_the_interior_gradient():
    torch.manual_seed(0)
    from difflab.train.checkpoint import build_net

    net = build_net(TOY["net"])
    x = GaussianMixture.ring().sample(64, torch.Generator().manual_seed(0))[0].float()
    grads = {}
    for trick in (True, False):
        schedule = LearnedSchedule(gamma_0=-8.0, gamma_1=5.0, hidden=16, init_std=0.5).float()
        obj = VLBObjective(schedule, "eps", decoder="gaussian", variance_trick=trick)
        loss, _ = obj({"net": net, "schedule": schedule}, {"image": x},
                      torch.Generator().manual_seed(3))
        net.zero_grad()
        loss.backward()
        grads[trick] = {n: p.grad.clone() for n, p in schedule.named_parameters()}
    for n in ("gamma_0", "log_gamma_span"):  # endpoints: the bound's gradient either way
        assert torch.allclose(grads[True][n], grads[False][n], rtol=1e-6, atol=1e-12), n
    assert not torch.allclose(grads[True]["w2"], grads[False]["w2"])
