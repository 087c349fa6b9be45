"""Model directories: an Orbax checkpoint of the parameters plus config, tokenizer and image files.

    DST/config.json              blip-jax model config (BlipConfig.to_dict)
    DST/params/part_NNNNN/       Orbax PyTree checkpoints of the parameters, ~256 MB each
    DST/params/parts.json        which parameters each part holds
    DST/tokenizer.json ...       tokenizer and preprocessor files copied from the source
    DST/conversion.json          provenance: source, architecture, tensors read, ignored keys
    DST/train_extra/params/      (BLIP pre-training from LAVIS only) momentum encoders and queues

Writes are atomic (`blip_jax.atomic.directory`): everything goes into a temporary sibling directory
that is renamed into place only when complete, so a failed or interrupted write never leaves a
half-written DST.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from tqdm import tqdm

from blip_jax import paths
from blip_jax.models.config import BlipConfig

CONFIG = "config.json"
PARAMS = "params"
PARTS = "parts.json"
PART_BYTES = 256 << 20  # one Orbax checkpoint per ~256 MB of parameters: bounds conversion memory
TRAINED_MODEL = "model"  # where a training run exports its model: W/model
# beside params/: a pre-training run's state besides its parameters (BLIP's momentum encoders and
# queues, from a LAVIS pre-training checkpoint), which a run started from the directory continues
TRAIN_EXTRA = "train_extra"


def _writer():
    """Orbax's PyTree checkpointer; in a multi-process job, one for the calling process alone (a
    model directory is written by one host after gathering), so the others need not join its barriers."""
    # uncompressed: weights barely compress, and zstd costs a copy of the part and 3x the time
    if jax.process_count() == 1:
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False), multiprocessing_options=options)


def save_params(directory: Path, params, *, part_bytes: int = PART_BYTES, progress: bool = False) -> None:
    """Save a parameter tree as Orbax checkpoints of at most `part_bytes` each (params/part_NNNNN,
    listed in params/parts.json; a tensor larger than that is a part alone). Leaves may be lazy
    (`LazyWeight`, read here one at a time), so a conversion holds one part and the tensor being
    read, never the model (a 2.4 GB LAVIS BLIP: benchmarks/results/convert_memory_cpu.json). A
    scanned stack's leaf (all layers of one tensor) is read whole. `params` is consumed."""
    flat = traverse_util.flatten_dict(params, sep="/")
    params.clear()
    root = Path(directory).absolute() / PARAMS
    root.mkdir(parents=True, exist_ok=True)
    parts, part, size = [], {}, 0

    def nbytes(value) -> int:
        return int(getattr(value, "nbytes", None) or np.asarray(value).nbytes)

    def flush():
        nonlocal part, size
        with _writer() as ckptr:
            ckptr.save(root / f"part_{len(parts):05d}", traverse_util.unflatten_dict(part, sep="/"))
        parts.append(sorted(part))
        part, size = {}, 0

    with tqdm(total=sum(map(nbytes, flat.values())), unit="B", unit_scale=True, desc="write",
              disable=not progress) as bar:
        for path in list(flat):
            if part and size + nbytes(flat[path]) > part_bytes:  # written before the next is read
                flush()
            value = np.asarray(flat.pop(path))  # a lazy weight is read here
            # a jax leaf on one host (on CPU it shares the numpy buffer); a multi-process job may
            # only hand Orbax global arrays, so there (one host writing gathered values) numpy it is
            part[path] = jax.device_put(value) if jax.process_count() == 1 else value
            size += value.nbytes
            bar.update(value.nbytes)
            del value
        if part or not parts:
            flush()
    (root / PARTS).write_text(json.dumps({"parts": parts}) + "\n")


def restore_params(directory: str | Path, target=None):
    """Restore parameters; `target` (a tree of ShapeDtypeStructs, optionally with shardings) places
    each array straight into its dtype and sharding, part by part."""
    root = Path(directory).absolute() / PARAMS
    if not (root / PARTS).exists():  # one checkpoint (written before parts existed)
        return _restore(root, target)
    flat_target = None if target is None else traverse_util.flatten_dict(target, sep="/")
    flat = {}
    for i, names in enumerate(json.loads((root / PARTS).read_text())["parts"]):
        sub = None
        if flat_target is not None:
            missing = [p for p in names if p not in flat_target]
            if missing:
                raise ValueError(f"{root}: stored parameters the model does not have: {missing[:5]}")
            sub = traverse_util.unflatten_dict({p: flat_target[p] for p in names}, sep="/")
        flat.update(traverse_util.flatten_dict(_restore(root / f"part_{i:05d}", sub), sep="/"))
    if flat_target is not None and set(flat) != set(flat_target):
        raise ValueError(f"{root}: parameters missing from the checkpoint: {sorted(set(flat_target) - set(flat))[:5]}")
    return traverse_util.unflatten_dict(flat, sep="/")


