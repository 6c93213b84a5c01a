"""`d2v2` command line: `d2v2 info` (what was built, which backends each op can use here),
`d2v2 aot [--check]` (ahead-of-time compile of the Triton kernels for sm_80/sm_90),
`d2v2 parity GOLDEN_DIR [--backend B]` (the models against the reference implementation's golden data;
exit status 1 when a tensor is out of tolerance), `d2v2 train` (pretraining; see d2v2_kernels/train),
`d2v2 eval RUN_DIR` (k-NN / few-shot / linear-probe accuracy of a run's checkpoint; see d2v2_kernels/eval.py),
`d2v2 convert IN.pt OUT_DIR` (a fairseq data2vec 2.0 checkpoint to our format; see d2v2_kernels/pretrained)."""

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
    convert = sub.add_parser("convert", help="fairseq data2vec 2.0 checkpoint -> config.json + model.safetensors")
    convert.add_argument("checkpoint", help="a fairseq checkpoint (.pt); read without executing anything in it")
    convert.add_argument("out_dir", help="where to write config.json and model.safetensors")
    convert.add_argument("--no-strict", action="store_true",
                         help="convert even when keys are missing or unused (they are listed)")
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
    if args.command == "convert":
        return _convert(args.checkpoint, args.out_dir, strict=not args.no_strict)
    if args.command == "train":
        return train_cli.run(args)
    if args.command == "eval":
        return eval_cli.run(args)
    return 2


def _convert(checkpoint: str, out_dir: str, strict: bool) -> int:
    from d2v2_kernels.pretrained import CheckpointImportError, load_fairseq, save_pretrained

    try:
        model, report = load_fairseq(checkpoint)
    except CheckpointImportError as e:
        print(f"d2v2 convert: {e}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{checkpoint}: {type(model).__name__}, {n_params / 1e6:.2f}M parameters (student + teacher); "
          f"{len(report.loaded)} tensors loaded, {len(report.missing)} missing, {len(report.unexpected)} unused")
    for label, names in (("missing", report.missing), ("unused", report.unexpected)):
        for name in names:
            print(f"  {label}: {name}")
    if strict and not report.ok:
        print("d2v2 convert: refusing to write an incomplete model (--no-strict writes it anyway)", file=sys.stderr)
        return 1
    save_pretrained(model, out_dir)
    print(f"wrote {out_dir}/config.json and {out_dir}/model.safetensors")
    return 0


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
    from d2v2_kernels.parity.audio import audio_parity
    from d2v2_kernels.parity.text import text_parity

    runners = {"image": image_parity, "audio": audio_parity, "text": text_parity}
    dirs = _golden_dirs(root)
    if not dirs:
        print(f"{root}: no golden data here (expected config.json, or image/ audio/ text/ folders)", file=sys.stderr)
        return 2
    failed = False
    for modality, folder in dirs:
        if modality not in runners:
            print(f"{folder}: unknown modality {modality!r} (expected one of {', '.join(runners)})", file=sys.stderr)
            failed = True
            continue
        rows, report = runners[modality](folder, backend)
        bad = [r for r in rows if not r.ok]
        print(f"{modality} ({folder}, backend {backend or get_backend()}): {len(rows) - len(bad)}/{len(rows)} tensors "
              f"within tolerance; weights: {len(report.loaded)} loaded, missing {report.missing}, "
              f"unexpected {report.unexpected}")
        print(format_rows(rows))
        failed |= bool(bad) or not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
