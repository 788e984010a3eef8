"""Suite-wide settings: one torch thread per test process, no plan cache.

The tests use small tensors; on a shared 2-core machine OpenMP's spin-waiting with two threads
made them up to ~100x slower than one thread (measured by the nets and metrics tests).
"""

import os

import torch

torch.set_num_threads(1)
# the default call's plans are not kept between runs in the tests (each test probes afresh, and
# nothing is written to the user's cache); tests of the plan cache point it at a tmp folder
os.environ["DIFFLAB_CACHE"] = "off"


def mlp_checkpoint(path, num_classes=None):
    """A checkpoint of an untrained 2-D MLP eps-model on DDPM's linear schedule (the CLI tests
    of tune-grid and sample need a checkpoint, not a good one), class-conditional with
    ``num_classes``; returns its directory."""
    from difflab import schedules
    from difflab.nets import build
    from difflab.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = build({"type": "mlp", "dim": 2, "hidden": 16, "depth": 2,
                 **({"num_classes": num_classes} if num_classes else {})})
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    data = {"name": "ring", "channels": 2, "resolution": None}
    if num_classes:
        data["num_classes"] = num_classes
    config = {"net": net.config, "schedule": schedules.linear().config(), "prediction": "eps",
              "data": data, **({"train": {"conditional": True}} if num_classes else {})}
    return save_checkpoint(path, config=config, model=sd, ema=sd)


#: ``--set`` overrides of ``difflab train t2i_canvas`` for a text-to-image run of seconds (64
#: canvases, a closed-vocabulary text encoder, two steps per stage)
T2I_TINY = ["data.n=64", "autoencoder.net.base_channels=8", "autoencoder.train.steps=2",
            "autoencoder.train.batch_size=8", "autoencoder.calibrate_count=32",
            'text_encoder={"type": "vocab_text", "dim": 16, "num_layers": 1, "num_heads": 2, '
            '"max_length": 16}',
            "net.model_channels=8", "net.num_heads=2", "train.steps=2",
            "train.batch_size=8", "train.max_minutes=null", "sample.steps=3"]


def train_tiny_t2i(out):
    """``difflab train t2i_canvas`` with :data:`T2I_TINY` into ``out`` (seconds); returns it."""
    from difflab.cli import main

    args = ["train", "t2i_canvas", "--out", str(out), "--quiet", "--threads", "1"]
    for s in T2I_TINY:
        args += ["--set", s]
    assert main(args) == 0
    return out
