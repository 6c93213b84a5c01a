"""Per-op benchmark: each fused op against eager PyTorch written the way the reference implementation and
MAE write it, and against torch.compile of that eager code, at data2vec 2.0 shapes.

For every op and shape it reports the median time (forward + backward where the op has a backward),
the effective bandwidth of the fused op (the bytes it must move / its time), that bandwidth as a
fraction of this machine's measured copy bandwidth, and an on-paper GPU projection: the bytes the
fused kernel moves against the bytes the eager chain moves kernel by kernel, at H100 (3.35 TB/s) and
H200 (4.8 TB/s) HBM bandwidth. Projections are arithmetic, not measurements; `--device cuda` measures.

    python benchmarks/bench_ops.py                    # all ops, CPU, fp32, results in benchmarks/results/
    python benchmarks/bench_ops.py --quick            # fewer repeats, smaller shapes (smoke test)
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16

The script re-executes itself with glibc's MALLOC_MMAP_MAX_=0 (see MALLOC_ENV) so page faults on fresh
allocations do not dominate either side; D2V2_BENCH_RAW_MALLOC=1 keeps the default allocator behaviour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import d2v2_kernels as dk

HBM = {"H100": 3.35e12, "H200": 4.8e12}


# --- timing ----------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats: int, min_time: float = 0.2) -> float:
    """Median over `repeats` of the mean time of a batch of calls (batch sized to last ~min_time/repeats)."""
    fn()  # warm-up (compiles, allocator)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    iters = max(1, int(min_time / repeats / one))
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def copy_bandwidth(device, repeats: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the machine's practical bandwidth roof."""
    n = 64 * 2**20  # 256 MB of fp32: far beyond the caches
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / t


# --- cases -----------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    shape: str  # human-readable shape label
    fused: callable  # runs the fused op (fwd+bwd)
    eager: callable  # the eager chain (fwd+bwd)
    eager_fn_for_compile: callable | None  # forward function to compile; run as compiled(...) in `compiled`
    compiled_runner: callable | None
    fused_bytes: int  # what the fused kernels must move
    eager_bytes: list = field(default_factory=list)  # [(kernel, bytes)] of the eager chain


def _fwd_bwd(fn, *inputs):
    """Returns a closure that runs fn(*inputs) and backpropagates a fixed gradient into inputs[0]."""
    x = inputs[0]
    with torch.no_grad():
        grad = torch.ones_like(fn(*inputs))

    def run():
        x.grad = None
        fn(*inputs).backward(grad)

    return run


def gather_cases(dev, dtype, quick):
    shapes = {  # name: (B, T, C, clones, K)
        "image ViT-B (B16 T196 C768 M16 K39)": (16, 196, 768, 16, 39),
        "audio base (B4 T999 C768 M8 K499)": (4, 999, 768, 8, 499),
        "text base (B8 T512 C768 M8 K266)": (8, 512, 768, 8, 266),
    }
    if quick:
        shapes = {"image small (B4 T196 C192 M8 K39)": (4, 196, 192, 8, 39)}
    from d2v2_kernels.ops.gather import gather_visible_reference

    for label, (B, T, C, M, K) in shapes.items():
        e = torch.tensor([], dtype=dtype).element_size()
        x = torch.randn(B, T, C, device=dev, dtype=dtype, requires_grad=True)
        ids = torch.rand(B * M, T, device=dev).argsort(1)[:, :K]
        N = B * M
        compiled = torch.compile(gather_visible_reference)
        yield Case(
            "gather_visible", label,
            fused=_fwd_bwd(lambda x: dk.gather_visible(x, ids, M), x),
            eager=_fwd_bwd(lambda x: gather_visible_reference(x, ids, M), x),
            eager_fn_for_compile=gather_visible_reference,
            compiled_runner=_fwd_bwd(lambda x: compiled(x, ids, M), x),
            fused_bytes=(2 * N * K * C + N * K * C + B * T * C) * e + N * K * 8,
            eager_bytes=[
                ("repeat_interleave", (B * T * C + N * T * C) * e),
                ("gather", 2 * N * K * C * e + N * K * 8),
                ("zeros (gather backward)", N * T * C * e),
                ("scatter_add", 3 * N * K * C * e + N * K * 8),
                ("sum over clones (repeat_interleave backward)", (N * T * C + B * T * C) * e),
            ],
        )


