"""Measuring generative quality: FID, KID, precision / recall, and the feature networks.

    import difflab.metrics as M
    m = M.evaluate(samples, reference="fashion_mnist", feature_net="fmnist")  # FID-FMNIST
    acc = M.classifier_accuracy(samples, labels, feature_net="fmnist")
    modes = M.class_metrics(samples, labels)          # accuracy, entropy of class histogram

Shipped offline feature networks: "fmnist" (Fashion-MNIST classifier) and "mnist" (MNIST
classifier), reported as "FID-FMNIST" / "FID-MNIST". The standard Inception-v3 FID network
loads from a local pytorch-fid weights file ("inception:/path/to/pt_inception-....pth").
"""

from difflab.metrics.distances import (
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)
from difflab.metrics.evaluate import class_metrics, classifier_accuracy, evaluate
from difflab.metrics.features import FeatureExtractor, load_feature_net
from difflab.metrics.reference import load_reference, reference_stats, save_reference

__all__ = ["FeatureExtractor", "class_metrics", "classifier_accuracy", "evaluate",
           "fid_from_features", "frechet_distance", "gaussian_stats",
           "kernel_inception_distance", "load_feature_net", "load_reference", "mmd2_unbiased",
           "precision_recall", "reference_stats", "save_reference"]
