"""siri.kernels: fused log-prob, entropy and clipped policy-gradient loss over packed tokens.

Public API (docs/design.md):

    token_logprobs(logits, targets, *, temperature=1.0, return_entropy=False, backend="auto")
    policy_loss(logits, targets, advantages, weights, *, old_logprobs=None, ...) -> PolicyLossOutput
    fused_linear_policy_loss(hidden, weight, targets, advantages, weights, *, bias=None, ...,
                             chunk_size=None) -> PolicyLossOutput   (never builds [T, V] logits)
    fused_linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0,
                                return_entropy=False)     (differentiable)
    available_backends(), get_backend(name)

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cuda" and "cpu" (the native
extension `siri._C`, when built), "torch" (the chunked PyTorch reference, always present).
`backend="auto"` picks the fastest present for the device; `SIRI_BACKEND` overrides it.

Where each layer of an op lives (public function -> autograd.Function -> custom op ->
backend -> kernel):

    public functions and autograd  policy_loss.py, token_logprobs.py, fused_linear.py
                                   (+ fused_linear_logprobs.py: the head's log-prob gradient)
    custom ops and fakes           ops.py (every torch.ops.siri.* op)
    fused-linear algorithms        fused_linear_algorithms.py (vocabulary split, row chunks)
    backend dispatch               backends.py (the three entry points every backend has)
    backends                       triton_backend.py -> triton_kernels.py (declared in
                                   triton_launches.py, compiled offline by triton_compile.py);
                                   native_backend.py -> csrc/ (cpu, cuda); torch_backend.py
    formulas and the oracle        reference.py; settings in config.py; checks in validation.py
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
