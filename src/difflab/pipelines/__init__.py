"""Pipelines: compositions for a task (no math here).

* :mod:`.text_to_image`  prompt -> text encoder -> latent sampler -> decoder
  (:class:`~difflab.pipelines.text_to_image.TextToImagePipeline`)
"""
