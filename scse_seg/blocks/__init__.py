"""Building blocks: attention types (registered by name) and dimension-generic layers."""
from .cbam import CBAM
from .registry import attention_names, create_attention, register_attention
from .se import FUSIONS, ChannelSE, ConcurrentSE, NoAttention, SpatialSE

__all__ = [
    "CBAM", "ChannelSE", "ConcurrentSE", "FUSIONS", "NoAttention", "SpatialSE",
    "attention_names", "create_attention", "register_attention",
]
