"""Layer types: what bingo knows about each kind of layer, behind one registry.

Built in: ``nn.Linear``, ``nn.Conv1d`` / ``nn.Conv2d``, Hugging Face's
``Conv1D`` (GPT-2), ``nn.Embedding`` (rows; scored only when included),
``nn.MultiheadAttention``'s q/k/v projections and its ``out_proj``. A new
type is a :class:`LayerType` subclass in one file and a
:func:`register_layer_type` line.
"""

from .base import LAYER_TYPES, DesignHook, LayerType, Refit, expand_units, from_unit_matrix, layer_type_of, register_layer_type, unit_matrix
from .linear import LinearLayer  # isort: skip (registration order: later types are asked first)
from .conv import ConvLayer  # isort: skip
from .embedding import EmbeddingLayer  # isort: skip
from .attention import ATTENTION_PROJECTIONS, AttentionLayer, AttentionOutputLayer, attention_inputs  # isort: skip
from .hf_conv1d import HuggingFaceConv1DLayer  # isort: skip

__all__ = [
    "ATTENTION_PROJECTIONS",
    "AttentionLayer",
    "AttentionOutputLayer",
    "ConvLayer",
    "DesignHook",
    "EmbeddingLayer",
    "HuggingFaceConv1DLayer",
    "LAYER_TYPES",
    "LayerType",
    "LinearLayer",
    "Refit",
    "attention_inputs",
    "expand_units",
    "from_unit_matrix",
    "layer_type_of",
    "register_layer_type",
    "unit_matrix",
]
