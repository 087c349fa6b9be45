#!/usr/bin/env python
"""Input pipeline throughput: blip-jax's grain pipeline vs a PyTorch DataLoader, same decode + augment.

What one run measures, in images per second, on a fixture the script writes into a temp dir: N
JPEG images (default 256, 32 with --small) of 640x480 with smooth random content (sums of bicubic-
upsampled noise at 4 scales plus fine noise, quality 90: 50-100 KB each, the size of a COCO photo)
and a LAVIS-style annotation JSON read by `blip_jax.data.annotations.AnnotationSource`. Files are in
the page cache after the first epoch: disk reads are not measured, decoding and augmenting are.

Both loaders run the same module-level, picklable per-record function `DecodeAugment(kind, size)`:
`decode_image(record["image"])` (read the file, decode the JPEG to uint8 RGB) then
`image_transform(kind, size)(image, rng)` -> {"pixels": float32 [size, size, 3]}, for

  blip_train  @ 384 px  BLIP's training augmentation: random resized crop + flip + RandAugment(2, 5)
  blip2_train @ 224 px  BLIP-2's: random resized crop + flip

  grain     `blip_jax.data.pipeline.make_iterator(source, batch_size, seed, transform,
            process_index=0, process_count=1, read_threads=r, worker_count=w)`: the global
            shuffled stream, repeated; rows stacked with np.stack. `w > 0`: grain's mp_prefetch
            (spawn start method, 1 batch buffered per worker); the iterator is `.close()`d.
  PyTorch   `torch.utils.data.DataLoader(TorchRecords(source, transform, seed), batch_size,
            sampler=RandomSampler(num_samples=unbounded), num_workers=w, drop_last=True)` with the
            default collate (numpy -> torch tensors, shared memory in workers), default start method
            (fork on Linux) and prefetch_factor 2. `TorchRecords.__getitem__(i)` calls the same
            transform on `source[i]` with rng = np.random.default_rng([seed, i]).

`--workers` (default 0,2) are the worker process counts; 0 = in the calling process for both. grain
is timed with `read_threads` 0 (synchronous: one record at a time in one thread, as a DataLoader
process works; the fair comparison and the one the ratio uses) and with grain's default 2 threads
(`grain_rt2`; inside each worker when w > 0). For w > 0 PyTorch is also timed with the spawn start
method (`torch_spawn`), which grain always uses, to separate the start method's costs from the
framework's, and grain with its workers started under glibc malloc settings that keep freed memory
in the process (`grain_malloc`, MALLOC_ENV below). This process runs torch with 1 thread (the
in-process collate); the transforms are NumPy + Pillow, single-threaded, in both.

One measurement: build the iterator, take the first batch (its wall time from creation is the
`first_batch_s`: process start-up, imports, the first batch's work), then max(1, w) - 1 more warm-up
batches (the first batch of every worker), then time N / batch batches (one epoch's worth of
images, from the unbounded stream so the workers are equally busy at both ends of the timed span):
rate = N / time. `startup_s` = first_batch_s minus the steady-state time one worker needs for one
batch (w * batch / rate, or batch / rate in-process). The configurations are interleaved (every
configuration once per round, --iters rounds) and the median rate is reported. The augmentation
draws differ between the two (grain derives its per-record rng from the seed and stream position),
so the mix of RandAugment operations differs per image; over N images the cost averages out.

Single-core references (no loader, one thread): the mean per-image wall and thread-CPU time of
decode_image(path) and of each transform on the decoded images; the per-core rates used for sizing
are images per CPU-second (CPU time barely moves when other processes share the cores, wall time
does). A second pass (CostProbe, not timed, --no-costs skips it) records the CPU time and minor page
faults per image inside each loader's processes. `ratio = grain images/s / PyTorch images/s`
(> 1: grain faster). `training_step_context` compares the loader's rates with the examples/s a BLIP-2 training
step consumes on this machine (from benchmarks/results/blip2_train_cpu.json, if present).

    python benchmarks/bench_data.py                                 # ~5 min on 2 cores
    python benchmarks/bench_data.py --small --iters 1 --workers 0   # smoke run, ~10 s
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import write_report  # benchmarks/ is on the path when a script runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

DEFAULT_KINDS = "blip_train:384,blip2_train:224"
# glibc malloc settings for the `grain_malloc` variant's workers: keep freed memory in the process
# (no mmap/munmap of each large temporary, no trimming of the heap) instead of page-faulting it in
# again for every image. Values: 32 MiB (glibc's maximum dynamic threshold) and 256 MiB.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
IMAGE_W, IMAGE_H, JPEG_QUALITY = 640, 480, 90


# ============================================================================= the per-record work
class DecodeAugment:
    """record -> {"pixels": float32 [size, size, 3]}: decode the record's image file, then the
    reference training transform of `kind`. Module-level and made of plain values, so it pickles
    into grain's spawned workers and PyTorch's workers alike."""

    def __init__(self, kind: str, size: int):
        from blip_jax.data.transforms import image_transform

        self.kind, self.size = kind, size
        self.image = image_transform(kind, size)

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        from blip_jax.data.transforms import decode_image

        return {"pixels": self.image(decode_image(record["image"]), rng)}


class CostProbe(DecodeAugment):
    """DecodeAugment that also returns, per image, the minor page faults and the CPU time of the
    thread that ran it (a diagnostic: how much work one image costs in each kind of process,
    nearly independent of other load on the machine)."""

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        import resource

        faults, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
        out = super().__call__(record, rng)
        out["cpu_s"] = np.float64(time.thread_time() - cpu)
        out["minor_faults"] = np.int64(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        return out


class TorchRecords:
    """A map-style dataset for torch's DataLoader (a plain class: importing this module must not
    import torch, or grain's spawned workers would pay for it): record `index` of `source` through
    `transform` with rng = np.random.default_rng([seed, index])."""

    def __init__(self, source, transform, seed: int):
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.source[index], np.random.default_rng([self.seed, int(index)]))


# ============================================================================= fixture
def photo_like(rng: np.random.Generator, width: int = IMAGE_W, height: int = IMAGE_H) -> np.ndarray:
    """uint8 [height, width, 3]: smooth random content (bicubic-upsampled noise at 4 scales, 1/f-like
    amplitudes) plus fine noise, which JPEG-compresses like a photo (50-100 KB at quality 90)."""
    from PIL import Image

    acc = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((4, 90.0), (12, 45.0), (40, 22.0), (120, 10.0)):
        small = rng.normal(0, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        layer = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(small[..., c])).resize(
            (width, height), Image.Resampling.BICUBIC)) for c in range(3)], -1)
        acc += amp * rng.uniform(0.7, 1.3) * layer / (layer.std() + 1e-6)
    acc += rng.normal(0, rng.uniform(2.0, 5.0), acc.shape).astype(np.float32)
    return np.clip(acc + 128, 0, 255).astype(np.uint8)


def write_fixture(root: Path, n: int, seed: int) -> dict:
    """`n` JPEGs under root/images and root/annotations.json (LAVIS layout: image + caption)."""
    from PIL import Image

    rng = np.random.default_rng([seed, 12345])
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries, sizes = [], []
    for i in range(n):
        name = f"{i:06d}.jpg"
        path = root / "images" / name
        Image.fromarray(photo_like(rng)).save(path, "JPEG", quality=JPEG_QUALITY)
        sizes.append(path.stat().st_size)
        entries.append({"image": name, "caption": f"a photo number {i} of a random scene", "image_id": str(i)})
    (root / "annotations.json").write_text(json.dumps(entries))
    kb = np.asarray(sizes) / 1e3
    return dict(images=n, width=IMAGE_W, height=IMAGE_H, jpeg_quality=JPEG_QUALITY, jpeg_kb_mean=float(kb.mean()),
                jpeg_kb_min=float(kb.min()), jpeg_kb_max=float(kb.max()))


# ============================================================================= loaders
def grain_loader(source, transform, *, batch: int, seed: int, workers: int, read_threads: int):
    from blip_jax.data.pipeline import make_iterator

    def make():
        return make_iterator(source, batch_size=batch, seed=seed, transform=transform, process_index=0,
                             process_count=1, read_threads=read_threads, worker_count=workers)

    def close(it):
        if workers:
            it.close()

    return make, close


def torch_loader(source, transform, *, batch: int, seed: int, workers: int, context: str | None):
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    dataset = TorchRecords(source, transform, seed)

    def make():
        sampler = RandomSampler(dataset, num_samples=len(dataset) * 10_000,
                                generator=torch.Generator().manual_seed(seed))
        loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                            multiprocessing_context=context if workers else None)
        return iter(loader)

    def close(it):
        if not workers:
            return 0
        try:
            it._shutdown_workers()  # what the iterator's __del__ does; explicit so it is not timed later
        except RuntimeError as e:
            # Spawned workers exit through interpreter finalization, and about 1 exit in 40 aborts
            # there ("terminate called without an active exception", SIGABRT) after all batches were
            # delivered; torch reports it as a worker failure. Counted, not fatal: it is not timed.
            if "killed by signal" not in str(e):
                raise
            print(f"    (worker exit: {e})", flush=True)
            return 1
        return 0

    return make, close


class _Env:
    """Environment variables set while worker processes start (spawned children read them; this
    process's own malloc settings are fixed at its start)."""

    def __init__(self, env: dict | None):
        self.env = env or {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(make, close, *, n_images: int, batch: int, workers: int, size: int, env: dict | None = None) -> dict:
    """One epoch's worth of images after start-up and warm-up (module docstring)."""
    gc.collect()
    t0 = time.perf_counter()
    with _Env(env):
        it = make()
        first = next(it)  # the workers have started once this returns
    first_batch_s = time.perf_counter() - t0
    shape, dtype = tuple(first["pixels"].shape), str(first["pixels"].dtype).replace("torch.", "")
    if shape != (batch, size, size, 3) or dtype != "float32":
        raise RuntimeError(f"unexpected batch: pixels {dtype} {shape}")
    for _ in range(max(1, workers) - 1):
        next(it)
    n_batches = n_images // batch
    t1 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    seconds = time.perf_counter() - t1
    t2 = time.perf_counter()
    exit_aborts = close(it) or 0
    del it
    close_s = time.perf_counter() - t2
    rate = n_batches * batch / seconds
    return dict(images_per_s=rate, seconds=seconds, first_batch_s=first_batch_s,
                startup_s=first_batch_s - max(1, workers) * batch / rate, close_s=close_s,
                worker_exit_aborts=exit_aborts)


def single_core(source, kinds: dict, seed: int) -> dict:
    """Per-image decode and transform times without a loader, in this thread: wall time and the
    thread's CPU time (the latter barely moves when other processes share the cores, so the
    per-core rates used for sizing come from it: images per CPU-second)."""
    from blip_jax.data.transforms import decode_image

    def timed(fn, *a):
        w, c = time.perf_counter(), time.thread_time()
        r = fn(*a)
        return r, time.perf_counter() - w, time.thread_time() - c

    paths = [source[i]["image"] for i in range(len(source))]
    for p in paths[:4]:  # warm the page cache and PIL's lazy imports
        decode_image(p)
    decoded = [timed(decode_image, p) for p in paths]
    images = [d[0] for d in decoded]
    dec_ms, dec_cpu = (1e3 * float(np.mean([d[i] for d in decoded])) for i in (1, 2))
    out = dict(decode_ms=dec_ms, decode_cpu_ms=dec_cpu, decode_images_per_s=1e3 / dec_ms, transforms={})
    for name, (kind, size) in kinds.items():
        f = DecodeAugment(kind, size).image
        f(images[0], np.random.default_rng([seed, 0]))
        t = [timed(f, image, np.random.default_rng([seed, i]))[1:] for i, image in enumerate(images)]
        ms, cpu = (1e3 * float(np.mean([x[i] for x in t])) for i in (0, 1))
        out["transforms"][name] = dict(
            transform_ms=ms, transform_cpu_ms=cpu, transform_images_per_s=1e3 / ms,
            decode_plus_transform_ms=dec_ms + ms, decode_plus_transform_cpu_ms=dec_cpu + cpu,
            decode_plus_transform_images_per_s=1e3 / (dec_ms + ms),
            decode_plus_transform_images_per_cpu_s=1e3 / (dec_cpu + cpu))
    return out


# ============================================================================= context
def training_step_context(results: dict, single: dict, kinds: dict, workers: list[int]) -> dict:
    """How the loader's rates compare with what a training step on this machine consumes."""
    out = {}
    step_file = RESULTS / "blip2_train_cpu.json"
    name = next((n for n, (k, _) in kinds.items() if k == "blip2_train"), None)
    if step_file.is_file() and name is not None:
        step = json.loads(step_file.read_text())
        batch = step["batch"]
        jax_rate, torch_rate = 1e3 * batch / step["jax_ms"], 1e3 * batch / step["torch_ms"]
        per_core = single["transforms"][name]["decode_plus_transform_images_per_cpu_s"]
        in_process = results[name]["workers_0"]["grain"]["images_per_s"] if 0 in workers else None
        entry = dict(
            source=str(step_file.relative_to(ROOT)),
            step=f"BLIP-2 stage-2 OPT train step, {step['size']} size, batch {batch}, {step['headline_layout']} "
                 f"layout, 224 px",
            step_ms_jax=step["jax_ms"], step_ms_torch=step["torch_ms"],
            step_examples_per_s_jax=jax_rate, step_examples_per_s_torch=torch_rate,
            loader=f"{name}: grain, read_threads 0",
            loader_images_per_s_in_process=in_process,
            loader_images_per_s_per_core=per_core,
            loader_over_step_in_process=in_process / jax_rate if in_process else None,
            loader_core_fraction_per_step=jax_rate / per_core,
            note=(f"the step consumes {jax_rate:.2f} examples/s; one core decodes and augments "
                  f"{per_core:.0f} images per CPU-second at 224 px, so feeding the step takes "
                  f"{100 * jax_rate / per_core:.1f}% of one core's time"
                  + (f" and the in-process loader is {in_process / jax_rate:.0f}x faster than the step"
                     if in_process else "") + ": the loader does not bound the step"),
        )
        out["blip2_train_step"] = entry
    blip_name = next((n for n, (k, _) in kinds.items() if k == "blip_train"), None)
    cap_file = RESULTS / "blip_caption_cpu.json"
    if cap_file.is_file() and blip_name is not None:
        cap = json.loads(cap_file.read_text())
        train = cap.get("results", {}).get("train")
        if train and "jax_ms" in train:
            batch = cap.get("batch", 8)
            rate = 1e3 * batch / train["jax_ms"]
            per_core = single["transforms"][blip_name]["decode_plus_transform_images_per_cpu_s"]
            out["blip_finetune_step"] = dict(
                source=str(cap_file.relative_to(ROOT)),
                step=f"BLIP base caption fine-tune step (LM loss), batch {batch}, measured at 224 px (the "
                     f"loader row is {kinds[blip_name][1]} px, whose step costs more)",
                step_ms_jax=train["jax_ms"], step_examples_per_s_jax=rate,
                loader=f"{blip_name}: single core", loader_images_per_s_per_core=per_core,
                loader_core_fraction_per_step=rate / per_core)
    sizing = {}
    for n in kinds:
        row = dict(single_core_images_per_cpu_s=single["transforms"][n]["decode_plus_transform_images_per_cpu_s"])
        for w in workers:
            r = results[n][f"workers_{w}"]
            row[f"grain_workers_{w}_images_per_s_per_process"] = r["grain"]["images_per_s"] / max(1, w)
            row[f"torch_workers_{w}_images_per_s_per_process"] = r["torch"]["images_per_s"] / max(1, w)
        sizing[n] = row
    out["per_core_rates"] = sizing
    out["sizing_rule"] = ("cores for the loader = examples/s the accelerator step consumes / "
                          f"single_core_images_per_cpu_s (measured on this {os.cpu_count()}-core VM; the "
                          "workers_* rows share its cores)")
    return out


# ============================================================================= main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=None, help="fixture images (default 256, 32 with --small)")
    p.add_argument("--batch", type=int, default=8, help="images per batch, both loaders (default 8)")
    p.add_argument("--iters", type=int, default=5, help="timed epochs per configuration (median; default 5)")
    p.add_argument("--workers", default="0,2", help="comma-separated worker process counts (default 0,2)")
    p.add_argument("--kinds", default=DEFAULT_KINDS,
                   help=f"comma-separated transform kind:size pairs (default {DEFAULT_KINDS})")
    p.add_argument("--no-variants", action="store_true",
                   help="time only grain (read_threads 0) and PyTorch (fork), not grain_rt2 / torch_spawn / "
                        "grain_malloc")
    p.add_argument("--no-costs", action="store_true",
                   help="skip the per-image CPU time / page fault pass (CostProbe)")
    p.add_argument("--small", action="store_true", help="32 images: a quick smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-tag", default="cpu", help="name used in the results file (default cpu)")
    p.add_argument("--load-note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/data_<tag>.json)")
    args = p.parse_args(argv)
    args.images = args.images or (32 if args.small else 256)
    args.workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    kinds = {}
    for item in args.kinds.split(","):
        kind, _, size = item.strip().partition(":")
        if kind not in ("blip_train", "blip2_train", "eval") or not size.isdigit():
            p.error(f"bad --kinds entry {item!r}: use kind:size, kind in blip_train, blip2_train, eval")
        kinds[f"{kind}_{size}"] = (kind, int(size))
    args.kinds = kinds
    if args.iters < 1 or args.batch < 1 or any(w < 0 for w in args.workers) or not args.workers:
        p.error("--iters and --batch must be >= 1 and --workers non-negative")
    if args.images < args.batch * max(1, max(args.workers)):
        p.error("--images must hold at least one batch per worker")
    return args


def loader_configs(source, args, transform_class):
    """[((kind name, workers, variant), (make, close), size, env for starting workers)]."""
    out = []
    for name, (kind, size) in args.kinds.items():
        transform = transform_class(kind, size)
        common = dict(batch=args.batch, seed=args.seed)
        for w in args.workers:
            variants = {"grain": (grain_loader(source, transform, workers=w, read_threads=0, **common), None),
                        "torch": (torch_loader(source, transform, workers=w, context=None, **common), None)}
            if not args.no_variants:
                variants["grain_rt2"] = (grain_loader(source, transform, workers=w, read_threads=2, **common), None)
                if w:
                    variants["torch_spawn"] = (torch_loader(source, transform, workers=w, context="spawn", **common),
                                               None)
                    variants["grain_malloc"] = (grain_loader(source, transform, workers=w, read_threads=0, **common),
                                                MALLOC_ENV)
            out.extend(((name, w, v), fns, size, env) for v, (fns, env) in variants.items())
    return out


def cost_per_image(source, args, batches: int = 8) -> dict:
    """Per-image thread CPU ms and minor page faults in each loader's processes (CostProbe), over
    `batches` batches after each worker's first batch; one pass, not timed."""
    out = {}
    for (name, w, v), (make, close), _, env in loader_configs(source, args, CostProbe):
        with _Env(env):
            it = make()
            next(it)
        for _ in range(max(1, w) - 1):
            next(it)
        cpu, faults = [], []
        for _ in range(batches):
            b = next(it)
            cpu.extend(np.asarray(b["cpu_s"]).tolist())
            faults.extend(np.asarray(b["minor_faults"]).tolist())
        aborts = close(it) or 0
        del it
        out.setdefault(name, {}).setdefault(f"workers_{w}", {})[v] = dict(
            cpu_ms_per_image=1e3 * float(np.mean(cpu)), minor_faults_per_image=float(np.mean(faults)),
            worker_exit_aborts=aborts)
        print(f"  cost {name:<16} workers {w} {v:<12} {1e3 * np.mean(cpu):6.2f} CPU ms/image  "
              f"{np.mean(faults):7.0f} minor faults/image", flush=True)
    return out


def _machine_busy_s() -> float | None:
    """CPU-seconds all processes on the machine have used since boot (/proc/stat: user, nice,
    system, irq, softirq; not idle, iowait, steal)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
    except (OSError, ValueError):  # pragma: no cover - not Linux
        return None
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU-seconds of this process and its reaped children (the loaders' worker processes)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor()


def main(argv=None) -> dict:
    args = parse_args(argv)
    import grain
    import PIL
    import torch

    from blip_jax.data.annotations import AnnotationSource

    torch.set_num_threads(1)  # the in-process collate; the transforms themselves are numpy + PIL
    out_path = Path(args.out) if args.out else RESULTS / f"data_{args.device_tag}{'_small' if args.small else ''}.json"
    load_start = os.getloadavg()
    busy0, own0, wall0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
    if load_start[0] > 0.5:
        print(f"warning: 1-minute load average {load_start[0]:.2f} at start: other processes compete for the "
              f"{os.cpu_count()} CPUs and will skew the timings", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    work = Path(tmp.name)
    t0 = time.perf_counter()
    fixture = write_fixture(work, args.images, args.seed)
    fixture_s = time.perf_counter() - t0
    source = AnnotationSource(work / "annotations.json", image_root=work / "images")
    print(f"fixture: {args.images} JPEGs {IMAGE_W}x{IMAGE_H} q{JPEG_QUALITY}, {fixture['jpeg_kb_mean']:.0f} KB mean "
          f"({fixture['jpeg_kb_min']:.0f}-{fixture['jpeg_kb_max']:.0f}), written in {fixture_s:.1f} s; "
          f"{os.cpu_count()} CPUs, grain {grain.__version__ if hasattr(grain, '__version__') else '?'}, "
          f"torch {torch.__version__}", flush=True)

    single = single_core(source, args.kinds, args.seed)
    print(f"single core: decode {single['decode_ms']:.2f} ms/image ({single['decode_cpu_ms']:.2f} CPU ms)", flush=True)
    for name, r in single["transforms"].items():
        print(f"  {name:<16} transform {r['transform_ms']:.2f} ms/image ({r['transform_cpu_ms']:.2f} CPU ms), "
              f"decode + transform {r['decode_plus_transform_images_per_s']:.1f} images/s "
              f"({r['decode_plus_transform_images_per_cpu_s']:.1f} per CPU-second)", flush=True)

    configs = {key: (fns, size, env) for key, fns, size, env in loader_configs(source, args, DecodeAugment)}
    runs = {key: [] for key in configs}
    for i in range(args.iters):
        for key, ((make, close), size, env) in configs.items():
            r = measure(make, close, n_images=args.images, batch=args.batch, workers=key[1], size=size, env=env)
            runs[key].append(r)
            print(f"  round {i + 1}/{args.iters} {key[0]:<16} workers {key[1]} {key[2]:<12} "
                  f"{r['images_per_s']:8.1f} images/s  first batch {r['first_batch_s']:.2f} s", flush=True)

    results = {}
    for (name, w, v), rs in runs.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        entry = dict(images_per_s=med("images_per_s"), images_per_s_all=[r["images_per_s"] for r in rs],
                     first_batch_s=med("first_batch_s"), startup_s=med("startup_s"), close_s=med("close_s"),
                     worker_exit_aborts=sum(r["worker_exit_aborts"] for r in rs))
        results.setdefault(name, {}).setdefault(f"workers_{w}", {})[v] = entry
    ratios = {}
    for name, per_w in results.items():
        for wkey, r in per_w.items():
            r["ratio"] = r["grain"]["images_per_s"] / r["torch"]["images_per_s"]
            ratios[f"{name}/{wkey}"] = r["ratio"]
            if "grain_rt2" in r:
                r["ratio_grain_rt2"] = r["grain_rt2"]["images_per_s"] / r["torch"]["images_per_s"]
            if "torch_spawn" in r:
                r["ratio_vs_torch_spawn"] = r["grain"]["images_per_s"] / r["torch_spawn"]["images_per_s"]
            if "grain_malloc" in r:
                r["ratio_grain_malloc"] = r["grain_malloc"]["images_per_s"] / r["torch"]["images_per_s"]
    context = training_step_context(results, single, args.kinds, args.workers)
    costs = {} if args.no_costs else cost_per_image(source, args)

    print()
    print(f"{'kind':<16} {'workers':>7} {'grain':>8} {'grain rt2':>10} {'grain malloc':>13} {'torch':>8} "
          f"{'torch spawn':>12} {'ratio':>7}  first batch s (grain / torch / torch spawn)")
    for name, per_w in results.items():
        for w in args.workers:
            r = per_w[f"workers_{w}"]
            g = lambda v, k="images_per_s": f"{r[v][k]:.1f}" if v in r else "-"  # noqa: E731
            print(f"{name:<16} {w:>7} {g('grain'):>8} {g('grain_rt2'):>10} {g('grain_malloc'):>13} {g('torch'):>8} "
                  f"{g('torch_spawn'):>12} {r['ratio']:>6.2f}x  {g('grain', 'first_batch_s')} / "
                  f"{g('torch', 'first_batch_s')} / {g('torch_spawn', 'first_batch_s')}")
    print("ratio = grain images/s / PyTorch images/s (grain read_threads 0 vs DataLoader, fork); > 1: grain faster")
    step = context.get("blip2_train_step")
    if step:
        print(f"training step: {step['note']}")
    load_end = os.getloadavg()
    busy1, own1, wall = _machine_busy_s(), _own_cpu_s(), time.perf_counter() - wall0
    other = None
    if busy0 is not None and busy1 is not None:
        other_s = max(0.0, (busy1 - busy0) - (own1 - own0))
        other = dict(cpu_s=other_s, wall_s=wall, mean_cores=other_s / wall,
                     note="CPU time other processes on this machine used during the run (/proc/stat busy time "
                          "minus this process and its workers), mean_cores = cpu_s / wall_s")
        print(f"other processes used {other_s:.0f} CPU-s during the {wall:.0f} s run ({other_s / wall:.2f} cores "
              "on average)", flush=True)
    tmp.cleanup()

    report = dict(
        benchmark="data",
        device=args.device_tag,
        size="small" if args.small else "default",
        what="decode (JPEG file -> uint8 RGB) + training augmentation -> float32, batched; images/s",
        fixture=fixture,
        batch=args.batch,
        iters=args.iters,
        workers=args.workers,
        kinds={n: dict(kind=k, size=s) for n, (k, s) in args.kinds.items()},
        seed=args.seed,
        loaders=dict(
            grain="blip_jax.data.pipeline.make_iterator, read_threads 0 (ratio) / 2 (grain_rt2), mp_prefetch "
                  "with spawn and 1 buffered batch per worker when workers > 0",
            torch="torch.utils.data.DataLoader, RandomSampler, default collate, prefetch_factor 2, fork "
                  "(torch_spawn: multiprocessing_context='spawn'); torch.set_num_threads(1) in this process",
            grain_malloc="grain as above, its workers started with grain_malloc_env",
            warmup_batches="max(1, workers)",
            timed_images=args.images // args.batch * args.batch,
        ),
        single_core=single,
        results=results,
        ratios=ratios,
        ratio_definition="grain images/s / PyTorch images/s (> 1: grain faster)",
        cost_per_image=costs,
        worker_exit_aborts=dict(
            timed=sum(r["worker_exit_aborts"] for rs in runs.values() for r in rs),
            cost_pass=sum(c["worker_exit_aborts"] for per_w in costs.values() for per_v in per_w.values()
                          for c in per_v.values()),
            note="PyTorch spawn workers that died of SIGABRT ('terminate called without an active exception') "
                 "while exiting, after all their batches were delivered; counted, not fatal"),
        training_step_context=context,
        host=dict(cpu_count=os.cpu_count(), cpu_model=_cpu_model(), platform=platform.platform(),
                  python=platform.python_version()),
        versions=dict(grain=getattr(grain, "__version__", None), torch=torch.__version__, numpy=np.__version__,
                      pillow=PIL.__version__),
        env={k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
                                        "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS") if k in os.environ},
        grain_malloc_env=MALLOC_ENV,
        other_processes=other,
        loadavg_at_start=list(load_start),
        loadavg_at_end=list(load_end),
        load_note=args.load_note,
        fixture_s=fixture_s,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return write_report(out_path, report)


if __name__ == "__main__":
    main(sys.argv[1:])
