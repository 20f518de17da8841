"""Offline compile of every Triton launch for real GPU targets, on a machine without a GPU.

    python -m siri.kernels.triton_compile [--arch 90 --arch 80] [--json results.json]

compiles each `Launch` of `triton_launches.py` for each variant below with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, reads the registers,
spills and stack frame from ptxas's own log of that compile, prints a table and exits 1 if
any variant failed to compile or spilled. The Triton interpreter cannot stand in for this:
it runs the Python body and accepts what the compiler rejects (a non-constexpr global, for
one). Run it in a process without `TRITON_INTERPRET=1`. Every variant is compiled afresh,
never read from Triton's disk cache, whose key does not cover non-constexpr globals (a binary
cached from a fixed source could hide a broken one); a fresh `TRITON_CACHE_DIR` keeps the
run from adding to a user's cache.

Variants of each launch: every feature switch off, every switch on (its last value), each
switch alone on each of its other values; each logits dtype; the tiling chosen for each of
`VOCABS`, with the 16-divisibility attributes that Triton's launcher gives such a call; and
each dtype with the logits pointers not 16-byte aligned (an offset view). Variants that
compile the same kernel are built once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import time
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_kernels
from .triton_launches import LAUNCHES, LOGITS, TARGETS, Launch

ARCHS = (90, 80)  # Hopper (H100/H200), Ampere (A100)
VOCABS = (97, 32_000, 151_936)
LOGITS_TYPES = ("bf16", "fp16", "fp32")
TARGET_TYPE = "i64"  # what the trainer passes; int32 targets change one load
WARP_SIZE = 32
# Triton's launcher marks a pointer argument aligned to 16 bytes, or an integer divisible by
# 16, with this attribute, and the compiler vectorises on it.
_DIVISIBLE = [["tt.divisibility", 16]]


@dataclass(frozen=True)
class Variant:
    """One compile of one launch."""

    launch: str
    arch: int
    logits: str  # fp16 / bf16 / fp32
    vocabs: tuple  # the vocabularies this one compile stands for (same tiling and divisibility)
    switches: tuple  # ((name, value), ...)
    aligned: bool = True  # logits pointers 16-byte aligned

    def label(self) -> str:
        on = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.switches) or "-"
        vocabs = ",".join(map(str, self.vocabs))
        return f"{self.launch} sm_{self.arch} {self.logits} V={vocabs}{'' if self.aligned else ' unaligned'} {on}"


@dataclass
class Compiled:
    """What ptxas reported for one variant (None where the compile failed: see `error`)."""

    variant: Variant
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_stores == 0 and self.spill_loads == 0

    def as_dict(self) -> dict:
        found = asdict(self)
        found["variant"] = dict(asdict(self.variant), switches=dict(self.variant.switches))
        return found


def switch_settings(launch: Launch) -> list[dict]:
    """All off, all on, each switch alone on each of its non-off values, and the launch's
    typical settings."""
    off = {name: values[0] for name, values in launch.switches.items()}
    settings = [off, {name: values[-1] for name, values in launch.switches.items()}]
    for name, values in launch.switches.items():
        settings += [dict(off, **{name: value}) for value in values[1:]]
    settings += [dict(typical) for typical in launch.typical]
    unique = []
    for setting in settings:
        if setting not in unique:
            unique.append(setting)
    return unique


def _vocab_key(launch: Launch, vocab: int):
    # Two vocabularies compile the same kernel when the tiling and the divisibility agree.
    sizes, warps = launch.tiling(vocab)
    return tuple(sorted(sizes.items())), warps, vocab % 16 == 0


def variants(launch: Launch, archs=ARCHS, vocabs=VOCABS, logits_types=LOGITS_TYPES) -> list[Variant]:
    groups: dict[tuple, list[int]] = {}
    for vocab in vocabs:
        groups.setdefault(_vocab_key(launch, vocab), []).append(vocab)
    settings = switch_settings(launch)
    found = []
    for arch in archs:
        for logits in logits_types:
            for same in groups.values():
                found += [Variant(launch.name, arch, logits, tuple(same), tuple(s.items())) for s in settings]
            if LOGITS in launch.arguments.values():
                # An offset view at the largest vocabulary: every switch off, and every one on.
                found += [Variant(launch.name, arch, logits, (max(vocabs),), tuple(s.items()), aligned=False)
                          for s in settings[:2]]
    return found


def check_declaration(launch: Launch) -> None:
    """ValueError unless `launch` declares exactly the kernel's parameters."""
    runtime = [p.name for p in launch.kernel.params if not p.is_constexpr]
    constexprs = {p.name for p in launch.kernel.params if p.is_constexpr}
    if list(launch.arguments) != runtime:
        raise ValueError(f"{launch.name}: triton_launches.py declares arguments {list(launch.arguments)}, "
                         f"the kernel takes {runtime}")
    declared = set(launch.switches) | set(launch.tiling(max(VOCABS))[0])
    if declared != constexprs:
        raise ValueError(f"{launch.name}: triton_launches.py declares constexprs {sorted(declared)}, "
                         f"the kernel takes {sorted(constexprs)}")


