"""The first hour's quick run, as a new user runs it: `vggprice run --quick` on a fresh
store and a fresh Prefect home, wall time and test RMSE, for each candidate preset.

Each option is one `vggprice run` subprocess (ingest, label, train, evaluate, promote,
its temporary Prefect server included), one after the other; nothing else should run
meanwhile. `--isa avx2` caps oneDNN at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) and trains in
float32, which is how an AVX2-only laptop runs (TensorFlow's other kernels are built
for AVX anyway); prints the CPU and its features first.

    .venv/bin/python bench/quick_run.py [--isa avx2] [--options quick,half]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_line

from tasks.model.train_settings import QUICK

REPO = Path(__file__).resolve().parents[1]

# name -> settings on top of the weights=none defaults (`quick` is QUICK as shipped)
OPTIONS = {
    "quick": {},
    "3000x1": {"train_limit": 3000, "epochs": 1},
    "6000x2": {"train_limit": 6000, "epochs": 2},  # the preset before
    "frozen-random": {"train_limit": 6000, "epochs": 2, "freeze": 15},  # random base, cached
}


def run_option(name: str, isa: str | None, workdir: Path) -> dict:
    fields = dict(QUICK) | OPTIONS[name]
    if isa:
        fields["precision"] = "float32"
    sets = [a for k, v in fields.items() for a in ("--set", f"{k}={v}")]
    env = os.environ | {"PREFECT_HOME": str(workdir / f"{name}-prefect")}
    env.pop("PREFECT_API_URL", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa.upper()
    cmd = [sys.executable, "-m", "flows.cli", "run", "--json", "--force",
           "--store", str(workdir / f"{name}-lake"), *sets]  # fmt: skip
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if done.returncode:
        return {"option": name, "error": done.stderr.strip().splitlines()[-1:]}
    out = json.loads(done.stdout)
    trained = out["train"]
    return {
        "option": name,
        "settings": {k: v for k, v in fields.items() if k != "weights"},
        "wall_s": round(wall, 1),
        "train_images_per_s": trained.get("images_per_second"),
        "rmse": round(out["evaluate"]["rmse"], 2),
        "baseline_rmse": round(out["evaluate"]["baseline_rmse"], 2),
        "precision": trained["settings"]["precision"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--isa", choices=["avx2"], help="run as an AVX2-only CPU would")
    ap.add_argument("--options", default="quick", help=f"comma-separated: {', '.join(OPTIONS)}")
    args = ap.parse_args()
    print(cpu_line() + (f"; oneDNN capped at {args.isa.upper()}, float32" if args.isa else ""))
    with tempfile.TemporaryDirectory(prefix="vggprice-quick-") as tmp:
        for name in args.options.split(","):
            print(json.dumps(run_option(name, args.isa, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
