"""Peak memory of `blip-jax convert --lavis` on a synthetic multi-GB LAVIS `.pth`.

The tiny LAVIS caption fixture (tests/fixtures/lavis/blip_caption) is grown to paper widths (1024,
MLP 4096, 384 px at patch 16) and depths (`--vision-layers`, `--text-layers`), saved as LAVIS saves
(`torch.save({"model": state_dict})`), and converted by the CLI in a subprocess; so is the tiny file
itself, whose peak is the process's baseline (jax, torch, orbax imported). The conversion streams
when `peak - baseline` stays within `2 x largest tensor + the Orbax part size` (the issue's bound);
both the whole RSS and its anonymous part are reported (the `.pth` is memory-mapped, so the file
pages read count in RSS until the conversion ends).

    python benchmarks/bench_convert_memory.py                     # 2.4 GB file, ~1 min on 2 cores
    python benchmarks/bench_convert_memory.py --vision-layers 2 --text-layers 1   # smoke run
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lavis"
# fixture size -> paper size (the fixture's widths are 48, MLP 96, qkv 144, 9 patches + cls)
GROW = {48: 1024, 96: 4096, 144: 3072, 10: 577}


def synthetic_state(vision_layers: int, text_layers: int) -> dict:
    import torch

    tiny = torch.load(FIXTURE / "blip_caption" / "model.pth", weights_only=True)["model"]
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in tiny.items():
        layer = re.search(r"\.(blocks|layer)\.(\d+)\.", key)
        if layer and layer.group(2) != "0":
            continue
        copies = range(vision_layers if "blocks" in key else text_layers) if layer else [None]
        for i in copies:
            name = key if i is None else key.replace(f".{layer.group(1)}.0.", f".{layer.group(1)}.{i}.")
            if key.endswith("position_ids"):
                state[name] = value.clone()
                continue
            state[name] = torch.randn([GROW.get(d, d) for d in value.shape], generator=gen) * 0.02
    return state


# Runs the CLI and reports the process's own high-water mark (VmHWM is per address space, so what a
# forked parent held before exec does not count, unlike getrusage's ru_maxrss), and the peak of its
# anonymous memory (RssAnon, sampled every 10 ms): what the conversion allocates, as opposed to the
# pages of the memory-mapped .pth it has read (RssFile: page cache the kernel may drop at any time)
_MEASURED = """import runpy, sys, threading, time
sys.argv = sys.argv[1:]
def status(field):
    return int([l for l in open("/proc/self/status") if l.startswith(field)][0].split()[1])
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
try:
    runpy.run_module("blip_jax.cli", run_name="__main__")
finally:
    print(f"VmHWM_KB {status('VmHWM')} RssAnon_KB {max(peak[0], status('RssAnon'))}", file=sys.stderr)
"""


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, float]:
    """(peak RSS of the conversion in MB, peak anonymous RSS in MB, seconds)."""
    start = time.time()
    done = subprocess.run([sys.executable, "-c", _MEASURED, *cmd], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    hwm, anon = map(int, re.search(r"VmHWM_KB (\d+) RssAnon_KB (\d+)", done.stderr).groups())
    return hwm / 1024, anon / 1024, time.time() - start


def main():
    import torch

    from _common import write_report
    from blip_jax.checkpoint import PART_BYTES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision-layers", type=int, default=32)
    parser.add_argument("--text-layers", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "convert_memory_cpu.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_convert_memory."))
    try:
        state = synthetic_state(args.vision_layers, args.text_layers)
        largest = max(v.numel() * v.element_size() for v in state.values())
        total = sum(v.numel() * v.element_size() for v in state.values())
        torch.save({"model": state}, work / "model.pth")
        del state

        def convert(src, dst, heads):
            return ["blip-jax", "convert", str(src), str(dst), "--lavis",
                    "blip_caption/large_coco", "--tokenizer", str(FIXTURE / "bert_tokenizer"), "--heads", heads]

        baseline, baseline_anon, _ = peak_rss_mb(convert(FIXTURE / "blip_caption" / "model.pth", work / "tiny", "vision=4,text=3"))
        peak, anon, seconds = peak_rss_mb(convert(work / "model.pth", work / "big", "vision=16,text=16"))
        bound = (2 * largest + PART_BYTES) / 2**20
        report = {"file_gb": round((work / "model.pth").stat().st_size / 1e9, 3),
                  "parameters_gb_fp32": round(total / 1e9, 3), "largest_tensor_mb": round(largest / 2**20, 1),
                  "part_mb": PART_BYTES / 2**20, "baseline_rss_mb": round(baseline), "peak_rss_mb": round(peak),
                  "above_baseline_mb": round(peak - baseline), "bound_mb": round(bound),
                  "within_bound": peak - baseline <= bound, "baseline_anon_mb": round(baseline_anon),
                  "peak_anon_mb": round(anon), "anon_above_baseline_mb": round(anon - baseline_anon),
                  "anon_within_bound": anon - baseline_anon <= bound, "seconds": round(seconds, 1),
                  "vision_layers": args.vision_layers, "text_layers": args.text_layers}
        print(report)
        write_report(args.out, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
