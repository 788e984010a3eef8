"""Training objectives: ``objective(modules, batch, generator) -> (loss, logs)``.

* :mod:`.core`  the Objective contract, time sampling, weightings, the diffusion loss, the
                noise-aware classifier and the FID feature networks

Each further family (variational bound, autoencoder, ControlNet, consistency) is one more module
here, re-exported below; the trainer builds them by ``config["kind"]``
(:func:`difflab.train.trainer.register_objective`).
"""

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

__all__ = ["sample_t", "loss_weight", "diffusion_loss", "per_example_loss", "target_factor",
           "Weighting", "NoWeighting", "MinSNR", "EDMWeighting", "get_weighting",
           "Objective", "DiffusionObjective", "ClassifierObjective", "FeatureObjective",
           "noised", "random_shift", "random_flip", "TARGETS", "WEIGHTINGS",
           "T_SAMPLERS"]
