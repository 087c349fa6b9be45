"""One validation pass over a job's config, run by `blip-jax train`, `eval` and `capfilt` before
anything is built or compiled: types, ranges, choices, divisibility of the batch by the mesh and by
`grad_accum_steps`, and the paths it names. Each problem is a `ConfigError` naming the field, the
value and what would be valid, in one line (the CLI prints it and exits 2).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path


class ConfigError(ValueError):
    def __init__(self, field: str, value, valid: str):
        super().__init__(f"config.{field} = {value!r}: {valid}")
        self.field = field


def _get(cfg, field: str):
    node = cfg
    for part in field.split("."):
        node = node[part]
    return node


def _int(cfg, field: str, low: int = 1):
    value = _get(cfg, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(field, value, f"must be an integer >= {low}")
    return int(value)


def _number(cfg, field: str, low: float = 0.0, high: float = math.inf, *, open_low: bool = False,
            open_high: bool = False) -> float:
    value = _get(cfg, field)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        span = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(field, value, f"must be a number in {span}")
    return float(value)


def _choice(cfg, field: str, choices) -> str:
    value = _get(cfg, field)
    if value not in choices:
        raise ConfigError(field, value, f"must be one of {', '.join(map(repr, choices))}")
    return value


def _path(cfg, field: str, kind: str, required: bool = True, value=None) -> None:
    """A local path the config names (or `value`, the field's value resolved): kind "file" or "dir";
    gs:// and s3:// URLs are not checked here."""
    value = _get(cfg, field) if value is None else value
    if not value:
        if required:
            raise ConfigError(field, value, f"must name a {'file' if kind == 'file' else 'directory'}")
        return
    if "://" in str(value):
        return
    path = Path(value)
    if not path.exists():
        raise ConfigError(field, value, "no such file or directory")
    if kind == "file" and not path.is_file():
        raise ConfigError(field, value, "must be a file, not a directory")
    if kind == "dir" and not path.is_dir():
        raise ConfigError(field, value, "must be a directory")


# ------------------------------------------------------------------------------------- data
def source(cfg, prefix: str = "data", paths: bool = True, root: str = "") -> None:
    """One source's settings (`blip_jax.data.sources`); `paths=False` leaves its paths unchecked;
    relative paths are under its `root`, else `root`."""
    from blip_jax.data.instructions import FAMILIES
    from blip_jax.data.sources import KINDS, under_root

    kind = _choice(cfg, f"{prefix}.kind", KINDS)
    spec = dict(_get(cfg, prefix))
    if spec.get("instruction_family"):
        _choice(cfg, f"{prefix}.instruction_family", FAMILIES)
    if not paths:
        return
    resolved = under_root({**spec, "root": spec.get("root") or root})
    if kind == "json":
        _path(cfg, f"{prefix}.path", "file", value=resolved["path"])
        _path(cfg, f"{prefix}.image_root", "dir", required=False, value=resolved.get("image_root", ""))
    elif kind == "webdataset":
        if not _get(cfg, f"{prefix}.path"):
            raise ConfigError(f"{prefix}.path", "", "must name WebDataset shards (a directory, glob or .tar)")
    elif kind == "packed":
        _path(cfg, f"{prefix}.path", "dir")
        if "://" not in str(_get(cfg, f"{prefix}.path")) and not (Path(_get(cfg, f"{prefix}.path")) / "pack.json").is_file():
            raise ConfigError(f"{prefix}.path", _get(cfg, f"{prefix}.path"), "is not a packed dataset (no pack.json; "
                              "make one with `blip-jax data pack`)")
    elif kind == "tfds":
        if not _get(cfg, f"{prefix}.tfds_name"):
            raise ConfigError(f"{prefix}.tfds_name", "", "must name a TFDS dataset")
    elif kind in ("synthetic", "synthetic_pairs"):
        _int(cfg, f"{prefix}.num_records")
        _int(cfg, f"{prefix}.image_size", 8)
        _number(cfg, f"{prefix}.wrong_fraction", 0.0, 1.0)


def data(cfg, paths: bool = True) -> None:
    """`cfg.data` of a training run: its source (or mixture) and how records become inputs."""
    from blip_jax.data.mixing import BALANCES
    from blip_jax.data.transforms import TRANSFORM_KINDS

    mixture = dict(cfg.data.get("mixture") or {})
    for name, spec in mixture.items():
        if not hasattr(spec, "get"):
            raise ConfigError(f"data.mixture.{name}", spec, "must be a source's settings (a dict)")
        source(cfg, f"data.mixture.{name}", paths, root=cfg.data.get("root", ""))
        if "weight" in spec:
            _number(cfg, f"data.mixture.{name}.weight", 0.0, open_low=True)
    if not mixture:
        source(cfg, "data", paths)
    _choice(cfg, "data.balance", BALANCES)
    _choice(cfg, "data.augment", TRANSFORM_KINDS)
    _number(cfg, "data.min_scale", 0.0, 1.0, open_low=True)
    for field in ("max_words", "max_text_len", "max_answers", "max_answer_len"):
        _int(cfg, f"data.{field}")
    _int(cfg, "data.max_prompt_len", 0)  # 0: no limit
    _int(cfg, "data.max_target_len", 0)
    _int(cfg, "data.read_threads", 0)
    _int(cfg, "data.worker_count", 0)
    _int(cfg, "data.seed", 0)


# ------------------------------------------------------------------------------------- jobs
def train(cfg, device_count: int, process_count: int = 1, *, paths: bool = True) -> None:
    """A training config, for a run on `device_count` devices in `process_count` processes;
    `paths=False` (a dry run, which reads no data) leaves the data and init_from paths unchecked."""
    from blip_jax.data.instructions import FAMILIES
    from blip_jax.train import sharding
    from blip_jax.train.objectives import STAGES
    from blip_jax.train.optim import SCHEDULES

    _choice(cfg, "objective", tuple(STAGES))
    for field in ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                  "grad_accum_steps"):
        _int(cfg, field)
    _int(cfg, "seed", 0)
    _choice(cfg, "nonfinite", ("stop", "skip"))
    try:
        shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(dict(cfg.mesh), device_count)))
    except ValueError as e:
        raise ConfigError("mesh", dict(cfg.mesh), str(e)) from None
    batch, accum = int(cfg.batch_size), int(cfg.grad_accum_steps)
    if batch % accum:
        raise ConfigError("grad_accum_steps", accum, f"must divide batch_size {batch}")
    shards = math.prod(shape[a] for a in sharding.BATCH_AXES)
    micro = batch // accum
    if micro % shards:
        raise ConfigError("batch_size", batch, f"each microbatch ({micro} rows = batch_size / grad_accum_steps) must "
                          f"divide over the mesh's {shards} batch shards (data x fsdp of {shape} on {device_count} "
                          f"devices)")
    if batch % process_count:
        raise ConfigError("batch_size", batch, f"must divide over the {process_count} processes")
    o = "optim"
    _number(cfg, f"{o}.lr", 0.0, open_low=True)
    _number(cfg, f"{o}.min_lr", 0.0)
    _int(cfg, f"{o}.warmup_steps", 0)
    _int(cfg, f"{o}.decay_steps", 1)
    for field in ("b1", "b2"):
        _number(cfg, f"{o}.{field}", 0.0, 1.0, open_high=True)
    _number(cfg, f"{o}.eps", 0.0, open_low=True)
    _number(cfg, f"{o}.weight_decay", 0.0)
    _number(cfg, f"{o}.clip_norm", 0.0)
    if _choice(cfg, f"{o}.schedule", SCHEDULES) == "step":
        _int(cfg, f"{o}.steps_per_epoch", 1)
    data(cfg, paths)
    if cfg.data.instruction_family:
        _choice(cfg, "data.instruction_family", FAMILIES)
    m = cfg.model
    if "precision" in m:
        from blip_jax.train.defaults import PRECISIONS

        _choice(cfg, "model.precision", tuple(PRECISIONS))
    for field in ("dtype", "frozen_dtype", "qformer_dtype"):
        if field in m:
            _choice(cfg, f"model.{field}", ("", "float32", "bfloat16", "float16"))
    if paths and m.init_from and "://" not in str(m.init_from):
        from blip_jax import checkpoint

        if not Path(m.init_from).is_dir():
            raise ConfigError("model.init_from", m.init_from, "no such model directory or training workdir")
        try:
            checkpoint.model_dir(m.init_from)
        except FileNotFoundError as e:
            raise ConfigError("model.init_from", m.init_from, str(e)) from None


def evaluation(cfg) -> None:
    from blip_jax.eval.defaults import TASKS

    _choice(cfg, "task", TASKS)
    for field in ("batch_size", "shard_size", "max_words", "itm_shard_pairs", "rank_k"):
        _int(cfg, field)
    _int(cfg, "gallery", 0)
    if cfg.task == "classification":  # a folder of class folders
        _path(cfg, "data.path", "dir")
    else:
        source(cfg)


def capfilt(cfg) -> None:
    from blip_jax.capfilt import MODES

    _choice(cfg, "mode", MODES)
    for field in ("batch_size", "shard_size", "max_words", "max_new_tokens", "top_k", "pack_records_per_shard"):
        _int(cfg, field)
    for field in ("num_captions", "min_new_tokens", "gallery", "seed"):
        _int(cfg, field, 0)
    _number(cfg, "top_p", 0.0, 1.0, open_low=True)
    _number(cfg, "threshold", 0.0, 1.0)
    source(cfg)
