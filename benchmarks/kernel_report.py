"""What an offline compile says about the Triton kernels: no GPU needed.

    python benchmarks/kernel_report.py                      # sm_90, bf16, V = 151,936
    python benchmarks/kernel_report.py --arch 80 --dtype fp32 --vocab 32000
    python benchmarks/kernel_report.py --kernels old_triton_kernels.py   # another revision's kernels

Compiles every launch of `siri.kernels.triton_launches` for the target through
`siri.kernels.triton_compile` (the specialisation a launch would get), then prints, per
kernel and flag set: registers, spill bytes (ptxas's log), shared memory; for each hot
loop (an innermost loop of the SASS that loads from global memory) its instructions per
logits element, that is the loop body's SASS instructions over the elements one thread
handles per trip (BLOCK_V / threads); and the HBM bytes per element the design moves.

Instructions are counted statically: "all" is the whole body, "common path" leaves out
the blocks a forward branch inside the loop jumps over (the rescale on a new row
maximum, taken in a few tiles per row). At the floor an H200 must retire about 4.1
elements per clock per SM (4.3 TB/s, 4 bytes moved per bf16 element), which at 4 warp
instructions per clock per SM leaves about 31 instructions per element; an H100 about 44.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/kernel_report.py` from a checkout
    sys.path.insert(0, ROOT)

# Offline compiles must not run the interpreter; a fresh cache, because the on-disk cache
# key does not cover non-constexpr module globals.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="siri-kernel-report-")

import dataclasses  # noqa: E402

import triton  # noqa: E402

from siri.kernels.triton_backend import rows_in_flight_on  # noqa: E402
from siri.kernels.triton_compile import Variant, compile_variant  # noqa: E402
from siri.kernels.triton_launches import LAUNCHES, LOGITS, POLICY_LOSS, TARGETS  # noqa: E402

ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# (name, SMs, L2 bytes) of the GPUs the L2 residency of re-read rows is shown for.
GPUS = (("H100 SXM", 132, 50 << 20), ("H200", 132, 60 << 20))

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`?\(?)(0x[0-9a-f]+|\.L_x_\d+)")


def cuda_tool(name: str) -> str:
    """A CUDA binary tool: Triton's bundled copy first, then PATH."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = bundled if os.path.exists(bundled) else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found (neither bundled with Triton nor on PATH)")
    return found


# The flag sets each kernel is reported at: GRPO's (old log-probs, the gradient), every
# switch on, and the forward alone; the token_logprobs kernels with the entropy.
_GRPO = POLICY_LOSS.typical[0]
REPORTED = {
    "policy_loss_kernel": {
        "grpo": _GRPO,
        "every-option": dict(_GRPO, HAS_REF=True, HAS_DUAL_CLIP=True, HAS_TIS=True, HAS_ENTROPY_GRAD=True),
        "no-grad": dict(_GRPO, COMPUTE_GRAD=False),
    },
    "logprob_kernel": {"entropy": dict(WITH_ENTROPY=True)},
    "logprob_backward_kernel": {"entropy": dict(HAS_GRAD_ENTROPY=True)},
    "scale_unless_one_kernel": {"": {}},
}


def _arguments_by_name(kernel) -> dict:
    # Another revision's kernels: the argument types follow the parameter names.
    found = {}
    for param in kernel.params:
        if param.is_constexpr:
            continue
        name = param.name
        if name in ("logits_ptr", "grad_ptr"):
            found[name] = LOGITS
        elif name == "targets_ptr":
            found[name] = TARGETS
        elif name.endswith("_ptr"):
            found[name] = "*fp32"
        else:
            found[name] = "i32" if name.endswith("_stride") or name in ("num_rows", "V") else "fp32"
    return found


def launches(kernels=None):
    """This checkout's launches, or the same launches of the kernels in module `kernels`."""
    if kernels is None:
        return LAUNCHES
    replaced = []
    for launch in LAUNCHES:
        kernel = getattr(kernels, launch.name)
        constexprs = {p.name for p in kernel.params if p.is_constexpr}
        replaced.append(dataclasses.replace(
            launch, kernel=kernel, arguments=_arguments_by_name(kernel),
            switches={k: v for k, v in launch.switches.items() if k in constexprs},
        ))
    return replaced


