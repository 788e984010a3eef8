"""Bits/dim on the Fashion-MNIST test set for the models trained with one budget:

    (a) cosine   the preset (cosine chain, v-prediction, min-SNR) on the usual loss
    (b) cosine   the same model trained on the continuous VLB (train.objective=vlb)
    (c) learned  VDM's learned schedule on the VLB (schedule.kind=learned, train.objective=vlb)
    (d) hybrid   the learned-variance DDPM (train.objective=hybrid: L_simple + 0.001 L_vlb)
    (e) learned  (c) with VDM's network input, the normalised gamma(t) instead of t
                 (schedule time_input="gamma"; run it by name: --model e_learned_vlb_gamma_input)

For each: the probability-flow ODE's bits/dim (difflab.likelihood.log_likelihood, 1 Hutchinson
probe, uniform dequantisation, its standard error over the images), the VLB's bits/dim
(difflab.objectives.variational_bound: the continuous bound and, on the chain models, the
chain's own discrete bound; one antithetic time per image), their CPU seconds per image, and FID
(difflab.commands.eval.evaluate, the default solver at 10 steps, against the test split).

    python bench/likelihood.py --steps 300 --ode-count 32 --vlb-count 500 --fid-count 500

One torch thread per process (torch.set_num_threads(1)); ``--model`` runs one of them (the
benchmark ran two processes side by side on the shared 2-core machine). Results go to
``--out``/<model>.json; ``--report`` prints the table from them.

On a GPU (``--device cuda``, ``--batch-size``, ``--ode-batch``): the same four models and
measurements, wall-clock seconds instead of CPU seconds, and ``--preset RUN --preset-count N``
measures the ODE bits/dim of a trained preset run on N test images (the full test set: 10,000)
with its standard error. ``--ode-seconds S`` stops each ODE measurement from starting a new
batch S seconds after it began (its image count is reported).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "a_cosine_simple": [],
    "b_cosine_vlb": ["train.objective=vlb"],
    "c_learned_vlb": ["schedule.kind=learned", "train.objective=vlb"],
    # (c) with VDM's network input: the normalised gamma(t) instead of t (LearnedSchedule)
    "e_learned_vlb_gamma_input": ['schedule={"type": "learned", "time_input": "gamma"}',
                                  "train.objective=vlb"],
    "d_hybrid_learned_variance": ["train.objective=hybrid"],
}


def test_images(n: int, seed: int = 0) -> torch.Tensor:
    from difflab.train.trainer import load_training_data

    data = load_training_data({"name": "fashion_mnist", "resolution": 28, "channels": 1,
                               "num_classes": 10, "split": "test"})
    x = data[0] if isinstance(data, tuple) else data["image"]
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx].float()


def _clock(device: str) -> float:
    """CPU seconds of the process on the CPU; wall seconds (after a sync) on a GPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def train(name: str, out: Path, steps: int, device: str = "cpu",
          batch_size: int | None = None) -> dict:
    from difflab.train.config import apply_overrides, load_config
    from difflab.train.trainer import Trainer

    extra = [] if batch_size is None else [f"train.batch_size={batch_size}"]
    cfg = apply_overrides(load_config("fashion_mnist"), MODELS[name] + extra + [
        f"train.steps={steps}", "train.max_minutes=600", "train.fit_steps=[]",
        "train.grid_size=0", "train.sample_every=0", "train.ckpt_every=0"])
    trainer = Trainer(cfg, out / name, device=device)
    t0 = time.process_time()
    w0 = time.time()
    trainer.run()
    path = trainer.save()
    return {"checkpoint": str(path), "train_cpu_s": time.process_time() - t0,
            "train_wall_s": time.time() - w0, "steps": trainer.step,
            "last_logs": {k: float(v) for k, v in trainer.last_logs.items()}}


