"""Commands: the typed entry points the ``difflab`` command line, a web UI or a notebook call.

One module per command, each a typed library function and its ``register(subparsers)`` (the
argparse glue :mod:`difflab.cli` composes):

================  ===========================================================================
module            typed function(s)
================  ===========================================================================
train             ``training_config(config, *, overrides, options) -> dict``,
                  ``train(config, out, *, resume, device, progress) -> summary``,
                  ``demo_config(data, *, max_minutes, seed, threads, overrides) -> dict``
sample            ``generate(checkpoint, *, count, steps, sampler, spacing, seed, batch_size,
                  ema, device, guidance) -> Samples``
eval              ``evaluate(source, *, reference, ..., samplers, steps, guidance, ...)
                  -> dict``
tune_grid         ``tune_checkpoint(checkpoint, *, sampler, steps, count, ...) -> [(fit, path)]``
train_classifier  ``classifier_training_config(*, like, data, overrides, ...) -> dict``,
                  ``train_noise_classifier(config, out, *, device, progress) -> summary``
train_features    ``train_features(dataset, name, *, epochs, ...) -> dict``,
                  ``calibrate_features(stem) -> dict``
================  ===========================================================================

and the pieces they share, each written once:

* :mod:`.model`     a checkpoint as a (guided) denoiser (:func:`load_model`), the sample
                    shape (:func:`sample_shape`), the solver a checkpoint is sampled with
                    (:func:`choose_solver`), chunked and seeded sampling (:func:`sample_images`);
* :mod:`.guidance`  labels, classifier-free and classifier guidance as one option set
                    (:class:`Guidance`, :func:`guide`);
* :mod:`.images`    the one writer of samples (PNG grid, .npy, PNG directory) and the reader of
                    image sources;
* :mod:`.common`    errors that name parameters (:class:`ParameterError`; the CLI shows its
                    flags instead), thread settings, the help format.

Threads and progress belong to the caller: these functions set torch's thread count only where
asked (``threads``) and report through ``log`` / ``progress`` arguments.
"""

from difflab.commands.common import MissingFileError, ParameterError
from difflab.commands.guidance import Guidance, Guided, guide
from difflab.commands.images import load_images, write_samples
from difflab.commands.model import (
    Model,
    Samples,
    Solver,
    choose_solver,
    load_model,
    sample_images,
    sample_shape,
)
from difflab.commands.sample import generate

__all__ = ["Guidance", "Guided", "MissingFileError", "Model", "ParameterError", "Samples",
           "Solver", "choose_solver", "generate", "guide", "load_images", "load_model",
           "sample_images", "sample_shape", "write_samples"]
