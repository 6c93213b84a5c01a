"""Smoke test of the main job: bench_ops.py --quick runs every op and writes its JSON and markdown."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_ops_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_ops.py"), "--quick", "--no-compile", "--repeats", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "bench_ops_cpu_float32_quick.json").read_text())
    ops = {row["op"] for row in result["rows"]}
    assert ops == {"gather_visible", "decoder_input", "ema_update_", "layer_average_targets", "masked_regression_loss",
                   "conv_decoder_block"}
    for row in result["rows"]:
        assert row["fused_s"] > 0 and row["eager_s"] > 0 and row["fused_bytes"] > 0
    assert (tmp_path / "bench_ops_cpu_float32_quick.md").read_text().startswith("Measured on")