def ode_batch(den, x: torch.Tensor, *, rtol: float, seed: int, solver: str = "dopri5",
              dequantize: str = "uniform", steps: int | None = None):
    """The ODE likelihood of one batch: 1 Rademacher probe, ``dequantize`` (uniform or by the
    decoder), rtol = atol (or the multistep solver's ``steps``, default its MULTISTEP_STEPS),
    the dequantisation noise and probe from a CPU generator of ``seed``."""
    from difflab.likelihood import MULTISTEP_STEPS, log_likelihood

    return log_likelihood(den, x, probes=1, rtol=rtol, atol=rtol, dequantize=dequantize,
                          generator=torch.Generator().manual_seed(seed), solver=solver,
                          steps=MULTISTEP_STEPS if steps is None else steps)


def ode_figures(den, x: torch.Tensor, *, rtol: float, batch: int = 16, device: str = "cpu",
                deadline: float | None = None) -> dict:
    """ODE bits/dim of test images ``x`` (1 Rademacher probe, uniform dequantisation; batch i
    draws from generator seed 100 + i): mean, standard error over the images, seconds per
    image (CPU, or wall on a GPU) and NFE per batch. Stops early at ``deadline``
    (time.monotonic()); the count says how many were measured."""
    t0 = _clock(device)
    bpd, nfe = [], 0
    for i, xb in enumerate(x.split(batch)):
        if deadline is not None and time.monotonic() > deadline and bpd:
            break
        r = ode_batch(den, xb.to(device), rtol=rtol, seed=100 + i)
        bpd.append(r.bits_per_dim.cpu())
        nfe += r.nfe
    bpd = torch.cat(bpd)
    return {"ode_bpd": float(bpd.mean()), "ode_se": float(bpd.std() / math.sqrt(len(bpd))),
            "ode_cpu_s_per_image": (_clock(device) - t0) / len(bpd),
            f"ode_nfe_per_batch{batch}": nfe / len(bpd.split(batch)), "ode_count": len(bpd),
            "ode_batch": batch, "rtol": rtol}


def evaluate_model(name: str, ckpt: str, x_ode: torch.Tensor, x_vlb: torch.Tensor,
                   fid_count: int, rtol: float, device: str = "cpu", ode_batch: int = 16,
                   ode_seconds: float | None = None) -> dict:
    from difflab.train.checkpoint import load_denoiser

    den, _ = load_denoiser(ckpt, device=device)
    res: dict = {}
    # the VLB (continuous; the chain's own discrete bound where there is one)
    res.update(vlb_figures(den, x_vlb, seed=200, device=device))
    res["vlb_count"] = len(x_vlb)
    # the ODE
    res.update(ode_figures(den, x_ode, rtol=rtol, batch=ode_batch, device=device,
                           deadline=None if ode_seconds is None
                           else time.monotonic() + ode_seconds))
    # FID
    if fid_count:
        from difflab.commands.eval import evaluate

        t0 = _clock(device)
        out = evaluate(ckpt, reference="fashion_mnist", split="test", n_ref=2000,
                       count=fid_count, steps=(10,), batch_size=100, device=device)
        rec = out["results"][0]
        res["fid"] = float(rec["fid"])
        res["fid_sampler"] = f"{rec.get('sampler')} {rec.get('steps')} steps"
        res["fid_count"] = fid_count
        res["fid_cpu_s"] = _clock(device) - t0
    return res


def vlb_figures(den, x: torch.Tensor, *, seed: int, time_samples: int | None = None,
                device: str = "cpu") -> dict:
    """Bits/dim by the continuous VLB and, on a DDPM chain, by the chain's own bound: mean,
    standard error and CPU seconds per image (batches of 100, generator seed + batch index)."""
    from difflab.objectives import variational_bound

    kw = {} if time_samples is None else {"time_samples": time_samples}
    forms = {"vlb": None}
    if den.schedule.num_steps is not None:
        forms["vlb_chain"] = "chain"
    res: dict = {}
    for key, steps in forms.items():
        t0 = _clock(device)
        vals = [variational_bound(den, xb.to(device), steps=steps, **kw,
                                  generator=torch.Generator().manual_seed(seed + i)
                                  ).bits_per_dim.cpu()
                for i, xb in enumerate(x.split(100))]
        v = torch.cat(vals)
        res[f"{key}_bpd"] = float(v.mean())
        res[f"{key}_se"] = float(v.std() / math.sqrt(len(v)))
        res[f"{key}_cpu_s_per_image"] = (_clock(device) - t0) / len(x)
    return res


