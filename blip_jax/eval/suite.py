"""`blip-jax eval-suite --suite=configs/eval/<suite>.py --ckpt=M --data_root=D --workdir=W`: a list
of evaluation jobs (e.g. InstructBLIP's 13 held-out datasets) run in turn on one loaded model, each
in W/<job> as `blip-jax eval` would (resumable, guarded against another model), and one table.

A suite config lists `jobs` (name, eval config `file.py:preset`, data files relative to the data
root, the metric the table shows, the paper's numbers) and `unsupported` (name: why). A job whose
data files are missing is skipped and counted, as is one that fails (its one-line error in the
table); the others go on. W/suite.json (rows a script reads) and W/suite.md (the table) are
rewritten after every job.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from blip_jax import paths
from blip_jax.atomic import write_file, write_json
from blip_jax.config_files import load_config
from blip_jax.data.sources import under_root

EVAL_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "eval"
PERCENT = {"cider", "auc"}  # metrics the papers print x100


def job_config(job, data_root: str, overrides: dict | None = None, configs_dir: Path = EVAL_CONFIGS):
    """The eval config of one suite job, its data files under `data_root`, with `overrides`
    ({"generation.max_new_tokens": 4, ...}, for every job) set."""
    file, _, preset = job.config.partition(":")
    cfg = load_config(configs_dir / file, preset or None)
    cfg.data.update(under_root({**dict(job.data), "root": data_root}))
    for field, value in (overrides or {}).items():
        *parents, leaf = field.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ValueError(f"--set {field}: eval configs have no field {field!r}")
        node[leaf] = value
    return cfg


def parse_overrides(items) -> dict:
    """`--set field=value` pairs; a value is read as JSON when it parses (4, true, {"a": 1}), else as text."""
    out = {}
    for item in items or ():
        field, sep, text = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set {item!r}: expected field=value")
        try:
            out[field] = json.loads(text)
        except json.JSONDecodeError:
            out[field] = text
    return out


def _missing(cfg) -> str | None:
    for key in ("path", "annotations", "image_root"):
        value = cfg.data.get(key) or ""
        if value and not paths.path(value).exists():
            return value
    return None


def _row(job, status: str, value=None, extra=None) -> dict:
    return {"job": job.name, "config": job.config, "metric": job.metric, "value": value, "status": status,
            "paper": dict(job.get("paper") or {}), **(extra or {})}


def run_suite(suite, ckpt: str, data_root: str, workdir: str, *, only=(), overrides: dict | None = None,
              progress: bool = True) -> list[dict]:
    """Every job of `suite` on the model at `ckpt`; returns the rows of W/suite.json."""
    from blip_jax.eval.main import load_model, run

    workdir = paths.path(workdir)
    rows: list[dict] = []
    model = None
    jobs = [j for j in suite.jobs if not only or j.name in only]
    for i, job in enumerate(jobs):
        cfg = job_config(job, data_root, overrides)
        missing = _missing(cfg)
        if missing:
            rows.append(_row(job, f"missing data: {missing}"))
        else:
            print(f"[{i + 1}/{len(jobs)}] {job.name} ({job.config})", file=sys.stderr, flush=True)
            start = time.time()
            try:
                model = model or load_model(ckpt, cfg)
                results = run(cfg, ckpt, str(workdir / job.name), progress=progress, model=model)
            except (ValueError, OSError, KeyError) as e:  # the job's own one-line errors
                rows.append(_row(job, f"failed: {str(e).splitlines()[0][:300]}"))
            else:
                value = results["metrics"].get(job.metric)
                if value is not None and job.metric in PERCENT:
                    value = 100.0 * value
                rows.append(_row(job, "ok", None if value is None else round(float(value), 2),
                                 {"seconds": round(time.time() - start, 1),
                                  "examples": results.get("num_predictions")}))
        _write(workdir, suite, rows)
    for name, why in dict(suite.get("unsupported") or {}).items():
        if not only or name in only:
            rows.append({"job": name, "config": "", "metric": "", "value": None, "status": f"unsupported: {why}",
                         "paper": {}})
    _write(workdir, suite, rows)
    return rows


def table(suite, rows: list[dict]) -> str:
    models = list(suite.get("paper_models") or [])
    head = ["job", "metric", "blip-jax", *[f"paper {m}" for m in models], "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.2f}"
        paper = [str(r["paper"].get(m, "")) for m in models]
        lines.append("| " + " | ".join([r["job"], r["metric"], value, *paper, r["status"]]) + " |")
    return "\n".join(lines) + "\n"


def _write(workdir, suite, rows) -> None:
    counts = {"ok": sum(r["status"] == "ok" for r in rows),
              "missing_data": sum(r["status"].startswith("missing") for r in rows),
              "failed": sum(r["status"].startswith("failed") for r in rows),
              "unsupported": sum(r["status"].startswith("unsupported") for r in rows)}
    write_json(workdir / "suite.json", {"suite": suite.get("name", ""), "counts": counts, "rows": rows})
    write_file(workdir / "suite.md", table(suite, rows))


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="blip-jax eval-suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, help="suite config, e.g. configs/eval/instructblip_heldout.py")
    p.add_argument("--ckpt", required=True, help="a blip-jax model directory, or a training workdir")
    p.add_argument("--data_root", required=True, help="directory (or bucket prefix) the jobs' data files are under")
    p.add_argument("--workdir", required=True, help="output directory: one folder per job, suite.json, suite.md")
    p.add_argument("--only", default="", help="comma-separated job names")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an eval config field for every job, e.g. batch_size=8 or 'generation={\"num_beams\": 1}'")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    suite_path = Path(args.suite)
    if not suite_path.is_file():
        print(f"blip-jax eval-suite: error: --suite {args.suite}: no such file", file=sys.stderr)
        return 2
    suite = load_config(suite_path)
    only = tuple(n for n in args.only.split(",") if n)
    unknown = sorted(set(only) - {j.name for j in suite.jobs} - set(dict(suite.get("unsupported") or {})))
    if unknown:
        print(f"blip-jax eval-suite: error: --only names unknown jobs {unknown}; jobs: "
              f"{', '.join(j.name for j in suite.jobs)}", file=sys.stderr)
        return 2
    rows = run_suite(suite, args.ckpt, args.data_root, args.workdir, only=only, overrides=parse_overrides(args.set),
                     progress=args.progress)
    print(table(suite, rows))
    return 0
