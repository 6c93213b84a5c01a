"""The main job's pipeline end to end (`speed_vs_mae.py --quick`): train, evaluate, profile, write results."""

import json
import os
import subprocess
import sys

import pytest

from d2v2_kernels.data.images import load_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_speed_vs_mae_quick(tmp_path):
    try:
        load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "speed_vs_mae.py"), "--quick", "--no-progress",
         "--runs", "mae", "d2v2", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["methods"]) == {"MAE", "data2vec 2.0 (fused ops)"}
    assert "ratio_time_to_mae_accuracy" in result
    if result["ratio_time_to_mae_accuracy"] is None:
        assert result["reason"]
    for name, m in result["methods"].items():
        points = m["points"]
        assert points and all({"wall_seconds", "step", "accuracy"} <= p.keys() for p in points)
        assert len({p["step"] for p in points}) == len(points), f"{name}: an evaluation point is repeated"
        assert 10.0 < points[-1]["accuracy"] <= 100.0  # better than chance on 10 classes
        assert m["steps"] > 0 and m["images_per_s"] > 0
        assert result["step_profiles"][name]["top_ops"]
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("seed,method,wall_seconds,step") and len(rows) > 2
    assert (tmp_path / "accuracy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in proc.stdout
