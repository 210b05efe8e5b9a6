"""Pluggable attention for networks people already use (segmentation_models_pytorch, MONAI).

``report = add_attention(model, "scse")`` inserts a registered attention block after every decoder
block, in place; ``print(report)`` lists the sites. See :mod:`scse_seg.plug.insert`.
"""
from .insert import ATTR, AttentionReport, add_attention
from .sites import WHERE, architecture, find_sites, supported

__all__ = ["ATTR", "AttentionReport", "WHERE", "add_attention", "architecture", "find_sites",
           "supported"]
