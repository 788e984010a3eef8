"""Training objectives: ``objective(modules, batch, generator) -> (loss, logs)``.

* :mod:`.core`  the Objective contract, time sampling, weightings, the diffusion loss, the
                noise-aware classifier and the FID feature networks
* :mod:`.vlb`   the variational bound (VDM's continuous / discrete forms, the learned
                schedule's variance trick) and the learned-variance hybrid loss

Each further family (variational bound, autoencoder, ControlNet, consistency, latent
consistency) is one more module
here, re-exported below; the trainer builds them by ``config["kind"]``
(:func:`difflab.train.trainer.register_objective`).
"""

from difflab.objectives.autoencoder import AutoencoderObjective
from difflab.objectives.consistency import (
    ConsistencyDistillation,
    ConsistencyTraining,
    EasyConsistencyTuning,
)
from difflab.objectives.controlnet import ControlledNet, ControlNetObjective
from difflab.objectives.core import (
    T_SAMPLERS,
    TARGETS,
    WEIGHTINGS,
    ClassifierObjective,
    DiffusionObjective,
    EDMWeighting,
    FeatureObjective,
    MinSNR,
    NoWeighting,
    Objective,
    Weighting,
    diffusion_loss,
    get_weighting,
    loss_weight,
    noised,
    per_example_loss,
    random_flip,
    random_shift,
    sample_t,
    target_factor,
)
from difflab.objectives.latent_consistency import LatentConsistencyDistillation
from difflab.objectives.text import TextToImageObjective
from difflab.objectives.vlb import HybridObjective, VLBObjective, VLBResult, variational_bound

__all__ = ["sample_t", "loss_weight", "diffusion_loss", "per_example_loss", "target_factor",
           "Weighting", "NoWeighting", "MinSNR", "EDMWeighting", "get_weighting",
           "Objective", "DiffusionObjective", "ClassifierObjective", "FeatureObjective",
           "noised", "random_shift", "random_flip", "TARGETS", "WEIGHTINGS",
           "T_SAMPLERS", "ControlNetObjective", "ControlledNet",
           "AutoencoderObjective", "TextToImageObjective",
           "VLBObjective", "HybridObjective", "VLBResult", "variational_bound",
           "ConsistencyDistillation", "ConsistencyTraining", "EasyConsistencyTuning",
           "LatentConsistencyDistillation"]
