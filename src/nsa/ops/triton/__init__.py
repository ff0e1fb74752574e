"""The Triton backend of NSA: a face that only re-exports.

op.py                  the training op's forward and backward, and select_blocks
banded.py              compressed and sliding-window branches (banded flash attention), forward and backward
topn.py                block scores and the top-n selection
selected_attention.py  the selected branch, forward and backward
gate.py                the gate mix of the three branches, forward and backward
decode.py              the decoding step over a KV cache
decode_glue.py         the layer's decoding glue around it (rotary embeddings, cache writes, phi's input)
utils.py               helpers shared by the kernels (band, bounds, online softmax, top-n keys, checks)
"""
from .decode import nsa_decode_attention
from .op import nsa_attention_bwd, nsa_attention_fwd, select_blocks

__all__ = ["nsa_attention_bwd", "nsa_attention_fwd", "nsa_decode_attention", "select_blocks"]
