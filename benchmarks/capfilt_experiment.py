#!/usr/bin/env python
"""Does CapFilt work? The experiment on synthetic data whose noise is known.

1. Web-like data: synthetic shapes records where `--wrong` of the captions describe another scene.
2. Pre-train a tiny BLIP (ITC + ITM + LM) on the noisy data: the "noisy" model.
3. As BLIP fine-tunes captioner and filter on COCO, fine-tune the noisy model on a small clean set
   (other synthetic images, correct captions), then CapFilt the noisy data with it (ITM >= 0.5):
   the filter's precision and recall at removing the wrong captions (the known noise), and the
   cleaned dataset (kept web captions + kept synthetic captions).
4. Pre-train the same tiny BLIP, same steps and seed, on the cleaned dataset: the "cleaned" model.
5. Held-out ITC retrieval R@1 (both ways, clean captions never trained on) of both models.

The cleaned run should win. (BLIP fine-tunes captioner and filter separately, LM and ITC + ITM; one
fine-tune with the three pre-training losses stands in for both here.)

    python benchmarks/capfilt_experiment.py                 # documented run, results/capfilt_synthetic.json
    python benchmarks/capfilt_experiment.py --small --out /tmp/capfilt.json   # what the test runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT_SEED = 10_007


def _config(name: str, preset: str = "tiny"):
    from blip_jax.config_files import load_config

    return load_config(ROOT / "configs" / f"{name}.py", preset)


def pretrain(workdir: Path, data: dict, steps: int, seed: int, batch_size: int, init_from: str = "") -> Path:
    from blip_jax.train.trainer import train

    cfg = _config("blip_pretrain")
    cfg.model.init_from = init_from
    cfg.seed = seed
    cfg.total_steps = steps
    cfg.batch_size = batch_size
    cfg.log_every = max(1, steps // 10)
    cfg.checkpoint_every = steps
    cfg.report = False
    cfg.optim.update(warmup_steps=max(1, steps // 20), decay_steps=steps)
    cfg.data.update(data)
    train(cfg, workdir, progress=False)
    return workdir / "model"


def held_out_r1(model_dir: Path, n: int, seed: int, image_size: int) -> dict:
    """ITC R@1 both ways on clean held-out records (a retrieved item with the same caption counts)."""
    import blip_jax
    from blip_jax.data.synthetic import SyntheticShapes

    source = SyntheticShapes(n, seed=seed + HELD_OUT_SEED, image_size=image_size)
    records = [source[i] for i in range(n)]
    sim = blip_jax.load(model_dir).itc([r["image"] for r in records], [r["caption"] for r in records])
    captions = np.array([r["caption"] for r in records])
    return {"image_to_text_r1": float(np.mean(captions[sim.argmax(1)] == captions)),
            "text_to_image_r1": float(np.mean(captions[sim.argmax(0)] == captions)),
            "chance": float(np.mean([np.mean(captions == c) for c in captions]))}


def filter_quality(capfilt_dir: Path, source) -> dict:
    """Precision and recall of dropping the wrong web captions."""
    rows = [json.loads(line) for line in (capfilt_dir / "all.jsonl").read_text().splitlines()]
    web = [r for r in rows if r["provenance"] == "web"]
    wrong = np.array([bool(source[r["source_index"]]["caption_is_wrong"]) for r in web])
    dropped = np.array([not r["kept"] for r in web])
    true_drops = int((dropped & wrong).sum())
    return {"web_captions": len(web), "wrong": int(wrong.sum()), "dropped": int(dropped.sum()),
            "precision": true_drops / max(1, int(dropped.sum())), "recall": true_drops / max(1, int(wrong.sum())),
            "synthetic_kept": sum(r["kept"] for r in rows if r["provenance"] == "synthetic")}


def run(root: Path, *, records: int, wrong: float, steps: int, seed: int, batch_size: int, held_out: int,
        clean_records: int, finetune_steps: int, threshold: float) -> dict:
    from blip_jax import capfilt
    from blip_jax.data.sources import build_source

    start = time.time()
    noisy_data = dict(kind="synthetic", num_records=records, seed=seed, image_size=32, wrong_fraction=wrong)
    noisy_model = pretrain(root / "noisy", noisy_data, steps, seed, batch_size)
    # BLIP fine-tunes its captioner and filter on clean human captions (COCO) before bootstrapping:
    # here a small clean synthetic set (other images) and the same three losses
    clean_data = dict(kind="synthetic", num_records=clean_records, seed=seed + 1, image_size=32)
    tuned = pretrain(root / "finetuned", clean_data, finetune_steps, seed, batch_size, init_from=str(noisy_model))
    cfg = capfilt.base_config()
    cfg.data.update(noisy_data)
    cfg.threshold = threshold
    cfg.captioner = cfg.filter = str(tuned)
    cfg.prompt = ""  # the pre-trained decoder writes plain captions (BLIP's captioner is fine-tuned with a prompt)
    cfg.max_new_tokens, cfg.min_new_tokens = 12, 3
    cfg.shard_size, cfg.batch_size, cfg.gallery = 256, 32, 12
    summary = capfilt.run(cfg, root / "capfilt", progress=False)
    quality = filter_quality(root / "capfilt", build_source(noisy_data))
    clean_model = pretrain(root / "cleaned", dict(kind="packed", path=str(root / "capfilt" / "cleaned_packed")),
                           steps, seed, batch_size)
    noisy_r1 = held_out_r1(noisy_model, held_out, seed, 32)
    clean_r1 = held_out_r1(clean_model, held_out, seed, 32)
    return {"settings": {"records": records, "wrong_fraction": wrong, "steps": steps, "seed": seed,
                         "batch_size": batch_size, "held_out": held_out, "threshold": cfg.threshold,
                         "clean_records": clean_records, "finetune_steps": finetune_steps},
            "filter": quality, "capfilt_summary": {k: summary[k] for k in ("web", "synthetic") if k in summary},
            "noisy": noisy_r1, "cleaned": clean_r1,
            "cleaned_wins": (clean_r1["image_to_text_r1"] + clean_r1["text_to_image_r1"])
            > (noisy_r1["image_to_text_r1"] + noisy_r1["text_to_image_r1"]),
            "seconds": round(time.time() - start, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="the test's size (about 2 minutes on 2 cores)")
    p.add_argument("--records", type=int)
    p.add_argument("--wrong", type=float, default=0.4)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--held-out", type=int, default=128)
    p.add_argument("--clean-records", type=int, default=1000, help="the clean fine-tuning set (BLIP: COCO)")
    p.add_argument("--finetune-steps", type=int)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=RESULTS / "capfilt_synthetic.json")
    p.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    records = args.records or (2000 if args.small else 4000)
    steps = args.steps or (800 if args.small else 1500)
    finetune_steps = args.finetune_steps or steps // 2
    with tempfile.TemporaryDirectory(prefix="capfilt_exp_") as tmp:
        root = args.workdir or Path(tmp)
        result = run(root, records=records, wrong=args.wrong, steps=steps, seed=args.seed,
                     batch_size=args.batch_size, held_out=args.held_out, clean_records=args.clean_records,
                     finetune_steps=finetune_steps, threshold=args.threshold)
    from blip_jax.atomic import write_json

    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
