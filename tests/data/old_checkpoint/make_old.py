"""Make tiny checkpoints in the pre-#16 layout (config.json + model.safetensors + ema.safetensors
+ optimizer.safetensors + state.json) with the code of commit d6cd48c, plus reference numbers:
DDIM samples from the EMA and raw weights, the losses and weights of resuming for 6 steps, and
a classifier's logits (tests/test_checkpoint.py checks them against the current code).

Run with that code, e.g.:  git worktree add /tmp/old d6cd48c &&
    PYTHONPATH=/tmp/old/src python tests/data/old_checkpoint/make_old.py /tmp/out
then copy /tmp/out/{diffusion,diffusion_cond,classifier,reference.json} here."""
import json
import shutil
import sys
from pathlib import Path

import torch

import difflab
from difflab.train.checkpoint import load_denoiser
from difflab.train.classifier import classifier_config, load_classifier, train_classifier
from difflab.train.config import complete
from difflab.train.trainer import Trainer

torch.set_num_threads(1)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)

def cfg(conditional):
    return complete({
        "net": {"type": "mlp", "dim": 2, "hidden": 16, "depth": 1, "emb_dim": 8,
                "num_classes": None},
        "schedule": {"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999},
        "prediction": "v",
        "data": {"name": "tinytoy", "resolution": None, "channels": 2,
                 "num_classes": 2 if conditional else None},
        "train": {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup": 3, "log_every": 4,
                  "grid_size": 0, "seed": 5, "target": "v", "weighting": "min_snr",
                  "conditional": conditional, "ema_decay": 0.99}})

g = torch.Generator().manual_seed(0)
pts = torch.randn(16, 2, generator=g)
labels = torch.arange(16) % 2
ref = {}
for name, cond in (("diffusion", False), ("diffusion_cond", True)):
    c = cfg(cond)
    d = (pts, labels if cond else None)
    tr = Trainer(c, out / f"run_{name}", data=d, quiet=True)
    tr.run(steps=12)
    shutil.copytree(out / f"run_{name}" / "checkpoint", out / name)
    # continue training from the checkpoint (today's resume) for 6 more steps
    tr2 = Trainer(c, out / f"run_{name}", data=d, quiet=True, resume=True)
    losses = [tr2.train_step() for _ in range(6)]
    den, _ = load_denoiser(out / name)
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    kw = {"cond": torch.tensor([0, 1, 0, 1])} if cond else {}
    x = difflab.sample(den, noise, sampler="ddim", steps=5, **kw)
    xe = difflab.sample(load_denoiser(out / name, ema=False)[0], noise, sampler="ddim",
                        steps=5, **kw)
    ref[name] = {"resume_losses": losses, "sample_ema_ddim5": x.tolist(),
                 "sample_raw_ddim5": xe.tolist(),
                 "weights_after_resume": {k: v.flatten()[:4].tolist()
                                          for k, v in tr2.net.state_dict().items()}}

# a classifier checkpoint of today's layout (fake "prediction": "logits")
imgs = (torch.rand(16, 1, 4, 4, generator=g) * 255).to(torch.uint8)
ccfg = classifier_config({"name": "tiny", "resolution": 4, "channels": 1, "num_classes": 2},
                         cfg(False)["schedule"],
                         {"type": "classifier", "in_channels": 1, "num_classes": 2,
                          "model_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                          "attention_resolutions": [], "image_size": 4, "pool": "adaptive"},
                         {"steps": 6, "batch_size": 8, "warmup": 2, "log_every": 3})
s = train_classifier(ccfg, out / "run_classifier", data=(imgs, labels))
shutil.copytree(out / "run_classifier" / "checkpoint", out / "classifier")
clf, _ = load_classifier(out / "classifier")
x = imgs[:4].float() / 127.5 - 1
ref["classifier"] = {"logits_t05": clf(x, torch.full((4,), 500.0)).tolist(), "loss": s["loss"]}
(out / "reference.json").write_text(json.dumps(ref, indent=1))
print(json.dumps({k: list(v) for k, v in ref.items()}))
