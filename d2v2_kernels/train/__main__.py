"""`python -m d2v2_kernels.train` / `d2v2 train`: pretrain data2vec 2.0 (or MAE) on images.

    d2v2 train --preset fmnist-tiny                      # seconds per epoch on a 2-core CPU
    d2v2 train --preset fmnist-small epochs=5 lr=5e-4    # any config field as key=value
    d2v2 train --preset fmnist-small --resume            # continue the run in out_dir exactly
    torchrun --nproc_per_node 2 -m d2v2_kernels.train --preset fmnist-tiny   # DDP (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import sys

from .config import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="fmnist-tiny", choices=sorted(PRESETS))
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config fields to override")


def run(args: argparse.Namespace) -> int:
    from .config import make_config
    from .loop import TrainingError, train
    from .methods import build_method

    try:
        cfg = make_config(args.preset, args.overrides)
        summary = train(cfg, build_method, resume=args.resume)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"d2v2 train: error: {e}", file=sys.stderr)
        return 1
    if summary["losses"]:
        print(f"trained {summary['steps']} steps in {summary['train_seconds']:.1f}s "
              f"({summary['images_per_s']:.0f} img/s); last loss {summary['losses'][-1]:.4f}; "
              f"checkpoints and metrics.jsonl in {cfg.out_dir}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="d2v2 train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
