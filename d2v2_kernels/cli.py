"""`d2v2` command line: `d2v2 info` (what was built, which backends each op can use here),
`d2v2 aot [--check]` (ahead-of-time compile of the Triton kernels for sm_80/sm_90)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="d2v2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="build info and available backends per op")
    info.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    aot = sub.add_parser("aot", help="compile every Triton kernel for sm_80/sm_90 and report spills")
    aot.add_argument("--check", action="store_true", help="exit non-zero on spills or compile errors")
    args = parser.parse_args(argv)

    if args.command == "info":
        import d2v2_kernels as dk

        print(json.dumps({"build": dk.build_info(), "backends": dk.available_backends(args.device)}, indent=2))
        return 0
    if args.command == "aot":
        from d2v2_kernels.ops import aot as aot_mod

        return aot_mod.run(args.check)
    return 2


if __name__ == "__main__":
    sys.exit(main())