def vlb_only(name: str, ckpt: str, x: torch.Tensor, time_samples: int) -> dict:
    """The VLB figures again with K antithetic times per image (lower variance)."""
    from difflab.train.checkpoint import load_denoiser

    den, _ = load_denoiser(ckpt)
    res: dict = {"vlb_count": len(x), "vlb_time_samples": time_samples}
    res.update(vlb_figures(den, x, seed=300, time_samples=time_samples))
    return res


def paired(name: str, ckpt: str, x: torch.Tensor, *, rtol: float, time_samples: int,
           batch: int = 16, centers: bool = False, dequantize: str = "uniform",
           solver: str = "dopri5") -> dict:
    """ODE bits/dim minus VLB bits/dim on the same images: the paired difference's mean and
    standard error (the images' own spread cancels, which the two separate standard errors
    of the table do not). VLB: the chain's own bound where the model has one, else the
    continuous bound; ``time_samples`` antithetic times per image. ``dequantize``: the ODE's
    ("uniform" or "decoder"). ``centers``: also the ODE density at the bin centres times the
    bin volume (log p(x) + D log(2/256), the midpoint rule for the bin's probability: no
    Jensen gap of uniform dequantisation, but no bound)."""
    from difflab.objectives import variational_bound
    from difflab.train.checkpoint import load_denoiser

    den, _ = load_denoiser(ckpt)
    steps = "chain" if den.schedule.num_steps is not None else None
    t0 = time.process_time()
    ode = torch.cat([ode_batch(den, xb, rtol=rtol, seed=100 + i, solver=solver,
                               dequantize=dequantize).bits_per_dim
                     for i, xb in enumerate(x.split(batch))])
    ode_cpu = (time.process_time() - t0) / len(x)
    vlb = torch.cat([variational_bound(den, xb, steps=steps, time_samples=time_samples,
                                       generator=torch.Generator().manual_seed(500 + i)
                                       ).bits_per_dim for i, xb in enumerate(x.split(100))])
    d = ode - vlb
    n = len(d)
    extra = {"dequantize": dequantize, "solver": solver, "ode_cpu_s_per_image": ode_cpu}
    if centers:
        from difflab.likelihood import BIN_WIDTH, bits_per_dim, log_likelihood

        D = x[0].numel()
        mid = torch.cat([bits_per_dim(log_likelihood(
            den, xb, probes=1, rtol=rtol, atol=rtol,
            generator=torch.Generator().manual_seed(100 + i)).log_likelihood
            + D * math.log(BIN_WIDTH), D) for i, xb in enumerate(x.split(batch))])
        extra |= {"ode_centers_bpd": float(mid.mean()),
                 "ode_centers_minus_vlb": float((mid - vlb).mean()),
                 "ode_centers_minus_vlb_se": float((mid - vlb).std() / math.sqrt(n))}
    return {**extra, "model": name, "n": n, "rtol": rtol, "vlb_form": steps or "continuous",
            "time_samples": time_samples, "ode_bpd": float(ode.mean()),
            "vlb_bpd": float(vlb.mean()), "ode_minus_vlb": float(d.mean()),
            "ode_minus_vlb_se": float(d.std() / math.sqrt(n)),
            "ode_se": float(ode.std() / math.sqrt(n)), "vlb_se": float(vlb.std() / math.sqrt(n))}