def decoder_input_eager(x_vis, ids_restore, noise_std):
    """The reference implementation's decoder input: noise for masked slots, cat, gather back in place."""
    N, K, C = x_vis.shape
    noise = x_vis.new_empty(N, ids_restore.shape[1] - K, C).normal_(0, noise_std)
    return torch.gather(torch.cat([x_vis, noise], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, C))


def decoder_input_cases(dev, dtype, quick):
    shapes = {  # name: (N, T, K, C)
        "image ViT-B (N256 T196 K39 C768)": (256, 196, 39, 768),
        "audio base (N32 T999 K499 C768)": (32, 999, 499, 768),
        "text base (N64 T512 K266 C768)": (64, 512, 266, 768),
    }
    if quick:
        shapes = {"image small (N32 T196 K39 C192)": (32, 196, 39, 192)}
    for label, (N, T, K, C) in shapes.items():
        e = torch.tensor([], dtype=dtype).element_size()
        x = torch.randn(N, K, C, device=dev, dtype=dtype, requires_grad=True)
        ids_restore = torch.rand(N, T, device=dev).argsort(1).argsort(1)
        compiled = torch.compile(decoder_input_eager)
        yield Case(
            "decoder_input", label,
            fused=_fwd_bwd(lambda x: dk.decoder_input(x, ids_restore, 0.01), x),
            eager=_fwd_bwd(lambda x: decoder_input_eager(x, ids_restore, 0.01), x),
            eager_fn_for_compile=decoder_input_eager,
            compiled_runner=_fwd_bwd(lambda x: compiled(x, ids_restore, 0.01), x),
            # forward reads the visible rows, writes every row; backward reads and writes the visible rows
            fused_bytes=(N * K * C + N * T * C + 2 * N * K * C) * e + 2 * N * T * 8,
            eager_bytes=[
                ("normal_ (noise)", N * (T - K) * C * e),
                ("cat", 2 * N * T * C * e),
                ("gather", 2 * N * T * C * e + N * T * 8),
                ("zeros (gather backward)", N * T * C * e),
                ("scatter_add", 3 * N * T * C * e + N * T * 8),
                ("slice copy (cat backward)", 2 * N * K * C * e),
            ],
        )


def targets_eager(layers, final_layer_norm):
    """The reference implementation's make_targets: instance norm per layer (through transposes),
    sequential sum, division by K, optional final layer norm over channels."""
    y = None
    for t in layers:
        t = F.instance_norm(t.float().transpose(1, 2), eps=1e-5).transpose(1, 2)
        y = t if y is None else y.add_(t)
    y = y.div_(len(layers))
    return F.layer_norm(y, y.shape[-1:], eps=1e-5) if final_layer_norm else y


def targets_cases(dev, dtype, quick):
    shapes = {  # name: (K, B, T, C, final)
        "image ViT-B IN>avg>LN (K10 B16 T196 C768)": (10, 16, 196, 768, "layer"),
        "audio base IN>avg (K8 B4 T999 C768)": (8, 4, 999, 768, None),
        "text base IN>avg (K12 B8 T512 C768)": (12, 8, 512, 768, None),
    }
    if quick:
        shapes = {"image small IN>avg>LN (K4 B4 T196 C192)": (4, 4, 196, 192, "layer")}
    for label, (K, B, T, C, final) in shapes.items():
        e = torch.tensor([], dtype=dtype).element_size()
        buf = torch.randn(K, B, T, C, device=dev, dtype=dtype)
        layers = list(buf.unbind(0))
        compiled = torch.compile(targets_eager)
        final_ln = final == "layer"
        n = B * T * C
        yield Case(
            "layer_average_targets", label,
            fused=lambda: dk.layer_average_targets(buf, layer_norm="instance", final_norm=final),
            eager=lambda: targets_eager(layers, final_ln),
            eager_fn_for_compile=targets_eager,
            compiled_runner=lambda: compiled(layers, final_ln),
            # a statistics pass and a normalise-average pass over the K layers, one fp32 write
            fused_bytes=2 * K * n * e + n * 4,
            eager_bytes=[
                ("float() copy per layer", K * n * (e + 4) if e != 4 else 0),
                ("instance_norm per layer (stats + normalise)", K * n * 3 * 4),
                ("add_ per layer", (K - 1) * n * 3 * 4),
                ("div_", 2 * n * 4),
            ] + ([("layer_norm", 3 * n * 4)] if final_ln else []),
        )


