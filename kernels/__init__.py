"""siri.kernels: fused log-prob, entropy and clipped policy-gradient loss over packed tokens.

Public API (DESIGN.md):

    token_logprobs(logits, targets, *, temperature=1.0, return_entropy=False, backend="auto")
    policy_loss(logits, targets, advantages, weights, *, old_logprobs=None, ...) -> PolicyLossOutput
    available_backends()

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cuda" and "cpu" (the native
extension `siri._C`, when built), "torch" (the chunked PyTorch reference, always present).
`backend="auto"` picks the fastest present for the device; `SIRI_BACKEND` overrides it.
"""

from .backends import available_backends
from .policy_loss import PolicyLossOutput, policy_loss
from .token_logprobs import token_logprobs

__all__ = ["PolicyLossOutput", "available_backends", "policy_loss", "token_logprobs"]
