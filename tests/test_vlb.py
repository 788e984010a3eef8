"""The variational bound (difflab.objectives.vlb): closed forms on a Gaussian, the discrete bound's
limit, the learned schedule trained by the trainer and restored from its checkpoint, bad input;
the second-order score matching term's closed form on a Gaussian."""

from __future__ import annotations

import math

import pytest
import torch

from difflab import schedules
from difflab.denoiser import BaseDenoiser, Prediction
from difflab.objectives import VLBObjective, variational_bound
from difflab.objectives.vlb import gamma_and_rate, second_order_dsm, vlb_grid
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


class _LinearEps(BaseDenoiser):
    """eps_hat(z_t) = k z_t: on data N(0, c^2) the exact denoiser is k* = sigma / (alpha^2 c^2
    + sigma^2), and r = eps - k z_t ~ N(0, 1 - 2 k sigma + k^2 (alpha^2 c^2 + sigma^2))."""

    def __init__(self, schedule, k: float):
        super().__init__()
        self.schedule = schedule
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=F64))

    def predict(self, x, t, cond=None):
        gamma = gamma_and_rate(self.schedule, t)[0]
        a, s = (torch.sigmoid(-gamma).sqrt().view(-1, 1), torch.sigmoid(gamma).sqrt().view(-1, 1))
        return Prediction(x, None, self.k * x, a, s)


def test_second_order_dsm_has_its_closed_form_and_vanishes_in_gradient_at_the_exact_model():
    # 1-D data N(0, c^2), fixed time: with a = 1 - sigma k and r ~ N(0, s_r^2) the term is
    # gamma' (a - r^2)^2 (F = v (a - r^2), v^2 = 1, D = 1), mean gamma' (a^2 - 2 a s_r^2 + 3 s_r^4);
    # its gradient in k reaches the Jacobian only (r has none): -2 sigma gamma' (a - s_r^2),
    # zero at k* exactly (Cov[eps | z] = 1 - sigma k*, Lu et al. 2022)
    c, n, u = 0.6, 400_000, 0.4
    schedule = schedules.cosine()
    g = torch.Generator().manual_seed(5)
    x = c * torch.randn(n, 1, generator=g, dtype=F64)
    eps = torch.randn(n, 1, generator=g, dtype=F64)
    v = torch.randint(0, 2, (n, 1), generator=g).to(F64) * 2 - 1
    gamma, rate = (float(q) for q in gamma_and_rate(schedule, torch.tensor(u, dtype=F64)))
    alpha2, sigma = 1 / (1 + math.exp(gamma)), math.sqrt(1 / (1 + math.exp(-gamma)))
    k_star = sigma / (alpha2 * c * c + sigma * sigma)
    for k in (0.7 * k_star, k_star):
        den = _LinearEps(schedule, k)
        term = second_order_dsm(den, x, torch.full((n,), u, dtype=F64), eps, v)
        a = 1 - sigma * k
        s2 = 1 - 2 * k * sigma + k * k * (alpha2 * c * c + sigma * sigma)
        se = float(term.detach().std()) / math.sqrt(n)
        assert abs(float(term.detach().mean()) - rate * (a * a - 2 * a * s2 + 3 * s2 * s2)) < 4 * se
        term.mean().backward()
        r2 = (eps - k * (math.sqrt(alpha2) * x + sigma * eps)) ** 2
        se_grad = float((-2 * sigma * rate * (a - r2)).std()) / math.sqrt(n)
        expected = -2 * sigma * rate * (a - s2)
        assert abs(float(den.k.grad) - expected) < 4 * se_grad
        if k == k_star:
            assert abs(expected) < 1e-12
        else:
            assert abs(expected) > 20 * se_grad  # a test that can fail: the wrong k is seen


def test_vlb_objective_with_the_second_order_term_trains_a_unet():
    # the term runs through a U-Net with attention (forward-mode AD: a JVP per example), adds
    # to the loss, is logged apart from the bound and reaches every network weight
    from difflab.train.checkpoint import build_net

    torch.manual_seed(0)
    net = build_net({"type": "unet", "image_size": 8, "in_channels": 1, "out_channels": 1,
                     "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                     "attention_resolutions": [4], "num_heads": 2})
    schedule = LearnedSchedule(gamma_0=-8.0, gamma_1=5.0, hidden=16, init_std=0.5).float()
    x = (torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
         .float() * 2 / 255 - 1)
    out = {}
    for lam in (0.0, 1.0):
        obj = VLBObjective(schedule, "v", second_order=lam)
        loss, logs = obj({"net": net, "schedule": schedule}, {"image": x},
                         torch.Generator().manual_seed(3))
        out[lam] = (float(loss), logs)
    assert "dsm2_bpd" in out[1.0][1] and "dsm2_bpd" not in out[0.0][1]
    # the same times and noise: the bound is unchanged, the loss is bound + lambda term
    assert out[1.0][1]["vlb_bpd"] == pytest.approx(float(out[0.0][1]["vlb_bpd"]), rel=1e-6)
    assert out[1.0][0] == pytest.approx(float(out[1.0][1]["vlb_bpd"] + out[1.0][1]["dsm2_bpd"]),
                                        rel=1e-5)
    net.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ValueError, match="second_order"):
        VLBObjective(schedule, "v", second_order=-1.0)
    with pytest.raises(ValueError, match="discrete"):
        VLBObjective(schedules.cosine(), "v", steps=10, second_order=1.0)


def test_a_resumed_run_takes_a_train_key_newer_than_its_config():
    # `difflab train --resume --set train.second_order=1` on a run made before the key existed
    from difflab.commands.validate import ParameterError, check_overrides

    old = {"kind": "diffusion", "train": {"objective": "vlb", "lr": 2e-3}}
    check_overrides(old, ["train.second_order=1.0"])
    with pytest.raises(ParameterError, match="did you mean train.second_order"):
        check_overrides(old, ["train.second_ordr=1.0"])
