"""Native Sparse Attention (arXiv 2502.11089): compressed, selected and sliding-window attention, gated."""
from .config import NSAConfig
from .hf import convert
from .layer import NativeSparseAttention
from .model import LanguageModel, ModelConfig
from .ops import KernelOptions, Launch, NSAInputs, nsa_attention, nsa_decode_attention, select_blocks

__all__ = ["NSAConfig", "nsa_attention", "nsa_decode_attention", "select_blocks", "NSAInputs", "KernelOptions", "Launch",
           "NativeSparseAttention", "LanguageModel", "ModelConfig", "convert"]
__version__ = "0.1.0"