def signature_and_attrs(launch: Launch, variant: Variant):
    vocab = variant.vocabs[0]
    sizes, warps = launch.tiling(vocab)
    constexprs = dict(variant.switches, **sizes)
    signature, attrs = {}, {}
    for index, (name, kind) in enumerate(launch.arguments.items()):
        kind = {LOGITS: f"*{variant.logits}", TARGETS: f"*{TARGET_TYPE}"}.get(kind, kind)
        signature[name] = kind
        if kind.startswith("*"):
            divisible = variant.aligned or launch.arguments[name] != LOGITS
        else:  # V and row strides of V elements; not num_rows (any count); floats never get it
            divisible = kind in ("i32", "i64") and vocab % 16 == 0 and name != "num_rows"
        if divisible:
            attrs[(index,)] = _DIVISIBLE
    signature.update({name: "constexpr" for name in constexprs})
    return signature, constexprs, attrs, warps


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(launch: Launch, variant: Variant, *, keep_kernel: bool = False):
    """Compile one variant for its GPU target; returns `Compiled` (and the kernel when asked).

    The compiled kernel object (`.asm["ptx"]`, `.asm["cubin"]`, ...) is what
    `triton.compile` returns; it cannot be launched here.
    """
    signature, constexprs, attrs, warps = signature_and_attrs(launch, variant)
    result, kernel = Compiled(variant), None
    log = io.StringIO()
    started = time.perf_counter()
    try:
        # Triton prints ptxas's -v log of the compile when asked: the only offline source of
        # the spill counts (the kernel's metadata gains n_regs / n_spills only on a GPU).
        with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
            triton.knobs.nvidia.dump_ptxas_log = True
            # Users' launches honour no such escape hatch by default: neither does the check.
            triton.knobs.compilation.allow_non_constexpr_globals = False
            # A cached binary would skip ptxas (no log) and could come from an older source.
            triton.knobs.compilation.always_compile = True
            kernel = triton.compile(
                ASTSource(launch.kernel, signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", variant.arch, WARP_SIZE), options={"num_warps": warps, **launch.options},
            )
    except Exception as error:  # every failure is reported with its variant, and the run goes on
        root = error
        while root.__cause__ is not None:  # a CompilationError wraps one per inlined call
            root = root.__cause__
        result.error = f"{type(root).__name__}: {root}"
    result.seconds = round(time.perf_counter() - started, 2)
    if result.error is None:
        text = log.getvalue()
        usage, spills = _PTXAS_USAGE.search(text), _PTXAS_SPILLS.search(text)
        if usage is None or spills is None:
            result.error = f"no ptxas -v report in the compile's output: {text[-500:]!r}"
        else:
            result.registers = int(usage.group(1))
            result.stack_bytes, result.spill_stores, result.spill_loads = map(int, spills.groups())
            result.shared_bytes = kernel.metadata.shared  # Triton's, allocated at launch: not in the log
    return (result, kernel) if keep_kernel else result


def undeclared_kernels() -> list[str]:
    """Public `@triton.jit` functions of triton_kernels.py that no Launch declares."""
    declared = {id(launch.kernel) for launch in LAUNCHES}
    return sorted(
        name for name, value in vars(triton_kernels).items()
        if isinstance(value, triton.runtime.JITFunction) and not name.startswith("_") and id(value) not in declared
    )


def compile_all(launches=LAUNCHES, archs=ARCHS, progress=None) -> tuple[list[str], list[Compiled]]:
    """(declaration errors, one result per variant of every correctly declared launch)."""
    errors = [f"{name}: a public kernel of triton_kernels.py missing from triton_launches.LAUNCHES"
              for name in undeclared_kernels()]
    results = []
    for launch in launches:
        try:
            check_declaration(launch)
        except ValueError as error:
            errors.append(str(error))
            continue
        for variant in variants(launch, archs):
            results.append(compile_variant(launch, variant))
            if progress is not None:
                progress(results[-1])
    return errors, results


def _report(result: Compiled) -> None:
    if result.error is not None:
        # The innermost error's last line says what is wrong (its first, where in the source).
        lines = [line for line in result.error.splitlines() if line.strip()]
        status = f"FAILED {lines[0][:100]} ... {lines[-1][:300]}"
    else:
        status = (f"{result.registers} registers, {result.spill_stores} B spill stores, {result.spill_loads} B "
                  f"spill loads, {result.stack_bytes} B stack, {result.shared_bytes} B smem, {result.seconds} s")
    print(f"{result.variant.label()}: {status}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help=f"compute capability x10 (default {ARCHS})")
    parser.add_argument("--json", help="also write every result to this file")
    args = parser.parse_args(argv)
    errors, results = compile_all(archs=tuple(args.arch or ARCHS), progress=_report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"errors": errors, "results": [r.as_dict() for r in results]}, handle, indent=1)
    bad = [r for r in results if not r.ok]
    for error in errors:
        print(f"FAILED {error}")
    print(f"{len(results)} variants compiled, {len(bad)} failed or spilled; {len(errors)} declaration errors")
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
