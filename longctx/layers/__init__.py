"""Layers shared by every model: the context every layer reads, embedding, norms, MLP, attention (one
entry for every model), the linear recurrence, the causal conv, and the mixer/block scaffolding."""

from longctx.layers.attention import AttentionProjections, Keys, WindowAttention, project, rotary
from longctx.layers.block import Block, Mixer, build_block, get_mixer, register_mixer
from longctx.layers.context import Context
from longctx.layers.embedding import Embedding
from longctx.layers.linear import GatedMLP, dense, param, soft_cap
from longctx.layers.norms import RMSNorm, l2_normalize, rms_norm
