"""Models made elsewhere, in and out (issue #17: bring your own model).

* :mod:`.diffusers`   diffusers-format folders in (:func:`from_diffusers`,
                      :func:`load_diffusers`; safetensors only: U-Nets, SD3's transformer,
                      a latent pipeline's VAE, a ControlNet, a CLIP text encoder) and out
                      (:func:`to_diffusers`); :func:`is_diffusers_folder` and
                      :func:`fits_folder` (fits stored beside, never in, the folder) for the
                      commands
* :mod:`.schedulers`  diffusers scheduler configs <-> difflab schedules and parameterisations
* :mod:`.unet`        difflab's ADM U-Net <-> diffusers' ``UNet2DModel`` weights, one to one

diffusers is an optional extra (``pip install difflab[diffusers]``): it is imported only when
a model is loaded; the config mapping and the export need only torch and safetensors.
"""

from difflab.interop.diffusers import (
    MODEL_CLASSES,
    DiffusersExport,
    DiffusersModel,
    DiffusersSD3,
    DiffusersUNet,
    PickleRefused,
    check_safetensors,
    find_weights,
    fits_folder,
    from_diffusers,
    is_diffusers_folder,
    load_diffusers,
    network_weights,
    sd3_context,
    to_diffusers,
)
from difflab.interop.schedulers import SchedulerMapping, from_scheduler_config, scheduler_config
from difflab.interop.unet import unet_to_diffusers

__all__ = ["from_diffusers", "load_diffusers", "to_diffusers", "DiffusersModel",
           "DiffusersExport", "DiffusersUNet", "DiffusersSD3", "PickleRefused", "find_weights",
           "is_diffusers_folder", "fits_folder", "check_safetensors", "network_weights",
           "sd3_context", "MODEL_CLASSES",
           "SchedulerMapping", "from_scheduler_config", "scheduler_config", "unet_to_diffusers"]