def stored_paths(directory: str | Path) -> list[str]:
    """'/'-joined paths of every stored parameter, read from the metadata (no array is read)."""
    root = Path(directory).absolute() / PARAMS
    if (root / PARTS).exists():
        return [p for paths in json.loads((root / PARTS).read_text())["parts"] for p in paths]
    return list(stored_shapes(directory))


def stored_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """{'/'-joined path: shape} of every stored parameter, from the metadata (no array is read)."""
    root = Path(directory).absolute() / PARAMS
    checkpoints = sorted(root.glob("part_*")) if (root / PARTS).exists() else [root]
    out = {}
    with ocp.PyTreeCheckpointer() as ckptr:
        for path in checkpoints:
            tree = dict(ckptr.metadata(path).item_metadata)
            out.update({k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()})
    return out


def _restore(path: Path, target):
    with ocp.PyTreeCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        restore_args = jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(dtype=s.dtype, sharding=getattr(s, "sharding", None))
            if getattr(s, "sharding", None) is not None
            else ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype),
            target,
        )
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))


def write_config(directory: Path, config) -> None:
    (Path(directory) / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def model_dir(path: str | Path) -> Path:
    """The model directory `path` names: itself, or a training workdir's exported W/model. A
    workdir whose run has not exported yet is refused with what to do. In a bucket (gs://, s3://):
    a local copy of it (`paths.local_copy`), which the model loads from."""
    if paths.is_remote(path):
        remote = paths.path(path)
        own = remote / CONFIG
        trained = own.exists() and "objective" in json.loads(own.read_text())
        if trained and not (remote / TRAINED_MODEL / CONFIG).exists():
            raise FileNotFoundError(f"{path} is a training workdir with no {TRAINED_MODEL}/ yet (the run has not "
                                    "finished): rerun its `blip-jax train` command to finish and export it")
        return paths.local_copy(str(remote / TRAINED_MODEL) if trained else str(path))
    path = Path(path)
    own = path / CONFIG
    if own.is_file() and "objective" not in json.loads(own.read_text()):  # a training workdir's config has one
        return path
    if (path / TRAINED_MODEL / CONFIG).is_file():
        return path / TRAINED_MODEL
    if (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"{path} is a training workdir with no {TRAINED_MODEL}/ yet (the run has not "
                                f"finished): rerun its `blip-jax train` command to finish and export it, or pass a "
                                "model directory")
    return path


def read_config(directory: str | Path) -> BlipConfig:
    directory = model_dir(directory)
    path = directory / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a blip-jax model directory (make one with `blip-jax convert`)")
    d = json.loads(path.read_text())
    if "architectures" in d and "architecture" not in d:
        raise ValueError(f"{directory} holds a transformers checkpoint; convert it first: blip-jax convert {directory} DST")
    if d.get("model_type") == "blip2":
        from blip_jax.models.blip2 import Blip2Config

        return Blip2Config.from_dict(d)
    return BlipConfig.from_dict(d)


def load(directory: str | Path, scan_layers: bool | None = None):
    """(config, params) of a blip-jax model directory, params restored as jax arrays in the
    config's parameter dtype. `scan_layers` switches the layer layout on load when it differs
    from the stored one."""
    import jax.numpy as jnp

    from blip_jax.models import blip, blip2
    from blip_jax.models.layout import stack_layers, unstack_layers
    from blip_jax.models.tying import applied_form, stored_form

    directory = model_dir(directory)
    config = read_config(directory)
    param_shapes = blip.param_shapes if isinstance(config, BlipConfig) else blip2.param_shapes
    if not isinstance(config, BlipConfig):
        if scan_layers is not None and scan_layers != config.scan_layers:
            raise ValueError(f"{directory} stores scan_layers={config.scan_layers}; convert again to change the "
                             "layout of a BLIP-2 model")
    try:  # BLIP's pre-training model stores its tied decoder once
        params = applied_form(config, restore_params(directory, stored_form(config, param_shapes(config))))
    except Exception as e:  # orbax's errors on a tree mismatch are long; say what it means first
        raise ValueError(f"{directory}: the stored parameters do not match {CONFIG} "
                         f"({config.architecture}, scan_layers={config.scan_layers}): {e}") from e
    if scan_layers is not None and scan_layers != config.scan_layers:
        params = (stack_layers if scan_layers else unstack_layers)(params)
        config = config.replace(scan_layers=scan_layers)
    return config, jax.tree.map(jnp.asarray, params)
