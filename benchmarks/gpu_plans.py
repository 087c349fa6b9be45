"""One-GPU fine-tuning plans: how large a batch of BLIP-2 OPT-2.7B / FlanT5-XL LoRA and
Q-Former-only fine-tuning fits on one 16 GB and one 24 GB GPU.

Each (preset, batch) is `blip-jax train --dry_run --topology=v6e:1x1` in a subprocess: the train
step compiled by libtpu for one 32 GiB chip, whose buffer assignment (XLA's memory_analysis:
arguments + outputs + temporaries - aliased) stands in for a GPU's. No GPU compiler runs here, and
the CPU backend is no stand-in: it widens every bf16 matmul's weights to fp32 copies (20 GiB for
OPT-2.7B LoRA at batch 1, against 7.1 GiB on the TPU compiler). The presets' settings hold (bf16
frozen towers, full remat). Peak memory is affine in the batch, so two compiles (batch 8 and 64)
give the line; the largest batch under each card's usable memory is read off it and compiled, and
a secant step on the compiled peaks corrects it where the line was optimistic (remat's buffers
grow in steps). Batches above 256 are not searched: ">= 256".
Writes results/gpu_plans.json and prints the README's table.

    python benchmarks/gpu_plans.py                  # 4 presets, ~20-40 min on 2 cores
    python benchmarks/gpu_plans.py --only blip2_lora.py:opt2.7b
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
PRESETS = {"blip2_lora.py:opt2.7b": "LoRA r8 on q/v (LLM)", "blip2_stage2_opt.py:vitg_opt2.7b": "Q-Former only",
           "blip2_lora.py:flant5xl": "LoRA r8 on q/v (LLM)", "blip2_stage2_t5.py:vitg_flant5xl": "Q-Former only"}
# what a training process can use of a card's memory: the CUDA context and allocator reserve ~1 GiB
CARDS_GIB = {"16 GB": 16e9 / 2**30 - 1.0, "24 GB": 24e9 / 2**30 - 1.0}
PROBES = (8, 64)
MAX_BATCH = 256  # beyond this the answer is "any batch you would use": reported as >= 256
STAND_IN = "v6e:1x1"


def compile_plan(preset: str, batch: int) -> dict:
    cmd = [sys.executable, "-m", "blip_jax.cli", "train", "--dry_run", f"--config=configs/{preset}",
           f"--config.batch_size={batch}", "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
           f"--topology={STAND_IN}"]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if done.returncode:
        raise RuntimeError(f"{preset} batch {batch}: {done.stderr.strip().splitlines()[-1][:300]}")
    plan = json.loads(done.stdout)
    return {"batch": batch, "peak_gib": plan["per_device_gib"]["peak_estimate"],
            "argument_gib": plan["per_device_gib"]["argument"], "seconds": round(time.time() - start, 1),
            "parameters": plan["parameters"]}


def plan_preset(preset: str) -> dict:
    compiled = {b: compile_plan(preset, b) for b in PROBES}
    (b0, m0), (b1, m1) = [(b, compiled[b]["peak_gib"]) for b in PROBES]
    per_example = (m1 - m0) / (b1 - b0)
    fixed = m0 - per_example * b0

    def peak(batch: int) -> float:
        if batch not in compiled:
            compiled[batch] = compile_plan(preset, batch)
        return compiled[batch]["peak_gib"]

    cards = {}
    for card, usable in CARDS_GIB.items():
        if peak(1 if m0 > usable else b0) > usable:
            cards[card] = {"usable_gib": round(usable, 2), "max_batch": 0}
            continue
        guess = min(MAX_BATCH, int((usable - fixed) // per_example) if per_example > 0 else MAX_BATCH)
        low = max(b for b in compiled if compiled[b]["peak_gib"] <= usable)
        for _ in range(4):  # secant steps from the largest batch known to fit: the compiler has the last word
            if guess <= low or peak(guess) <= usable:
                break
            hi_peak, low_peak = peak(guess), peak(low)
            guess = low + int((usable - low_peak) * (guess - low) / max(hi_peak - low_peak, 1e-9))
        best = max(b for b in compiled if compiled[b]["peak_gib"] <= usable)
        cards[card] = {"usable_gib": round(usable, 2), "max_batch": best, "peak_gib": compiled[best]["peak_gib"],
                       "capped": best >= MAX_BATCH}
    first = compiled[PROBES[0]]
    return {"preset": preset, "what": PRESETS.get(preset, ""), "parameters": first["parameters"],
            "fixed_gib": round(fixed, 3), "gib_per_example": round(per_example, 4),
            "compiles": [{k: v for k, v in c.items() if k != "parameters"} for c in compiled.values()], "cards": cards}


def table(rows: list[dict]) -> str:
    lines = ["| preset | trains | trainable / frozen params | GiB fixed + per example | 16 GB card: batch (peak GiB) | "
             "24 GB card: batch (peak GiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        p = r["parameters"]
        cells = [f"{'>= ' if c.get('capped') else ''}{c['max_batch']} ({c['peak_gib']:.1f})" if c["max_batch"]
                 else "does not fit" for c in r["cards"].values()]
        lines.append(f"| `{r['preset']}` | {r['what']} | {p['trainable'] / 1e6:.1f}M / {p['frozen'] / 1e9:.2f}B | "
                     f"{r['fixed_gib']:.2f} + {r['gib_per_example']:.3f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated presets (config file:preset)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_plans.json")
    args = parser.parse_args()
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []  # resumes
    for preset in args.only.split(",") if args.only else PRESETS:
        if any(row["preset"] == preset for row in rows):
            continue
        rows.append(plan_preset(preset))
        print(json.dumps(rows[-1]), flush=True)
        write_report(args.out, {"cards_usable_gib": CARDS_GIB, "rows": rows, "table": table(rows)})
    print(table(rows))


if __name__ == "__main__":
    main()
