"""Other projects' kernels measured beside siri's in the same run, whenever they import.

- Liger-Kernel: its Triton GRPO loss (`triton_grpo_loss`, logits in), `LigerCrossEntropyLoss`
  (logits in, cross-entropy: the same traffic as the GRPO loss, not the same loss) and
  `LigerFusedLinearGRPOLoss` (hidden states and LM head in, chunked over sequences).
- Cut Cross-Entropy: `linear_cross_entropy` (hidden states and LM head in, cross-entropy).
- TRL and verl: their own fused log-prob heads (benchmarks/fused_linear_bench.py), the extras
  `trl` and `verl` of setup.py.

Each row names the peer's version. Peers take [B, L] sequences where siri takes T packed
rows: the benchmarks cut T rows into B = T / SEQUENCE_LENGTH sequences of equal length.
`python benchmarks/run.py --no-peers` leaves them out.
"""

from __future__ import annotations

import importlib.metadata

LIGER = "liger-kernel"
CCE = "cut-cross-entropy"
TRL = "trl"
VERL = "verl"
SEQUENCE_LENGTH = 1024

enabled = True  # run.py --no-peers turns it off


def version(distribution: str) -> str | None:
    """`"<name> <version>"` of an installed peer, None when absent or when peers are off."""
    if not enabled:
        return None
    try:
        return f"{distribution} {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return None


def sequences(num_rows: int) -> tuple[int, int]:
    """(B, L) of the peers' batch for T packed rows."""
    length = min(SEQUENCE_LENGTH, num_rows)
    if num_rows % length:
        raise ValueError(f"T = {num_rows} rows is not a whole number of {length}-token sequences")
    return num_rows // length, length
