"""Small CNN classifiers used as offline feature networks for FID-style metrics.

The standard Inception-v3 FID network cannot be downloaded here, so difflab trains a small
classifier on the data set itself (Fashion-MNIST, MNIST) and takes its penultimate layer as the
feature map phi(x). Distances computed in that space are reported as "FID-FMNIST" /
"FID-MNIST", never as Inception FID: they are comparable only with each other.

Architecture (all convolutions 3x3, padding 1, each followed by BatchNorm and ReLU):

    28x28x1 -> conv 32 -> maxpool 2 -> conv 64 -> conv 64 -> maxpool 2 -> conv 128
            -> maxpool 2 (3x3) -> flatten -> linear feature_dim -> ReLU   = h(x)
            -> dropout -> linear num_classes                              = logits

The metric features are phi(x) = feature_scale * h(x), where ``feature_scale`` (stored in the
config, fixed once after training) makes the mean squared feature on the training split
equal to 1: mean_i ||phi(x_i)||^2 / d = 1. The scale does not change any classification; it
gives KID's kernel k(x, y) = (x.y / d + 1)^3 well-conditioned values (raw ReLU features are
~20x larger) and fixes the unit of FID-FMNIST / FID-MNIST.

Input: float images in [-1, 1], NCHW, at ``config["resolution"]``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["FeatureCNN"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FeatureCNN(nn.Module):
    """Classifier whose penultimate activations are the metric's features.

    ``forward(x)`` returns logits; ``features(x)`` returns phi(x) of width ``feature_dim``.
    ``config`` (JSON-safe) rebuilds the network with ``FeatureCNN(**config_without_type)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, resolution: int = 28,
                 widths: tuple[int, int, int] | list[int] = (32, 64, 128), feature_dim: int = 128,
                 dropout: float = 0.3, feature_scale: float = 1.0):
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.config: dict[str, Any] = {
            "type": "feature_cnn", "in_channels": in_channels, "num_classes": num_classes,
            "resolution": resolution, "widths": [w1, w2, w3], "feature_dim": feature_dim,
            "dropout": dropout, "feature_scale": float(feature_scale),
        }
        self.feature_scale = float(feature_scale)
        self.body = nn.Sequential(
            _block(in_channels, w1), nn.MaxPool2d(2),
            _block(w1, w2), _block(w2, w2), nn.MaxPool2d(2),
            _block(w2, w3), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = resolution // 8
        self.fc = nn.Sequential(nn.Linear(w3 * side * side, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    @property
    def feature_dim(self) -> int:
        return int(self.config["feature_dim"])

    def features(self, x: Tensor) -> Tensor:
        """phi(x) = feature_scale * h(x), shape (B, feature_dim)."""
        return self.feature_scale * self.hidden(x)

    def hidden(self, x: Tensor) -> Tensor:
        """h(x): the penultimate activations (after ReLU)."""
        return self.fc(self.body(x))

    def set_feature_scale(self, scale: float) -> None:
        self.feature_scale = float(scale)
        self.config["feature_scale"] = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FeatureCNN:
        kw = {k: v for k, v in config.items() if k != "type"}
        if config.get("type", "feature_cnn") != "feature_cnn":
            raise ValueError(f"not a feature_cnn config: type={config.get('type')!r}")
        return cls(**kw)

