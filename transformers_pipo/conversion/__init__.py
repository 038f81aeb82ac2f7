"""Checkpoint converters (not part of the remote-code files shipped with a model): wrapping a pretrained backbone
(`backbone.from_backbone`) and importing the PIPO authors' release layout (`reference.convert_reference`)."""

from .backbone import from_backbone, resolve_pad_and_eos
from .reference import ConversionReport, ReferenceLayoutError, convert_reference

__all__ = ["from_backbone", "resolve_pad_and_eos", "convert_reference", "ConversionReport", "ReferenceLayoutError"]
