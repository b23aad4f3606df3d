from .api import BACKENDS, hadamard_attn, hadamard_attn_step
from .chunk import chunk_hadamard_attn
from .naive import naive_hadamard_attn
from .parallel import parallel_hadamard_attn
from .recurrent import recurrent_hadamard_attn

__all__ = [
    "BACKENDS",
    "chunk_hadamard_attn",
    "hadamard_attn",
    "hadamard_attn_step",
    "naive_hadamard_attn",
    "parallel_hadamard_attn",
    "recurrent_hadamard_attn",
]
