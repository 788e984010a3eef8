"""Networks: nn.Modules only (DESIGN.md). Each takes ``forward(x, t, **condition)`` with t the
(B,) network time (``schedule.net_time(t)``) and the condition as keyword arguments
(:meth:`difflab.denoiser.condition.Condition.kwargs`: ``labels`` (B,) long class labels, -1 the
learned null label; ``context`` / ``context_mask`` for cross-attention), refusing inputs it
has none for (``blocks.unused_condition``), and has a JSON-safe ``config`` dict with a "type"
from which :func:`build` rebuilds it.

    net = difflab.nets.build({"type": "unet", "in_channels": 1, "model_channels": 32})
    same = difflab.nets.build(json.loads(json.dumps(net.config)))

Types: "mlp", "unet", "dit", "classifier". Other modules add types with :func:`register`;
:func:`build` imports ``difflab.nets.<type>`` for a type it does not know yet.
"""

from difflab.nets.classifier import EncoderClassifier
from difflab.nets.dit import DiT
from difflab.nets.mlp import MLP
from difflab.nets.registry import NET_TYPES, build, count_parameters, register
from difflab.nets.unet import UNet, UNetEncoder

__all__ = ["NET_TYPES", "DiT", "EncoderClassifier", "MLP", "UNet", "UNetEncoder", "build",
           "count_parameters", "register"]
