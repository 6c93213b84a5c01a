"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, with no GPU needed.

Each op module lists its kernels in `aot_specs()`: (kernel, signature, constexprs) per dtype variant.
Pointer arguments get a divisibility-16 hint, as the JIT gives aligned torch allocations, so the PTX
shows the 128-bit vector loads a real launch gets. `cuobjdump --dump-resource-usage` on the cubin
reports registers and local memory; LOCAL > 0 means register spills and fails the check.

    python -m d2v2_kernels.ops.aot            # table of REG / LOCAL per kernel, arch, variant
    python -m d2v2_kernels.ops.aot --check    # exit 1 on any spill or compile error
(Must run without TRITON_INTERPRET=1: the interpreter replaces kernels with Python functions.)
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

OP_MODULES = ("gather", "decoder_input", "ema", "targets", "loss", "conv_decoder")
ARCHS = (80, 90)


def _specs():
    for name in OP_MODULES:
        try:
            mod = importlib.import_module(f"d2v2_kernels.ops.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"d2v2_kernels.ops.{name}":
                continue
            raise
        if hasattr(mod, "aot_specs"):
            for kernel, signature, constexprs in mod.aot_specs():
                yield name, kernel, signature, constexprs


def compile_one(kernel, signature, constexprs, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    args = kernel.arg_names
    attrs = {(args.index(k),): [["tt.divisibility", 16]] for k, v in signature.items() if v.startswith("*")}
    full_sig = dict(signature)
    for k in constexprs:
        full_sig[k] = "constexpr"
    src = ASTSource(fn=kernel, signature=full_sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes) per thread, from cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return int(reg.group(1)), int(local.group(1))


def run(check: bool) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: unset TRITON_INTERPRET (the interpreter cannot compile kernels)", file=sys.stderr)
        return 2
    failures = 0
    rows = 0
    print(f"{'op':<14} {'kernel':<34} {'arch':>5} {'variant':<28} {'REG':>4} {'LOCAL':>6}")
    for op, kernel, signature, constexprs in _specs():
        variant = ",".join(sorted({v for v in signature.values() if v.startswith("*")}))
        for arch in ARCHS:
            rows += 1
            try:
                compiled = compile_one(kernel, signature, constexprs, arch)
                reg, local = resource_usage(compiled.asm["cubin"])
            except Exception as e:  # report every failing kernel, not just the first
                failures += 1
                print(f"{op:<14} {kernel.__name__:<34} {arch:>5} {variant:<28} FAILED: {type(e).__name__}: {e}")
                continue
            status = "" if local == 0 else "  <- spills"
            failures += local > 0
            print(f"{op:<14} {kernel.__name__:<34} sm_{arch:<3} {variant:<28} {reg:>4} {local:>6}{status}")
    print(f"{rows} compiles, {failures} failures")
    if rows == 0:
        return 1
    return 1 if (check and failures) else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit non-zero on spills or compile errors")
    sys.exit(run(p.parse_args(argv).check))


if __name__ == "__main__":
    main()
