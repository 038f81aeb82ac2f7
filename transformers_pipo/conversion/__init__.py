"""Checkpoint converters (not part of the remote-code files shipped with a model)."""

from .reference import ConversionReport, ReferenceLayoutError, convert_reference

__all__ = ["convert_reference", "ConversionReport", "ReferenceLayoutError"]