def loss_eager(pred, target, mask, clones):
    """The reference implementation's regression loss: repeat the targets for the clones, boolean-index
    both sides, MSE summed over channels and scaled by 1/sqrt(C), mean over masked tokens."""
    y = target.repeat_interleave(clones, 0)[mask]
    p = pred[mask]
    loss = F.mse_loss(p.float(), y.float(), reduction="none").sum(-1) / p.shape[-1] ** 0.5
    return loss.mean()


def loss_cases(dev, dtype, quick):
    shapes = {  # name: (B, clones, T, C, masked per row)
        "image ViT-B (B16 M16 T196 C768, 157 masked)": (16, 16, 196, 768, 157),
        "audio base (B4 M8 T999 C768, 500 masked)": (4, 8, 999, 768, 500),
        "text base (B8 M8 T512 C768, 246 masked)": (8, 8, 512, 768, 246),
    }
    if quick:
        shapes = {"image small (B4 M8 T196 C192, 157 masked)": (4, 8, 196, 192, 157)}
    for label, (B, M, T, C, masked) in shapes.items():
        e = torch.tensor([], dtype=dtype).element_size()
        N = B * M
        pred = torch.randn(N, T, C, device=dev, dtype=dtype, requires_grad=True)
        target = torch.randn(B, T, C, device=dev)
        mask = torch.zeros(N, T, dtype=torch.bool, device=dev)
        mask.scatter_(1, torch.rand(N, T, device=dev).argsort(1)[:, :masked], True)
        compiled = torch.compile(loss_eager)
        Nm = N * masked
        yield Case(
            "masked_regression_loss", label,
            fused=_fwd_bwd(lambda p: dk.masked_regression_loss(p, target, mask, clones=M), pred),
            eager=_fwd_bwd(lambda p: loss_eager(p, target, mask, M), pred),
            eager_fn_for_compile=loss_eager,
            compiled_runner=_fwd_bwd(lambda p: compiled(p, target, mask, M), pred),
            # read the masked pred rows and the shared target once, write the full gradient once
            fused_bytes=(Nm * C + N * T * C) * e + B * T * C * 4 + N * T,
            eager_bytes=[
                ("repeat_interleave (target)", (B * T * C + N * T * C) * 4),
                ("boolean index (target, pred)", N * T * C * (4 + e) + Nm * C * (4 + e)),
                ("mse_loss + sum(-1)", Nm * C * 3 * 4),
                ("mse backward", Nm * C * 3 * 4),
                ("zeros + index_put (pred grad)", N * T * C * e + Nm * C * e),
            ],
        )


