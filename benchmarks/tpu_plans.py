"""The paper presets compiled for TPU v5p slices with libtpu, on this CPU machine (no TPU).

For each preset, the smallest v5p slice (4, 8, 16, 32, 64, 128 chips) whose compiled train step fits
the chip's HBM, at the paper's batch size: `blip-jax train --dry_run --topology=...` in a
subprocess, a slice the train state alone cannot fit refused before compiling. Writes
results/tpu_plans_v5p.json and prints the README's table.

    python benchmarks/tpu_plans.py                          # every preset, ~30-60 min on 2 cores
    python benchmarks/tpu_plans.py --only blip2_stage1.py:vitg
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["blip2_stage1.py:vitg", "blip2_stage2_opt.py:vitg_opt2.7b", "blip2_stage2_opt.py:vitg_opt6.7b",
           "blip2_stage2_t5.py:vitg_flant5xl", "blip2_stage2_t5.py:vitg_flant5xxl",
           "instructblip_vicuna.py:vitg_vicuna7b", "instructblip_vicuna.py:vitg_vicuna13b",
           "instructblip_t5.py:vitg_flant5xl", "instructblip_t5.py:vitg_flant5xxl", "blip_pretrain.py:base"]
SLICES = ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8"]


def command(preset: str, topology: str) -> list[str]:
    return ["blip-jax", "train", "--dry_run", f"--config=configs/{preset}", f"--topology={topology}"]


def smallest_slice(preset: str) -> dict:
    tried = []
    for topology in SLICES:
        start = time.time()
        done = subprocess.run([sys.executable, "-m", "blip_jax.cli", *command(preset, topology)[1:]], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        seconds = round(time.time() - start, 1)
        if done.returncode:
            tried.append({"topology": topology, "refused": done.stderr.strip().splitlines()[-1][:300]})
            continue
        plan = json.loads(done.stdout)
        if not plan["tpu"]["fits"]:
            tried.append({"topology": topology, "peak_gib": plan["per_device_gib"]["peak_estimate"]})
            continue
        return {"preset": preset, "command": " ".join(command(preset, topology)), "compile_and_plan_seconds": seconds,
                "plan": plan, "smaller_slices": tried}
    return {"preset": preset, "fits": None, "smaller_slices": tried}


def table(rows: list[dict]) -> str:
    lines = ["| preset | slice | global batch | params (trainable / frozen) | peak GiB / chip (HBM 95.7) | "
             "TFLOPs / chip / step | est. step s | projected MFU | all-reduce / all-gather / reduce-scatter GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "plan" not in row:
            lines.append(f"| {row['preset']} | none up to {SLICES[-1]} | | | | | | | |")
            continue
        p, t = row["plan"], row["plan"]["tpu"]
        c = t["collective_bytes_per_device"]
        gb = " / ".join(f"{c.get(k, 0) / 1e9:.2f}" for k in ("all-reduce", "all-gather", "reduce-scatter"))
        lines.append(f"| `{row['preset']}` | {t['topology']} ({t['chips']} chips) | {p['global_batch']} | "
                     f"{p['parameters']['trainable'] / 1e6:.0f}M / {p['parameters']['frozen'] / 1e6:.0f}M | "
                     f"{p['per_device_gib']['peak_estimate']:.1f} | {p['flops_per_step_per_device'] / 1e12:.1f} | "
                     f"{t['estimated_step_seconds']:.2f} | {t['projected_mfu']:.2f} | {gb} |")
    return "\n".join(lines)


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated presets (config file:preset)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tpu_plans_v5p.json")
    args = parser.parse_args()
    # rows already measured are kept (a long run resumes); each new one is written when it is done
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    for preset in args.only.split(",") if args.only else PRESETS:
        if any(row["preset"] == preset for row in rows):
            continue
        rows.append(smallest_slice(preset))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "plan"}), flush=True)
        write_report(args.out, {"rows": rows, "table": table(rows)})
    print(table(rows))


if __name__ == "__main__":
    main()
