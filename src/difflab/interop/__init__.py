"""Models made elsewhere, in and out (issue #17: bring your own model).

* :mod:`.diffusers`   diffusers-format folders in (:func:`from_diffusers`,
                      :func:`load_diffusers`; safetensors only) and out (:func:`to_diffusers`)
* :mod:`.schedulers`  diffusers scheduler configs <-> difflab schedules and parameterisations
* :mod:`.unet`        difflab's ADM U-Net <-> diffusers' ``UNet2DModel`` weights, one to one

diffusers is an optional extra (``pip install difflab[diffusers]``): it is imported only when
a model is loaded; the config mapping and the export need only torch and safetensors.
"""

from difflab.interop.diffusers import (
    MODEL_CLASSES,
    DiffusersExport,
    DiffusersModel,
    DiffusersUNet,
    PickleRefused,
    find_weights,
    from_diffusers,
    load_diffusers,
    to_diffusers,
)
from difflab.interop.schedulers import SchedulerMapping, from_scheduler_config, scheduler_config
from difflab.interop.unet import unet_to_diffusers

__all__ = ["from_diffusers", "load_diffusers", "to_diffusers", "DiffusersModel",
           "DiffusersExport", "DiffusersUNet", "PickleRefused", "find_weights", "MODEL_CLASSES",
           "SchedulerMapping", "from_scheduler_config", "scheduler_config", "unet_to_diffusers"]
