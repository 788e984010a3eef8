"""difflab: denoising diffusion models, from the schedule to the sample.

    import torch, difflab
    schedule = difflab.schedules.linear(1e-4, 0.02, timesteps=1000)
    denoiser = difflab.Denoiser(net, schedule, prediction="eps")
    x0 = difflab.sample(denoiser, noise, sampler="dpmpp_2m", steps=10,
                        generator=torch.Generator().manual_seed(0))
"""

from difflab import fitting, guidance, likelihood, objectives, process, samplers, schedules
from difflab.denoiser import BaseDenoiser, Condition, Denoiser, Prediction
from difflab.samplers import sample

__version__ = "0.1.0"

__all__ = ["BaseDenoiser", "Condition", "Denoiser", "Prediction", "fitting", "guidance",
           "likelihood",
           "objectives",
           "process", "samplers", "sample", "schedules", "__version__"]
