"""siri: reinforcement learning for reasoning models under an interleaved length budget.

`siri.kernels` holds the fused policy-loss kernels; `siri.packing` turns rollouts into
packed variable-length micro-batches; the rest is the trainer around them.
"""

__version__ = "0.1.0"
