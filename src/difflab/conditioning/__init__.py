"""Conditioning: what a model is conditioned on and how it is encoded.

The structured condition itself (:class:`~difflab.denoiser.condition.Condition`: class labels,
a context sequence with its padding mask, control images, masks, and the null value of each)
lives in the denoiser layer, where guidance and the samplers null, concatenate and slice it;
it is re-exported here beside the encoders that produce its fields (text encoders, control
signals).
"""

from difflab.conditioning import control as control  # control signals (ControlNet)
from difflab.conditioning.text import (
    CLIPTextEncoder,
    MiniLMEncoder,
    TextEncoder,
    TextEncoding,
    VocabTextEncoder,
    build_text_encoder,
)
from difflab.denoiser.condition import NULL_LABEL, Condition

__all__ = ["NULL_LABEL", "CLIPTextEncoder", "Condition", "MiniLMEncoder", "TextEncoder",
           "TextEncoding", "VocabTextEncoder", "build_text_encoder"]
