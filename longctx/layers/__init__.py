"""Layers shared by every model."""

from longctx.layers.attention import (
    ATTENTION_IMPLS, cached_window_attention, masked_attention, rotary, sliding_window_attention, sliding_window_attention_reference, window_mask,
    window_ring_attention, merge_over_sequence)
from longctx.layers.linear import GatedMLP, param
from longctx.layers.norms import RMSNorm, l2_normalize, rms_norm
