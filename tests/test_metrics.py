"""Metrics: FID / KID / precision-recall against known answers, the feature networks, `eval`.

Tolerances come from the mathematics: float64 eigen-decompositions are exact to ~1e-10 for
well-conditioned matrices; Monte Carlo checks use 4 standard errors.
"""

import json
import math

import numpy as np
import pytest
import torch

from difflab.metrics import distances as D
from difflab.metrics.inception import FIDInceptionV3, load_inception


def _random_spd(d: int, g: torch.Generator, cond: float = 10.0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, math.log10(cond), d, dtype=torch.float64)
    return (Q * lam) @ Q.T


# --- FID -----------------------------------------------------------------------------------
def test_fid_diagonal_covariances_closed_form():
    """Diagonal (commuting) S: FID = ||mu1-mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2."""
    g = torch.Generator().manual_seed(0)
    d = 16
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g,
                                                                               dtype=torch.float64)
    s1 = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
    s2 = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum())
    fid = D.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert fid == pytest.approx(expected, rel=1e-10)


def test_fid_commuting_rotated_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: the same closed form holds."""
    g = torch.Generator().manual_seed(1)
    d = 12
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = torch.rand(d, generator=g, dtype=torch.float64) + 0.05
    b = torch.rand(d, generator=g, dtype=torch.float64) + 0.05
    S1, S2 = (Q * a) @ Q.T, (Q * b) @ Q.T
    mu = torch.zeros(d, dtype=torch.float64)
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert D.frechet_distance(mu, S1, mu, S2) == pytest.approx(expected, rel=1e-9)


def test_fid_non_commuting_2x2_closed_form():
    """For 2x2 PSD A = S1 S2 (eigenvalues >= 0): tr A^(1/2) = sqrt(tr A + 2 sqrt(det A))."""
    S1 = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    S2 = torch.tensor([[0.5, -0.2], [-0.2, 3.0]], dtype=torch.float64)
    A = S1 @ S2
    tr_sqrt = math.sqrt(float(A.trace()) + 2 * math.sqrt(float(torch.linalg.det(A))))
    mu1 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mu2 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + S1.trace() + S2.trace()) - 2 * tr_sqrt
    assert D.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(expected, rel=1e-12)


def test_fid_trace_sqrt_against_nonsymmetric_eigenvalues():
    """tr((S1 S2)^(1/2)) = sum sqrt(eig(S1 S2)) computed independently with a general eig."""
    g = torch.Generator().manual_seed(2)
    S1, S2 = _random_spd(20, g), _random_spd(20, g)
    lam = torch.linalg.eigvals(S1 @ S2)
    assert float(lam.imag.abs().max()) < 1e-8 * float(lam.real.abs().max())
    expected = float(lam.real.clamp_min(0).sqrt().sum())
    assert float(D.trace_sqrt_product(S1, S2)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_stats_match_torch_cov():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(3000, 32, generator=g) @ torch.randn(32, 32, generator=g) + 5.0
    s = D.gaussian_stats(f, batch_size=700)  # several batches
    torch.testing.assert_close(s.mu, f.double().mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(s.sigma, torch.cov(f.double().T), rtol=1e-9, atol=1e-9)
    assert D.fid_from_features(f, f) == pytest.approx(0.0, abs=1e-7)


def test_fid_sample_estimate_converges_to_closed_form():
    """Features drawn from N(mu_i, S_i): the sample FID approaches the closed form; the bias
    is O(d / N), so with N = 20000, d = 4 the error is well under 2%."""
    g = torch.Generator().manual_seed(4)
    S1 = torch.tensor([[1.0, 0.3, 0, 0], [0.3, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 0.5]],
                      dtype=torch.float64)
    S2 = torch.diag(torch.tensor([0.5, 1.5, 1.0, 1.0], dtype=torch.float64))
    mu1, mu2 = torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, 0, 0, -1.0],
                                                                   dtype=torch.float64)
    n = 20000
    x = mu1 + torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(S1).T
    y = mu2 + torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(S2).T
    exact = D.frechet_distance(mu1, S1, mu2, S2)
    assert D.fid_from_features(x, y) == pytest.approx(exact, rel=0.02)


def test_fid_rejects_mismatched_stats():
    with pytest.raises(ValueError, match="incompatible"):
        D.frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


# --- KID -----------------------------------------------------------------------------------
def test_mmd2_unbiased_matches_brute_force_definition():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g,
                                                                              dtype=torch.float64)

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert D.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_on_equal_distributions():
    """Mean of MMD^2_u over independent repetitions is within 4 standard errors of 0, while the
    biased V-statistic (diagonal included) is detectably positive with the same data."""
    g = torch.Generator().manual_seed(6)
    reps, m, d = 200, 30, 8
    u, v = [], []
    for _ in range(reps):
        x = torch.randn(m, d, generator=g, dtype=torch.float64)
        y = torch.randn(m, d, generator=g, dtype=torch.float64)
        u.append(D.mmd2_unbiased(x, y))
        kxx, kyy, kxy = D._poly_kernel(x, x), D._poly_kernel(y, y), D._poly_kernel(x, y)
        v.append(float(kxx.mean() + kyy.mean() - 2 * kxy.mean()))
    u, v = torch.tensor(u), torch.tensor(v)
    se_u = float(u.std() / math.sqrt(reps))
    assert abs(float(u.mean())) < 4 * se_u
    assert float(v.mean()) > 4 * float(v.std() / math.sqrt(reps))


def test_kid_detects_a_shift_and_reports_its_spread():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(600, 16, generator=g)
    y = torch.randn(600, 16, generator=g)
    same, same_std = D.kernel_inception_distance(x, y, subsets=20, subset_size=200)
    shifted, shifted_std = D.kernel_inception_distance(x, y + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 4 * same_std and same_std > 0
    assert shifted > 10 * shifted_std


# --- precision / recall --------------------------------------------------------------------
def _grid(offset: float) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    return torch.stack([i.flatten() + offset, j.flatten()], 1)


def test_knn_radii_match_brute_force():
    g = torch.Generator().manual_seed(8)
    f = torch.randn(50, 5, generator=g, dtype=torch.float64)
    d = torch.cdist(f, f)
    expected = d.sort(1).values[:, 3]  # column 0 is the point itself
    torch.testing.assert_close(D.knn_radii(f, k=3, batch_size=16), expected)


def test_precision_recall_on_hand_made_clouds():
    a, b = _grid(0.0), _grid(100.0)
    # identical sets: every point lies on a manifold point
    assert D.precision_recall(a, a.clone()) == (1.0, 1.0)
    # disjoint clouds: nothing is covered either way
    assert D.precision_recall(a, b) == (0.0, 0.0)
    # fake covers only half of the real modes: precise but recall 1/2
    real = torch.cat([a, b])
    p, r = D.precision_recall(real, torch.cat([a, a + 0.01]))
    assert p == 1.0 and r == 0.5
    # and the mirror image: fake spreads over a mode real lacks -> precision 1/2, recall 1
    p, r = D.precision_recall(a, torch.cat([a, b]))
    assert p == 0.5 and r == 1.0


# --- Inception-v3 FID network --------------------------------------------------------------
def test_inception_architecture_matches_pytorch_fid_layout():
    net = FIDInceptionV3()
    sd = net.state_dict()
    # torchvision inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696) and with
    # 1008 instead of 1000 classes (+8 * 2049) this is the FID network's 23,850,960
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in sd
    assert not any(k.startswith("AuxLogits") for k in sd)


def test_inception_loader_maps_a_saved_state_dict_exactly(tmp_path):
    from difflab.metrics.features import load_feature_net

    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    state = net.state_dict()
    # old pytorch-fid files lack the BatchNorm counters: save without them
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
               tmp_path / "pt_inception-2015-12-05-test.pth")
    loaded = load_inception(tmp_path / "pt_inception-2015-12-05-test.pth")
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded_state[k], v), k
    # compare at 75x75 (Inception's smallest input) to keep the test fast; FID uses 299
    net.resize_to = loaded.resize_to = 75
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.features(x), net.features(x))
    # through the metrics front door: gray uint8 images are repeated to RGB, size kept
    ext = load_feature_net(f"inception:{tmp_path / 'pt_inception-2015-12-05-test.pth'}")
    assert ext.net.resize_to == 299 and ext.feature_dim == 2048 and ext.label == "FID"
    ext.net.resize_to = 75
    u8 = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = net.features(u8.float().div(127.5).sub(1).expand(-1, 3, -1, -1))
    torch.testing.assert_close(ext(u8), expected, rtol=1e-5, atol=1e-5)
    # a state dict of another network is refused with the keys named
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="missing"):
        load_inception(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_inception(tmp_path / "absent.pth")


def test_pytorch_fid_resize_order_is_equivalent():
    """pytorch-fid resizes (0,1) input to 299 and then maps 2x-1; we resize [-1,1] input.
    Bilinear interpolation is linear and preserves constants, so both orders agree."""
    import torch.nn.functional as F

    u = torch.rand(2, 3, 28, 28, dtype=torch.float64)
    a = 2 * F.interpolate(u, size=(299, 299), mode="bilinear", align_corners=False) - 1
    b = F.interpolate(2 * u - 1, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --- shipped feature networks --------------------------------------------------------------
@pytest.mark.parametrize("name,dataset,minimum,n_test", [("fmnist", "fashion_mnist", 0.91, 3000),
                                                         ("mnist", "mnist5k", 0.98, 500)])
def test_shipped_classifiers_load_and_reach_their_accuracy(name, dataset, minimum, n_test):
    """On the test split (disjoint from the training split; a class-balanced random slice of
    Fashion-MNIST's 10,000 to keep the test fast, all 500 of MNIST 5k, where the JSON's
    number is checked exactly: the network is deterministic in eval mode)."""
    from difflab.data import load_dataset
    from difflab.metrics import class_metrics, classifier_accuracy, load_feature_net
    from difflab.metrics.features import ASSETS, SHIPPED

    weights = ASSETS / f"{SHIPPED[name]}.safetensors"
    assert weights.stat().st_size < 2_000_000
    ext = load_feature_net(name)
    assert ext.meta["dataset"] == dataset and ext.meta["train_split"] == "train"
    test = load_dataset(dataset, split="test")
    assert ext.meta["test_accuracy"] >= minimum and ext.meta["test_size"] == len(test)
    if n_test < len(test):
        test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
                           [:n_test])
    c = class_metrics(test.images, test.labels, feature_net=name)
    assert c["accuracy"] >= minimum
    if n_test == ext.meta["test_size"]:
        assert c["accuracy"] == pytest.approx(ext.meta["test_accuracy"], abs=2e-4)
    # the test split is class-balanced: the predicted-class histogram has near-maximal entropy
    assert c["entropy"] > 0.99 * math.log(10) and sum(c["histogram"]) == len(test)
    sl = slice(0, 100)
    expected = float((ext.logits(test.images[sl]).argmax(1) == test.labels[sl]).float().mean())
    assert classifier_accuracy(test.images[sl], test.labels[sl], name) == expected
    # a single-class set has entropy 0 (mode collapse)
    one = test.images[test.labels == 1][:50]
    assert class_metrics(one, torch.full((one.shape[0],), 1), feature_net=name)["entropy"] < 0.3
    # float [-1, 1] input gives the same features as uint8 (the 8-bit quantisation is exact)
    x = test.images[:64]
    torch.testing.assert_close(ext(x.float() / 127.5 - 1), ext(x))


def test_feature_preprocessing_refuses_wrong_ranges():
    from difflab.metrics.features import load_feature_net, prepare_images

    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        prepare_images(torch.rand(2, 1, 28, 28) * 255, 28, 1)
    with pytest.raises(ValueError, match="valid"):
        load_feature_net("resnet")
    with pytest.raises(FileNotFoundError, match="DIFFLAB_INCEPTION_WEIGHTS"):
        import os

        os.environ.pop("DIFFLAB_INCEPTION_WEIGHTS", None)
        load_feature_net("inception")


def test_evaluate_orders_clean_noisy_and_caches_reference(tmp_path, monkeypatch):
    """FID-FMNIST: a disjoint real subset scores lower than the same images with noise; the
    reference statistics are written once and reused (keyed by data set, split, net, n)."""
    from difflab.data import load_dataset
    from difflab.metrics import evaluate
    from difflab.metrics.reference import cache_dir

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    test = load_dataset("fashion_mnist", split="test").images[:500]
    clean = evaluate(test, "fashion_mnist", "fmnist", n=500, kid_subsets=10)
    files = sorted(cache_dir().glob("fashion_mnist-train-fmnist-*-n500-s0.safetensors"))
    assert len(files) == 1
    meta = json.loads(files[0].with_suffix(".json").read_text())
    assert meta["n"] == 500 and meta["split"] == "train" and meta["feature_net"] == "fmnist"
    g = torch.Generator().manual_seed(0)
    noisy = (test.float() / 127.5 - 1 + 0.3 * torch.randn(test.shape, generator=g)).clamp(-1, 1)
    bad = evaluate(noisy, "fashion_mnist", "fmnist", n=500, kid_subsets=10)
    assert len(list(cache_dir().glob("*.safetensors"))) == 1  # reused, not recomputed
    assert bad["fid"] > 5 * clean["fid"] and bad["kid"] > clean["kid"] + 4 * bad["kid_std"]
    assert clean["precision"] > bad["precision"] and clean["label"] == "FID-FMNIST"
    # a stats file is a valid reference and gives the same FID
    again = evaluate(test, str(files[0]), "fmnist", kid_subsets=10)
    assert again["fid"] == pytest.approx(clean["fid"], rel=1e-12)
    with pytest.raises(ValueError, match="feature network"):
        evaluate(test, str(files[0]), "mnist")


# --- difflab eval --------------------------------------------------------------------------
def _stats_file(tmp_path):
    from difflab.data import load_dataset
    from difflab.metrics.features import load_feature_net
    from difflab.metrics.reference import reference_from_images, save_reference

    real = load_dataset("fashion_mnist", split="test").images[:300]
    ref = reference_from_images(real, load_feature_net("fmnist"),
                                meta={"feature_net": "fmnist", "dataset": "test[:300]"})
    return save_reference(ref, tmp_path / "ref")


def test_eval_cli_on_npy_writes_json(tmp_path, capsys):
    from difflab.cli import main
    from difflab.data import load_dataset

    ref = _stats_file(tmp_path)
    imgs = load_dataset("fashion_mnist", split="test").images[300:500]
    np.save(tmp_path / "x.npy", imgs.permute(0, 2, 3, 1).numpy())  # uint8 NHWC
    assert main(["eval", str(tmp_path / "x.npy"), "--reference", str(ref),
                 "--kid-subsets", "5", "--out", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    rec = out["results"][0]
    assert out["label"] == "FID-FMNIST" and rec["n"] == 200 and rec["n_ref"] == 300
    assert 0 < rec["fid"] < 50 and 0 <= rec["precision"] <= 1 and "classes" in rec
    assert "FID-FMNIST" in capsys.readouterr().out
    # bad input: a clear error, exit code 2
    assert main(["eval", str(tmp_path / "absent.npy"), "--reference", str(ref)]) == 2


def test_eval_cli_sweeps_a_checkpoint(tmp_path):
    from difflab import schedules
    from difflab.cli import main
    from difflab.nets import build
    from difflab.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = build({"type": "unet", "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2],
                 "num_res_blocks": 1, "attention_resolutions": [], "image_size": 28,
                 "num_classes": 10})
    config = {"net": net.config, "schedule": schedules.linear().config(), "prediction": "eps",
              "sigma_data": 0.5, "data": {"name": "fashion_mnist", "resolution": 28,
                                          "channels": 1, "num_classes": 10}, "train": {}}
    sd = net.state_dict()
    save_checkpoint(tmp_path / "ckpt", config=config, model=sd, ema=sd)
    ref = _stats_file(tmp_path)
    rc = main(["eval", str(tmp_path / "ckpt"), "--reference", str(ref), "--num", "12",
               "--batch-size", "6", "--sampler", "ddim,dpmpp_2m", "--steps", "2,3",
               "--guidance", "1.5", "--kid-subsets", "3", "--out", str(tmp_path / "e.json"),
               "--plot", str(tmp_path / "e.png")])
    assert rc == 0
    res = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [(r["sampler"], r["steps"]) for r in res] == [("ddim", 2), ("ddim", 3),
                                                        ("dpmpp_2m", 2), ("dpmpp_2m", 3)]
    for r in res:  # classifier-free guidance evaluates the network twice per step
        assert r["nfe"] == 2 * r["nfe_expected"] == 2 * r["steps"]
        assert r["network_calls_per_batch"] == r["steps"]
        assert math.isfinite(r["fid"]) and r["classes"]["histogram"] and r["seconds"] > 0
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_reference_cache_key_changes_with_the_feature_network():
    """Stale statistics are never reused: the key hashes the config (feature_scale) too."""
    from difflab.metrics.features import load_feature_net
    from difflab.metrics.reference import _net_fingerprint

    ext = load_feature_net("mnist")
    before = _net_fingerprint(ext)
    scale = ext.net.feature_scale
    try:
        ext.net.set_feature_scale(2 * scale)
        assert _net_fingerprint(ext) != before
    finally:
        ext.net.set_feature_scale(scale)
    assert _net_fingerprint(ext) == before


def test_eval_reads_npy_layouts(tmp_path):
    from difflab.commands.images import load_images

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (4, 1, 28, 28), generator=g, dtype=torch.uint8)
    for name, arr in [("nchw", u8), ("nhwc", u8.permute(0, 2, 3, 1)), ("nhw", u8[:, 0]),
                      ("float", u8.float() / 127.5 - 1)]:
        np.save(tmp_path / f"{name}.npy", arr.numpy())
        x, labels = load_images(tmp_path / f"{name}.npy")
        assert labels is None and x.shape == (4, 1, 28, 28)
        expected = u8 if x.dtype == torch.uint8 else u8.float() / 127.5 - 1
        torch.testing.assert_close(x, expected)
    np.save(tmp_path / "bad.npy", np.zeros((4, 28), np.int64))
    with pytest.raises(ValueError, match="NHW"):
        load_images(tmp_path / "bad.npy")
