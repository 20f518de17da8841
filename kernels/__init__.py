"""siri.kernels: fused log-prob, entropy and clipped policy-gradient loss over packed tokens.

Public API (docs/design.md):

    token_logprobs(logits, targets, *, temperature=1.0, return_entropy=False, backend="auto")
    policy_loss(logits, targets, advantages, weights, *, old_logprobs=None, ...) -> PolicyLossOutput
    fused_linear_policy_loss(hidden, weight, targets, advantages, weights, *, bias=None, ...,
                             chunk_size=None) -> PolicyLossOutput   (never builds [T, V] logits)
    fused_linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0,
                                return_entropy=False)
    available_backends(), get_backend(name)

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cuda" and "cpu" (the native
extension `siri._C`, when built), "torch" (the chunked PyTorch reference, always present).
`backend="auto"` picks the fastest present for the device; `SIRI_BACKEND` overrides it.
"""

# This directory is installed as `siri.kernels`. Python started from a source checkout's
# root can also reach it as a top-level `kernels`, the name of Hugging Face's hub-kernels
# package, which transformers probes by importing it. Under that name the package stays
# empty: the probe then finds no version and moves on, and no op is registered twice.
if __name__ == "siri.kernels":
    from .backends import available_backends, get_backend
    from .fused_linear import fused_linear_policy_loss, fused_linear_token_logprobs
    from .policy_loss import PolicyLossOutput, policy_loss
    from .token_logprobs import token_logprobs

__all__ = [
    "PolicyLossOutput",
    "available_backends",
    "fused_linear_policy_loss",
    "fused_linear_token_logprobs",
    "get_backend",
    "policy_loss",
    "token_logprobs",
]
