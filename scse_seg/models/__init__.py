"""Architectures, built by name: ``create_model(arch, in_channels, num_classes, attention, dim)``."""
from . import paper_models, plugged, smp_decoder  # noqa: F401  (register architectures)
from .encoder_decoder import EncoderDecoder, Stage
from .registry import (
    block_archs,
    create_model,
    model_names,
    register_model,
    resolve_model_name,
    size_multiple,
)
from .summary import count_parameters, parameter_table

__all__ = ["EncoderDecoder", "Stage", "block_archs", "count_parameters", "create_model", "model_names",
           "parameter_table", "register_model", "resolve_model_name",
           "size_multiple"]