def vit_b_param_shapes():
    """The parameter list of a ViT-B/16 encoder (86M parameters), as the EMA teacher sees it."""
    C, H = 768, 3072
    shapes = [(C, 3, 16, 16), (C,), (1, 1, C), (1, 197, C)]
    for _ in range(12):
        shapes += [(3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (H, C), (H,), (C, H), (C,), (C,), (C,)]
    return shapes + [(C,), (C,)]


def ema_cases(dev, dtype, quick):
    from d2v2_kernels.ops.ema import ema_update_foreach, ema_update_per_param_loop

    shapes = vit_b_param_shapes()
    if quick:
        shapes = [(s[0] // 4,) + tuple(s[1:]) for s in shapes[:40]]
    student_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    teacher = [torch.randn(s, device=dev, dtype=torch.float32) for s in shapes]
    student = [torch.randn(s, device=dev, dtype=student_dtype) for s in shapes]
    P = sum(t.numel() for t in teacher)
    se = torch.tensor([], dtype=student_dtype).element_size()
    compiled = torch.compile(ema_update_per_param_loop)
    label = f"ViT-B params ({P / 1e6:.1f}M, fp32 teacher, {str(student_dtype)[6:]} student)"
    yield Case(
        "ema_update_", label,
        fused=lambda: dk.ema_update_(teacher, student, 0.9998),
        eager=lambda: ema_update_per_param_loop(teacher, student, 0.9998),
        eager_fn_for_compile=ema_update_per_param_loop,
        compiled_runner=lambda: compiled(teacher, student, 0.9998),
        fused_bytes=P * (4 + se + 4),
        eager_bytes=[
            ("mul_ (teacher)", 2 * P * 4),
            ("to(fp32) (student)", P * (se + 4)),
            ("add_", 3 * P * 4),
        ],
    )
    yield Case(
        "ema_update_", label + " vs foreach",
        fused=lambda: dk.ema_update_(teacher, student, 0.9998),
        eager=lambda: ema_update_foreach(teacher, student, 0.9998),
        eager_fn_for_compile=None,
        compiled_runner=None,
        fused_bytes=P * (4 + se + 4),
        eager_bytes=[("_foreach to(fp32) (student)", P * (se + 4)), ("_foreach_lerp_", 3 * P * 4)],
    )


def conv_block_eager(x_cf, weight, bias, groups):
    """The reference decoder layer as it runs it, channels-first: Conv -> TransposeLast -> LayerNorm (no
    affine) -> TransposeLast -> GELU -> + residual."""
    y = (F.conv1d if x_cf.dim() == 3 else F.conv2d)(x_cf, weight, bias, padding=weight.shape[-1] // 2, groups=groups)
    y = F.layer_norm(y.transpose(1, -1), (y.shape[1],)).transpose(1, -1)
    return F.gelu(y) + x_cf


def conv_decoder_cases(dev, dtype, quick):
    shapes = {  # name: (N, spatial, C, k, groups); N = B * M rows, cut down for a 2-core CPU
        "images base (N32 14x14 C768 k3 g16)": (32, (14, 14), 768, 3, 16),
        "audio base (N16 T499 C384 k7 g16)": (16, (499,), 384, 7, 16),
        "text base (N2 T512 C768 k9 g1)": (2, (512,), 768, 9, 1),
    }
    if quick:
        shapes = {"images small (N8 14x14 C192 k3 g16)": (8, (14, 14), 192, 3, 16)}
    for label, (N, spatial, C, k, groups) in shapes.items():
        e = torch.tensor([], dtype=dtype).element_size()
        x = torch.randn(N, *spatial, C, device=dev, dtype=dtype, requires_grad=True)
        x_cf = x.detach().movedim(-1, 1).contiguous().requires_grad_(True)  # the reference keeps activations NCHW
        w = (torch.randn(C, C // groups, *([k] * len(spatial)), device=dev, dtype=dtype) * 0.05).requires_grad_(True)
        b = torch.zeros(C, device=dev, dtype=dtype, requires_grad=True)
        compiled = torch.compile(conv_block_eager)
        A = N * math.prod(spatial) * C * e  # one activation tensor
        yield Case(
            "conv_decoder_block", label,
            fused=_fwd_bwd(lambda x_, w_, b_: dk.conv_decoder_block(x_, w_, b_, groups=groups), x, w, b),
            eager=_fwd_bwd(lambda x_, w_, b_: conv_block_eager(x_, w_, b_, groups), x_cf, w, b),
            eager_fn_for_compile=conv_block_eager,
            compiled_runner=_fwd_bwd(lambda x_, w_, b_: compiled(x_, w_, b_, groups), x_cf, w, b),
            # forward: conv reads x, writes z; the epilogue reads z (+ x) and writes out. Backward: the
            # epilogue reads grad, z, writes grad_z; the conv backward reads grad_z twice and x, writes dx.
            fused_bytes=11 * A,
            eager_bytes=[("conv", 2 * A), ("transpose + layer_norm", 3 * A), ("gelu", 2 * A), ("add", 3 * A),
                         ("backward (add, gelu, layer_norm, transposes)", 9 * A), ("conv backward", 4 * A)],
        )


CASES = {
    "gather_visible": gather_cases,
    "decoder_input": decoder_input_cases,
    "ema_update_": ema_cases,
    "layer_average_targets": targets_cases,
    "masked_regression_loss": loss_cases,
    "conv_decoder_block": conv_decoder_cases,
}


# --- report ----------------------------------------------------------------------------------------


def run(args) -> dict:
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = dk.build_info()
    machine = {
        "device": info["cuda_device"] if dev.type == "cuda" else f"{platform.processor() or platform.machine()} CPU",
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": info["triton"]["version"],
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
    }
    copy_bw = copy_bandwidth(dev, args.repeats)
    print(f"# bench_ops on {machine['device']} ({machine['cpu_threads']} threads), {args.dtype}, "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    for op in args.ops:
        for case in CASES[op](dev, dtype, args.quick):
            row = {"op": case.op, "shape": case.shape, "backend": dk.backends.resolve(case.op, dev)}
            row["fused_s"] = median_seconds(case.fused, dev, args.repeats)
            row["eager_s"] = median_seconds(case.eager, dev, args.repeats)
            row["compile_s"] = (median_seconds(case.compiled_runner, dev, args.repeats)
                                if case.compiled_runner and not args.no_compile else None)
            row["speedup_vs_eager"] = row["eager_s"] / row["fused_s"]
            row["speedup_vs_compile"] = row["compile_s"] / row["fused_s"] if row["compile_s"] else None
            row["fused_bytes"] = case.fused_bytes
            row["eager_bytes"] = sum(b for _, b in case.eager_bytes)
            row["eager_kernels"] = [{"kernel": k, "bytes": b} for k, b in case.eager_bytes]
            row["fused_GBps"] = case.fused_bytes / row["fused_s"] / 1e9
            row["fraction_of_copy_bw"] = case.fused_bytes / row["fused_s"] / copy_bw
            row["gpu_projection_us"] = {
                gpu: {"fused": case.fused_bytes / bw * 1e6, "eager": row["eager_bytes"] / bw * 1e6}
                for gpu, bw in HBM.items()
            }
            rows.append(row)
            c = f"{row['speedup_vs_compile']:.2f}x" if row["speedup_vs_compile"] else "-"
            print(f"{case.op:<14} {case.shape:<52} fused {row['fused_s'] * 1e3:8.2f} ms  "
                  f"eager {row['eager_s'] * 1e3:8.2f} ms ({row['speedup_vs_eager']:5.2f}x)  compile {c:>6}  "
                  f"{row['fused_GBps']:6.1f} GB/s ({row['fraction_of_copy_bw']:.0%} of copy)", flush=True)
    return {"machine": machine, "dtype": args.dtype, "device": args.device, "copy_bandwidth_GBps": copy_bw / 1e9,
            "repeats": args.repeats, "quick": args.quick, "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Measured on {m['device']} ({m['cpu_threads']} threads), torch {m['torch']}, {result['dtype']}, "
        f"median of {result['repeats']} repeats; copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s. "
        "Times are forward + backward where the op has a backward.",
        "",
        "| op | shape | backend | fused ms | eager ms | compile ms | vs eager | vs compile | fused GB/s | of copy BW |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        comp = f"{r['compile_s'] * 1e3:.2f}" if r["compile_s"] else "-"
        vs_c = f"{r['speedup_vs_compile']:.2f}x" if r["speedup_vs_compile"] else "-"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['backend']} | {r['fused_s'] * 1e3:.2f} | {r['eager_s'] * 1e3:.2f} | "
            f"{comp} | {r['speedup_vs_eager']:.2f}x | {vs_c} | {r['fused_GBps']:.1f} | {r['fraction_of_copy_bw']:.0%} |"
        )
    lines += [
        "",
        "On-paper GPU projection (bytes / HBM bandwidth; not a measurement):",
        "",
        "| op | shape | fused MB | eager MB | bytes ratio | H100 fused / eager µs | H200 fused / eager µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        p = r["gpu_projection_us"]
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['fused_bytes'] / 1e6:.1f} | {r['eager_bytes'] / 1e6:.1f} | "
            f"{r['eager_bytes'] / r['fused_bytes']:.1f}x | {p['H100']['fused']:.0f} / {p['H100']['eager']:.0f} | "
            f"{p['H200']['fused']:.0f} / {p['H200']['eager']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# glibc returns large blocks to the OS on free and page-faults them back in on the next allocation,
# which costs eager and fused code alike up to 2x on this CPU; keep freed memory in the heap instead.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def main(argv=None):
    if os.environ.get("D2V2_BENCH_RAW_MALLOC") != "1" and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ops", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="small shapes, 3 repeats: a smoke run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    unknown = set(args.ops) - set(CASES)
    if unknown:
        p.error(f"--ops: unknown op(s) {sorted(unknown)}; choose from {list(CASES)}")
    if args.quick:
        args.repeats = min(args.repeats, 3)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device on this machine")
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = f"bench_ops_{args.device}_{args.dtype}" + ("_quick" if args.quick else "")
    for ext, text in (("json", json.dumps(result, indent=1)), ("md", markdown(result))):
        path = os.path.join(args.out, f"{stem}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)  # atomic: a killed run never leaves half a table
    print(f"wrote {os.path.join(args.out, stem)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
