"""Writes tests/data/omegaconf_image.pt: the golden image checkpoint re-saved the way a user who loaded it
with fairseq and saved it again would (cfg as an omegaconf DictConfig pickle, student in fp16, numpy
scalars in the trainer state). Needs omegaconf and numpy, which the package itself never imports:

    pip install --target /tmp/omc omegaconf==2.3.0
    PYTHONPATH=/tmp/omc .venv/bin/python tests/data/make_fairseq_fixtures.py ../shared/golden/image
"""

import os
import sys

import numpy as np
import torch
from omegaconf import OmegaConf


def main(golden_image_dir: str) -> None:
    ckpt = torch.load(os.path.join(golden_image_dir, "fairseq_checkpoint.pt"), map_location="cpu", weights_only=True)
    # the golden weights are fp16-exact; the teacher (_ema) as fp16 too, to keep the file small
    model = {k: v.half() if torch.is_tensor(v) else {n: t.half() for n, t in v.items()} for k, v in ckpt["model"].items()}
    resaved = {
        "args": None,
        "cfg": OmegaConf.create(ckpt["cfg"]),
        "model": model,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqAdam",
                               "num_updates": 1, "best_loss": np.float64(1.25)}],
        "extra_state": {"epoch": 1, "train_loss": np.float32(0.5), "val_loss": np.array([0.25])},
    }
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "omegaconf_image.pt")
    torch.save(resaved, out)
    print(f"wrote {out} ({os.path.getsize(out) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../../../shared/golden/image"))
