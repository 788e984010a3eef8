"""What is fitted to one model for sampling: tuned grids, bespoke solver coefficients,
adaptive grids. A fit is a typed, frozen, JSON-serialisable object (:class:`Fit`) passed to
sampling explicitly, ``difflab.sample(denoiser, noise, fit=fit)``; nothing is left on the
denoiser, and no fit changes the caller's modules.

- :mod:`.fit`        the :class:`Fit` object (a :class:`~difflab.samplers.SolverPlan` with how
                     it was made) and its JSON round trip;
- :mod:`.reference`  the accurate ODE solution from the calibration noise, and the rate of
                     the data prediction along it;
- :mod:`.grids`      tuned grids (LD3 objective, Nelder-Mead, decoupled evaluation times) and
                     the adaptive grid;
- :mod:`.bespoke`    bespoke solver coefficients (Shaul et al. 2024), fitted by L-BFGS;
- :mod:`.fast`       the same coefficients fitted fast: one reference solve for all step
                     counts, teacher forcing, ridge least squares (:func:`fast_fit_solvers`);
- :mod:`.store`      fits beside a checkpoint's weights (``fits.json``), and the fit a
                     checkpoint's sampling runs (:func:`choose_fit`).

:func:`step` (one solver step from t_from to t_to, shared by the solvers, for distillation)
lives in the samplers layer, :func:`difflab.samplers.step`, and is re-exported here.
"""

from difflab.fitting.bespoke import (
    BASES,
    START_GRIDS,
    describe_fit,
    fit_solver,
    fit_solvers,
    tune_solver,
)
from difflab.fitting.fast import fast_fit_solvers
from difflab.fitting.fit import Fit
from difflab.fitting.grids import (
    adaptive_grid,
    eval_times_from_phi,
    grid_from_theta,
    nelder_mead,
    tune_grid,
)
from difflab.fitting.reference import calibration_reference, reference_profile
from difflab.fitting.store import (
    FITS,
    choose_fit,
    load_fit,
    load_fits,
    save_fit,
    weights_file,
    weights_sha256,
)
from difflab.samplers.bespoke import solver_coefficients
from difflab.samplers.onestep import STEPS, step

__all__ = ["Fit", "tune_grid", "grid_from_theta", "eval_times_from_phi", "nelder_mead",
           "adaptive_grid", "calibration_reference", "reference_profile", "tune_solver",
           "fit_solver", "fit_solvers", "fast_fit_solvers", "describe_fit",
           "solver_coefficients", "BASES", "START_GRIDS", "FITS", "save_fit", "load_fit",
           "load_fits", "choose_fit", "weights_file", "weights_sha256", "step", "STEPS"]
