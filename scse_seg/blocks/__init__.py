"""Building blocks: attention types and conv blocks (registered by name) and dimension-generic
layers."""
from . import cmpe_se, eca, project_excite, residual, selective_kernel, split_attention  # noqa: F401
from .cbam import CBAM
from .conv import UNetBlock
from .registry import (
    attention_names,
    block_names,
    check_block_attention,
    create_attention,
    create_block,
    create_recalibration,
    is_inner_recalibration,
    register_attention,
    register_block,
)
from .se import FUSIONS, ChannelSE, ConcurrentSE, NoAttention, SpatialSE

__all__ = [
    "CBAM", "ChannelSE", "ConcurrentSE", "FUSIONS", "NoAttention", "SpatialSE", "UNetBlock",
    "attention_names", "block_names", "check_block_attention", "create_attention", "create_block",
    "create_recalibration", "is_inner_recalibration", "register_attention", "register_block",
]
