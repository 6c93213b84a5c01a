"""Whole training step of data2vec 2.0 (or MAE), fused backends against `dk.use_backend("reference")`,
with a per-op breakdown of where the time goes.

One step = masks + forward (student, teacher, targets, decoder, loss) + backward + AdamW + EMA update,
exactly what `d2v2 train` runs. Both variants run in this process on the same batch, alternating, median
of the repeats; the breakdown comes from torch.profiler (self CPU time per op, d2v2:: ops by name).

    python benchmarks/bench_step.py                        # fmnist-small (the calibration model), CPU
    python benchmarks/bench_step.py --preset fmnist-tiny --repeats 5
    python benchmarks/bench_step.py --method mae
    python benchmarks/bench_step.py amp=bf16               # bf16 autocast, as speed_vs_mae trains
Writes benchmarks/results/bench_step_<preset>_<method>_<device>[_bf16].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import d2v2_kernels as dk  # noqa: E402
from d2v2_kernels.data.images import load_fashion_mnist, to_float  # noqa: E402
from d2v2_kernels.train.config import make_config  # noqa: E402
from d2v2_kernels.train.loop import make_optimizer  # noqa: E402
from d2v2_kernels.train.methods import build_method  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "-1"}
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def make_step(method, optimizer, images, batch_size, seed=0):
    state = {"step": 0}
    if hasattr(method, "set_full_logs"):
        method.set_full_logs(False)  # as the trainer runs the steps it does not log

    def step():
        gen = torch.Generator().manual_seed(seed + state["step"])
        masks = method.make_masks(batch_size, gen)
        loss, _ = method(images, **masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 4.0)
        optimizer.step()
        state["step"] += 1
        method.after_step(state["step"])
        return loss

    return step


def timed(fn, sync) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def breakdown(step, steps: int, top: int) -> list[dict]:
    """Self CPU time per op over `steps` steps, largest first, as ms per step and share of the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()]
    total = sum(r[1] for r in rows)
    rows.sort(key=lambda r: -r[1])
    out = [{"op": k, "ms_per_step": ms, "calls_per_step": n, "share": ms / total} for k, ms, n in rows[:top]]
    fused = sum(r[1] for r in rows if r[0].startswith("d2v2::"))
    out.append({"op": "(all d2v2:: ops)", "ms_per_step": fused, "calls_per_step": None, "share": fused / total})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fmnist-small")
    parser.add_argument("--method", default="data2vec2")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_MAX_") is None and os.environ.get("D2V2_BENCH_RAW_MALLOC") != "1":
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})

    cfg = make_config(args.preset, [f"method={args.method}"] + args.overrides)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        raw, _ = load_fashion_mnist("train", cfg.data_dir)
        images = to_float(raw[: cfg.batch_size]).to(device)
    except FileNotFoundError:
        images = torch.randn(cfg.batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")

    variants = {}
    for name in ("fused", "reference"):
        torch.manual_seed(cfg.seed)
        method = build_method(cfg).to(device)
        opt = make_optimizer(cfg, method, device)
        step = make_step(method, opt, images, cfg.batch_size)
        backend = "auto" if name == "fused" else "reference"

        def run(step=step, backend=backend):
            with dk.use_backend(backend), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                step()

        run(), run()  # warm-up: allocator, oneDNN primitives, Triton compile
        variants[name] = {"run": run, "times": []}
    for _ in range(args.repeats):
        for v in variants.values():
            v["times"].append(timed(v["run"], sync))
    for name, v in variants.items():
        backend = "auto" if name == "fused" else "reference"
        with dk.use_backend(backend):
            v["breakdown"] = breakdown(v["run"], args.profile_steps, args.top)

    med = {k: statistics.median(v["times"]) for k, v in variants.items()}
    result = {
        "machine": f"{platform.machine()} {device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "preset": args.preset, "method": args.method, "config": json.loads(cfg.to_json()),
        "repeats": args.repeats, "step_s": med, "times_s": {k: v["times"] for k, v in variants.items()},
        "speedup": med["reference"] / med["fused"],
        "images_per_s": {k: cfg.batch_size / t for k, t in med.items()},
        "breakdown": {k: v["breakdown"] for k, v in variants.items()},
    }
    os.makedirs(args.out, exist_ok=True)
    amp = "_bf16" if cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda") else ""
    stem = os.path.join(args.out, f"bench_step_{args.preset}_{args.method}_{device.type}{amp}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = [f"Measured on {result['machine']}; {args.method} `{args.preset}` (batch {cfg.batch_size}"
          + (f", M={cfg.clones}" if args.method == "data2vec2" else "") + f", amp {cfg.amp}), median of {args.repeats} steps.", "",
          "| backend | step ms | images/s |", "|---|---|---|"]
    md += [f"| {k} | {med[k] * 1e3:.0f} | {cfg.batch_size / med[k]:.0f} |" for k in variants]
    md += ["", f"Fused step speed-up over the reference ops: **{result['speedup']:.2f}x**", ""]
    for k, v in variants.items():
        md += [f"Where the {k} step spends its time (self CPU, ms per step):", "", "| op | ms | calls | share |",
               "|---|---|---|---|"]
        md += [f"| {r['op']} | {r['ms_per_step']:.1f} | {r['calls_per_step'] if r['calls_per_step'] is not None else ''} "
               f"| {r['share'] * 100:.1f}% |" for r in v["breakdown"]]
        md.append("")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