def report(out: Path) -> None:
    rows = []
    for name in MODELS:
        p = out / f"{name}.json"
        if not p.is_file():
            continue
        r = json.loads(p.read_text())
        e = r["eval"]
        chain = (f"{e['vlb_chain_bpd']:.3f} ± {e['vlb_chain_se']:.3f}"
                 if "vlb_chain_bpd" in e else "-")
        rows.append(f"| {name} | {r['train']['steps']} ({r['train']['train_cpu_s'] / 60:.1f} "
                    f"CPU min) | {e['ode_bpd']:.3f} ± {e['ode_se']:.3f} | "
                    f"{e['vlb_bpd']:.3f} ± {e['vlb_se']:.3f} | {chain} | "
                    f"{e['ode_cpu_s_per_image']:.2f} | {e['vlb_cpu_s_per_image']:.3f} | "
                    f"{e.get('fid', float('nan')):.1f} |")
    print("| model | steps (train CPU) | ODE bits/dim | VLB bits/dim (continuous) | "
          "VLB bits/dim (chain) | ODE CPU s/image | VLB CPU s/image | FID |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ode-count", type=int, default=32)
    ap.add_argument("--vlb-count", type=int, default=500)
    ap.add_argument("--fid-count", type=int, default=500)
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=Path("runs/likelihood_bench"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--vlb-again", type=int, default=0, metavar="K",
                    help="re-measure only the VLB of the trained models with K times per image")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default: "
                    "the preset's)")
    ap.add_argument("--ode-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default=None, metavar="RUN",
                    help="measure the ODE bits/dim of this trained run only")
    ap.add_argument("--preset-count", type=int, default=10000)
    ap.add_argument("--paired", type=int, default=0, metavar="N",
                    help="ODE minus VLB on the same N test images for each trained model")
    ap.add_argument("--time-samples", type=int, default=32,
                    help="VLB times per image with --paired (the chain's T - 1 = 999: every "
                         "term of its bound once, no time-sampling noise)")
    ap.add_argument("--centers", action="store_true",
                    help="with --paired: also the ODE density at the bin centres")
    ap.add_argument("--dequantize", default="uniform", choices=["uniform", "decoder"],
                    help="with --paired: the ODE's dequantisation")
    ap.add_argument("--ode-solver", default="dopri5", help="with --paired: dopri5 | multistep")
    ap.add_argument("--ode-seconds", type=float, default=None, metavar="S",
                    help="each ODE measurement starts no new batch after S seconds")
    args = ap.parse_args(argv)
    if args.report:
        report(args.out)
        return
    torch.set_num_threads(args.threads)
    if args.preset:
        from difflab.train.checkpoint import load_denoiser

        den, _ = load_denoiser(args.preset, device=args.device)
        res = {"run": args.preset, "device": args.device, **ode_figures(
            den, test_images(args.preset_count), rtol=args.rtol, batch=args.ode_batch,
            device=args.device, deadline=None if args.ode_seconds is None
            else time.monotonic() + args.ode_seconds)}
        if args.device.startswith("cuda"):
            res["card"] = torch.cuda.get_device_name(0)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "preset_ode.json").write_text(json.dumps(res, indent=1))
        print("preset", res, file=sys.stderr, flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    x = test_images(max(args.ode_count, args.vlb_count))
    if args.paired:
        for name in args.model or list(MODELS):
            p = args.out / f"{name}.json"
            r = json.loads(p.read_text())
            key = f"paired_{args.paired}x{args.time_samples}"
            if args.dequantize != "uniform" or args.ode_solver != "dopri5":
                key += f"_{args.dequantize}_{args.ode_solver}"
            r[key] = paired(name, r["train"]["checkpoint"], x[:args.paired], rtol=args.rtol,
                            time_samples=args.time_samples, centers=args.centers,
                            dequantize=args.dequantize, solver=args.ode_solver)
            p.write_text(json.dumps(r, indent=1))
            print(name, r[key], file=sys.stderr, flush=True)
        return
    if args.vlb_again:
        for name in args.model or list(MODELS):
            p = args.out / f"{name}.json"
            r = json.loads(p.read_text())
            r["eval"].update(vlb_only(name, r["train"]["checkpoint"], x[:args.vlb_count],
                                      args.vlb_again))
            p.write_text(json.dumps(r, indent=1))
            print(name, {k: v for k, v in r["eval"].items() if "vlb" in k}, file=sys.stderr)
        return
    for name in args.model or list(MODELS):
        tr = train(name, args.out, args.steps, args.device, args.batch_size)
        print(name, "trained", tr, file=sys.stderr, flush=True)
        ev = evaluate_model(name, tr["checkpoint"], x[:args.ode_count], x[:args.vlb_count],
                            args.fid_count, args.rtol, args.device, args.ode_batch,
                            args.ode_seconds)
        print(name, ev, file=sys.stderr, flush=True)
        (args.out / f"{name}.json").write_text(json.dumps(
            {"model": name, "overrides": MODELS[name], "train": tr, "eval": ev,
             "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