def sass_instructions(cubin_path: str) -> list[tuple[int, str]]:
    """(address, instruction) of the kernel's SASS, NOP padding left out."""
    text = subprocess.run([cuda_tool("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True,
                          check=True).stdout
    found = [(int(addr, 16), body) for addr, body in _INSTRUCTION.findall(text)]
    return [(addr, body) for addr, body in found if not body.startswith("NOP")]


def hot_loops(instructions) -> list[dict]:
    """Innermost loops (a backward branch and its target) whose body loads from global memory
    (the row loops; the loops that only store zeros for rows of weight 0 are left out)."""
    labels = {}
    for addr, body in instructions:  # older cuobjdump prints labels; newer, addresses
        labels.setdefault(f"{addr:#x}", addr)
    branches = []
    for addr, body in instructions:
        found = _BRANCH.search(body)
        if found:
            target = found.group(1)
            branches.append((addr, int(target, 16) if target.startswith("0x") else labels.get(target, addr)))
    loops = [(target, addr) for addr, target in branches if target < addr]
    innermost = [(lo, hi) for lo, hi in loops if not any(lo < a and b < hi for a, b in loops if (a, b) != (lo, hi))]
    found = []
    for lo, hi in innermost:
        body = [(a, b) for a, b in instructions if lo <= a <= hi]
        if not any(re.match(r"(@!?U?P\w+\s+)?LDG", b) for _, b in body):
            continue
        skipped = set()
        for a, b in body:  # blocks a forward branch inside the loop jumps over
            branch = _BRANCH.search(b)
            if branch and branch.group(1).startswith("0x"):
                target = int(branch.group(1), 16)
                if a < target <= hi:
                    skipped.update(x for x, _ in body if a < x < target)
        ops = [re.sub(r"^@!?U?P\w+\s+", "", b).split()[0] for _, b in body]
        found.append(dict(start=lo, end=hi, instructions=len(body), common=len(body) - len(skipped),
                          loads=sum(op.startswith("LDG") for op in ops), stores=sum(op.startswith("STG") for op in ops),
                          barriers=sum(op.startswith("BAR") for op in ops), exp2=sum(op == "MUFU.EX2" for op in ops)))
    return found


def traffic_by_design(name: str, switches: dict, block: int, vocab: int, dtype: str) -> str:
    """HBM bytes per logits element the kernel moves by design, and where its re-read comes from."""
    size = ITEMSIZE[dtype]
    if name.startswith("scale_unless_one"):
        return f"0 (scale == 1: skipped); else {2 * size} (read + write)"
    if name.startswith("logprob_kernel"):
        return f"{size} (one read)"
    if name.startswith("logprob_backward"):
        return f"{2 * size} (one read, one write)"
    if not switches.get("COMPUTE_GRAD"):
        return f"{size} (one read)"
    reread = (vocab - 1) // block * block / vocab
    text = f"{2 * size} (one read, one write)"
    if reread == 0:
        return text + "; the row stays in registers across both passes"
    fits = []
    for gpu, sms, l2_bytes in GPUS:
        rows = rows_in_flight_on(sms, l2_bytes, vocab * size)
        fits.append(f"{gpu}: {rows} rows in flight = {rows * vocab * size / 2**20:.0f} MiB of {l2_bytes >> 20} MiB L2")
    return text + f"; {reread:.0%} of each row re-read from L2 ({'; '.join(fits)})"


def load_kernels(path: str):
    """The module of kernels in the file `path` (e.g. an older revision's triton_kernels.py)."""
    spec = importlib.util.spec_from_file_location("compared_triton_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(arch: int, dtype: str, vocab: int, kernels=None) -> list[dict]:
    rows = []
    workdir = tempfile.mkdtemp(prefix="siri-kernel-report-cubin-")
    for launch in launches(kernels):
        sizes, warps = launch.tiling(vocab)
        for flags, switches in REPORTED[launch.name].items():
            switches = {k: v for k, v in switches.items() if k in launch.switches}
            variant = Variant(launch.name, arch, dtype, (vocab,), tuple(switches.items()))
            compiled, kernel = compile_variant(launch, variant, keep_kernel=True)
            name = f"{launch.name}[{flags}]" if flags else launch.name
            if compiled.error is not None:
                raise SystemExit(f"{name}: {compiled.error}")
            cubin = os.path.join(workdir, f"{name.replace('[', '_').replace(']', '')}.cubin")
            with open(cubin, "wb") as handle:
                handle.write(kernel.asm["cubin"])
            per_thread = sizes["BLOCK_V"] / (32 * warps)
            loops = hot_loops(sass_instructions(cubin))
            rows.append(dict(
                kernel=name, warps=warps, block_v=sizes["BLOCK_V"], registers=compiled.registers,
                spills=compiled.spill_stores + compiled.spill_loads, shared=compiled.shared_bytes,
                loops=[dict(loop, per_element=loop["instructions"] / per_thread,
                            common_per_element=loop["common"] / per_thread) for loop in loops],
                # The traffic model is this checkout's design, not another file's.
                traffic=traffic_by_design(name, switches, sizes["BLOCK_V"], vocab, dtype) if kernels is None else "—",
            ))
    shutil.rmtree(workdir, ignore_errors=True)
    return rows


def print_report(rows, arch: int, dtype: str, vocab: int) -> None:
    print(f"# Triton {triton.__version__}, sm_{arch}, {dtype} logits, V = {vocab:,}\n")
    print("| kernel | warps | BLOCK_V | registers | spills (B) | shared B | hot loops: SASS per element, "
          "all / common path (loads, barriers, exp2 per trip) | HBM bytes per element by design |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        loops = "; ".join(
            f"{loop['per_element']:.2f} / {loop['common_per_element']:.2f} "
            f"({loop['loads']} LDG, {loop['barriers']} BAR, {loop['exp2']} EX2)"
            for loop in row["loops"]
        ) or "—"
        total = sum(loop["per_element"] for loop in row["loops"])
        common = sum(loop["common_per_element"] for loop in row["loops"])
        if len(row["loops"]) > 1:
            loops += f"; sum {total:.2f} / {common:.2f}"
        print(f"| {row['kernel']} | {row['warps']} | {row['block_v']} | {row['registers']} | {row['spills']} | "
              f"{row['shared']} | {loops} | {row['traffic']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--dtype", choices=sorted(ITEMSIZE), default="bf16", help="logits dtype")
    parser.add_argument("--vocab", type=int, default=151_936, help="V, the row length")
    parser.add_argument("--kernels", default=None, help="a triton_kernels.py to report on instead of this checkout's")
    args = parser.parse_args()
    if args.vocab < 1:
        parser.error(f"--vocab must be >= 1, got {args.vocab}")
    if args.kernels is not None and not os.path.isfile(args.kernels):
        parser.error(f"--kernels: no such file {args.kernels!r}")
    kernels = None if args.kernels is None else load_kernels(args.kernels)
    print_report(report(args.arch, args.dtype, args.vocab, kernels), args.arch, args.dtype, args.vocab)


if __name__ == "__main__":
    main()
