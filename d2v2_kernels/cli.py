"""`d2v2` command line: `d2v2 info` (what was built, which backends each op can use here),
`d2v2 aot [--check]` (ahead-of-time compile of the Triton kernels for sm_80/sm_90),
`d2v2 parity GOLDEN_DIR [--backend B]` (the models against the reference implementation's golden data;
exit status 1 when a tensor is out of tolerance), `d2v2 train` (pretraining; see d2v2_kernels/train),
`d2v2 eval RUN_DIR` (k-NN / few-shot / linear-probe accuracy of a run's checkpoint; see d2v2_kernels/eval.py)."""

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
    parity = sub.add_parser("parity", help="compare the models with the golden data of the reference implementation")
    parity.add_argument("golden_dir", help="the golden root (with image/ audio/ text/) or one modality's folder")
    parity.add_argument("--backend", default=None, choices=("auto", "reference", "cpu", "triton", "cuda"),
                        help="backend for every op (default: the one in force, e.g. D2V2_BACKEND)")
    from d2v2_kernels.train import __main__ as train_cli

    train = sub.add_parser("train", help="pretrain data2vec 2.0 (or MAE) on images", description=train_cli.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train_cli.add_arguments(train)
    from d2v2_kernels import eval as eval_cli

    evaluate = sub.add_parser("eval", help="evaluate a run's checkpoint on frozen features (k-NN, linear probe)",
                              description=eval_cli.CLI_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_cli.add_arguments(evaluate)
    args = parser.parse_args(argv)

    if args.command == "info":
        import d2v2_kernels as dk

        print(json.dumps({"build": dk.build_info(), "backends": dk.available_backends(args.device)}, indent=2))
        return 0
    if args.command == "aot":
        from d2v2_kernels.ops import aot as aot_mod

        return aot_mod.run(args.check)
    if args.command == "parity":
        return _parity(args.golden_dir, args.backend)
    if args.command == "train":
        return train_cli.run(args)
    if args.command == "eval":
        return eval_cli.run(args)
    return 2


MODALITIES = ("image", "audio", "text")


def _golden_dirs(root: str) -> list[tuple[str, str]]:
    """(modality, folder) pairs under a golden root, or the one modality folder `root` is."""
    import os

    if os.path.exists(os.path.join(root, "config.json")):
        modality = os.path.basename(os.path.normpath(root))
        try:
            with open(os.path.join(root, "config.json")) as f:
                modality = json.load(f).get("golden", {}).get("modality", modality)
        except (OSError, ValueError):
            pass
        return [(modality, root)]
    return [(m, os.path.join(root, m)) for m in MODALITIES if os.path.isdir(os.path.join(root, m))]


def _parity(root: str, backend: str | None) -> int:
    from d2v2_kernels import get_backend
    from d2v2_kernels.parity import format_rows, image_parity

    dirs = _golden_dirs(root)
    if not dirs:
        print(f"{root}: no golden data here (expected config.json, or image/ audio/ text/ folders)", file=sys.stderr)
        return 2
    failed = False
    for modality, folder in dirs:
        if modality != "image":
            print(f"{modality}: not implemented yet (issue 7)")
            continue
        rows, report = image_parity(folder, backend)
        bad = [r for r in rows if not r.ok]
        print(f"{modality} ({folder}, backend {backend or get_backend()}): {len(rows) - len(bad)}/{len(rows)} tensors "
              f"within tolerance; weights: {len(report.loaded)} loaded, missing {report.missing}, "
              f"unexpected {report.unexpected}")
        print(format_rows(rows))
        failed |= bool(bad) or not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
