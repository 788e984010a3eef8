"""difflab: denoising diffusion models, from the schedule to the sample.

    import torch, difflab
    schedule = difflab.schedules.linear(1e-4, 0.02, timesteps=1000)
    denoiser = difflab.Denoiser(net, schedule, prediction="eps")
    x0 = difflab.sample(denoiser, noise, sampler="dpmpp_2m", steps=10,
                        generator=torch.Generator().manual_seed(0))
    denoiser = difflab.from_diffusers("path/to/unet_folder")    # a diffusers model folder
"""

from difflab import fitting, guidance, likelihood, objectives, process, samplers, schedules
from difflab.denoiser import BaseDenoiser, Condition, Denoiser, Prediction
from difflab.samplers import sample

__version__ = "0.1.0"


def __getattr__(name: str):  # the diffusers bridge, imported when first asked for
    if name in ("from_diffusers", "to_diffusers"):
        import difflab.interop as interop

        return getattr(interop, name)
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")

__all__ = ["BaseDenoiser", "Condition", "Denoiser", "Prediction", "from_diffusers",
           "to_diffusers", "fitting", "guidance",
           "likelihood",
           "objectives",
           "process", "samplers", "sample", "schedules", "__version__"]
