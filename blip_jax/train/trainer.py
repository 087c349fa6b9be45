"""The one trainer of every stage: a jitted, sharded train step (gradient accumulation over
microbatches, frozen parameters never differentiated), Orbax checkpoints with exact resume, and
metrics as JSON lines and TensorBoard events.

Stages differ by config only: the model (`model.*`), which parameters train (`trainable` regexes),
the stage (`objective`: a record of `blip_jax.train.objectives.STAGES`) and the data.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from tqdm import tqdm

from blip_jax import atomic, checkpoint, hardware, paths
from blip_jax.train import flops, inputs, optim, partition, sharding
from blip_jax.train import state as state_lib
from blip_jax.train.export import export_model
from blip_jax.train.objectives import stage_of
from blip_jax.train.state import shardings_of


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite."""


def loss_function(model, cfg):
    """loss_of(trainable, frozen, batch, rng, extra) -> (loss, (metrics, extra)): what the step differentiates."""
    objective = functools.partial(stage_of(cfg).loss, model, cfg=cfg.loss)

    def loss_of(trainable, frozen, micro, rng, extra):
        loss, metrics, extra = objective(partition.merge(trainable, frozen), micro, rng, extra=extra)
        return loss, (metrics, extra)

    return loss_of


def model_flops(model, cfg, mesh, train: dict, frozen: dict, batch: dict) -> float:
    """Model FLOPs of one train step of the global `batch` (`blip_jax.train.flops`: frozen-aware)."""
    with sharding.activation_rules(mesh, cfg.rules):
        return flops.loss_flops(loss_function(model, cfg), train["params"], frozen, batch, train["rng"],
                                train["extra"])


def make_train_step(model, optimizer: optax.GradientTransformation, cfg, mesh, train_shardings, frozen_shardings):
    """jit(train_step(train, frozen, batch) -> (train, metrics)) with these shardings, the train state
    donated."""
    stage = stage_of(cfg)
    accum = int(cfg.grad_accum_steps)

    if accum > 1 and not stage.accumulates:
        raise ValueError(f"{stage.name} keeps state (momentum encoders, queues) that advances every step: "
                         "grad_accum_steps must be 1")

    grad_fn = jax.value_and_grad(loss_function(model, cfg), has_aux=True)

    def train_step(train, frozen, batch):
        with sharding.activation_rules(mesh, cfg.rules):
            return _train_step(train, frozen, batch)

    def _train_step(train, frozen, batch):
        rng = jax.random.fold_in(train["rng"], train["step"])
        params = train["params"]
        extra = train["extra"]
        if accum == 1:
            (loss, (metrics, extra)), grads = grad_fn(params, frozen, batch, rng, extra)
        else:  # microbatches in a scan: one optimizer update for the whole batch
            micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
            # each microbatch's mean weighs what it averages over (the LM loss: its target tokens), so
            # the accumulated loss and gradient are the whole batch's, not a mean of means
            weight_of = stage.microbatch_weight or (lambda mb: 1.0)

            def body(carry, xs):
                i, mb = xs
                (l, (m, _)), g = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i), extra)
                w = jnp.asarray(weight_of(mb), jnp.float32)
                return jax.tree.map(lambda c, x: (c + w * x).astype(c.dtype), carry, (l, m, g, 1.0)), None

            (l_s, (m_s, _)), g_s = jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], micro), rng,
                                                  extra)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l_s, m_s, g_s))
            (loss, metrics, grads, total), _ = jax.lax.scan(body, (*zeros, jnp.zeros((), jnp.float32)),
                                                            (jnp.arange(accum), micro))
            loss, metrics, grads = jax.tree.map(lambda x: (x / jnp.maximum(total, 1e-12)).astype(x.dtype),
                                                (loss, metrics, grads))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, train["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # a non-finite step never reaches the weights; "stop" ends the run on the host after it
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        step = train["step"]
        bad = jnp.where((train["bad_step"] < 0) & ~finite, step, train["bad_step"])
        new_train = {"step": step + 1, "params": keep(new_params, params),
                     "opt_state": keep(opt_state, train["opt_state"]), "rng": train["rng"], "bad_step": bad,
                     "extra": keep(extra, train["extra"])}
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                   "learning_rate": optim.schedule(cfg.optim)(step), "skipped": (~finite).astype(jnp.int32)}
        return new_train, metrics

    return jax.jit(train_step, in_shardings=(train_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(train_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of `tree`'s arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard events, from process 0 only. In
    a bucket, which has no append, both are written locally and uploaded whole at each log."""

    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.remote = paths.is_remote(workdir)
        self.tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.tb_dir = workdir / "tensorboard"
            self.tb_local = tempfile.mkdtemp(prefix="blip_jax_tb.") if self.remote else str(self.tb_dir)
            self.tb = SummaryWriter(self.tb_local)
            self.lines = self.path.read_text().splitlines(keepends=True) if self.remote and self.path.exists() else []

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            self.lines.append(line)
            atomic.write_file(self.path, "".join(self.lines))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)
        self.tb.flush()
        if self.remote:
            paths.upload_tree(self.tb_local, self.tb_dir)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            if self.remote:
                paths.upload_tree(self.tb_local, self.tb_dir)
                shutil.rmtree(self.tb_local, ignore_errors=True)


def _checkpoint_manager(workdir: Path, cfg) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, save_interval_steps=cfg.checkpoint_every,
                                           enable_async_checkpointing=cfg.async_checkpointing, create=True)
    return ocp.CheckpointManager(paths.absolute(workdir) / "checkpoints", options=options,
                                 item_names=("state", "data"))


class _stderr_held:
    """File descriptor 2 captured for a block and written out after it, or, after `discard()`,
    dropped once the stragglers have had a second to finish."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved, self._file, self._keep = os.dup(2), tempfile.TemporaryFile(), True
        os.dup2(self._file.fileno(), 2)
        return self

    def discard(self):
        self._keep = False

    def __exit__(self, *exc):
        if not self._keep:
            time.sleep(1.0)
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if self._keep:
            self._file.seek(0)
            sys.stderr.write(self._file.read().decode("utf-8", "replace"))
        self._file.close()
        return False


def _restore(manager: ocp.CheckpointManager, step: int, target) -> dict:
    """Checkpoint `step`; a damaged one (a truncated part, a missing _METADATA) is refused naming the
    step, with the previous checkpoint offered."""
    try:
        with _stderr_held() as held:
            try:
                return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     data=ocp.args.JsonRestore()))
            except Exception:
                held.discard()  # the failed read's threads print asyncio tracebacks as they wind down
                raise
    except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many kinds for a damaged file
        from blip_jax.errors import one_line

        where = paths.path(str(manager.directory)) / str(step)
        earlier = [s for s in manager.all_steps() if s < step]
        offer = (f"delete {where} to resume from the previous checkpoint, step {max(earlier)}" if earlier else
                 "no earlier checkpoint is left: start fresh with a new --workdir")
        raise ValueError(f"checkpoint step {step} in {where.parent} cannot be restored "
                         f"({type(e).__name__}: {one_line(e)[:300]}); {offer}") from e


def _save_frozen(workdir: Path, frozen: dict, cfg):
    """Frozen parameters are written once per run (or referenced to the converted checkpoint)."""
    path = state_lib.frozen_dir(workdir)
    if cfg.model.init_from or path.exists() or not jax.tree.leaves(frozen):  # BLIP trains everything
        return
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(paths.absolute(path), frozen)


def _restore_frozen(workdir: Path, frozen: dict) -> dict:
    path = paths.absolute(state_lib.frozen_dir(workdir))
    if not path.exists():
        return frozen
    target = abstract_like(frozen)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


def setup(cfg, mesh):
    """What a run builds before its loop: (state, task, jitted train step, optimizer)."""
    if cfg.model.init_from:  # a model directory, or a training workdir's W/model
        cfg.model.init_from = str(checkpoint.model_dir(cfg.model.init_from))
    optimizer = optim.make_optimizer(cfg.optim)
    draft = state_lib.model_config(cfg)
    family, llm = getattr(draft, "family", None), getattr(draft, "llm", None)
    eos = llm.eos_token_id if llm and cfg.model.init_from else None  # a new model's is its tokenizer's
    task = inputs.make_task(cfg, draft.vision.image_size, bool(family and family.encoder_decoder), eos)
    inputs.prepare_loss(cfg, mesh, task.qformer_tokenizer, task.llm_tokenizer)
    st = state_lib.create(cfg, mesh, optimizer, task.vocab())
    step_fn = make_train_step(st.model, optimizer, cfg, mesh, shardings_of(st.train), shardings_of(st.frozen))
    return st, task, step_fn, optimizer


def _say(message: str) -> None:
    """A line for the user on stderr (process 0), also in the log."""
    logging.info(message)
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stderr)


def train(cfg, workdir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) the training job `cfg` in `workdir` (a directory, or a gs:// / s3:// URL);
    returns the last logged metrics."""
    if str(workdir).startswith("s3://"):  # Orbax's checkpoint format (OCDBT on TensorStore) writes local and gs://
        raise ValueError(f"{workdir}: a training workdir cannot be on s3:// (Orbax checkpoints support local "
                         "paths and gs://); models, eval workdirs and conversions can")
    workdir = paths.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _claim(workdir, cfg)
    atomic.write_file(workdir / "config.json", cfg.to_json_best_effort(indent=2) + "\n")
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    st, task, step_fn, _ = setup(cfg, mesh)
    data = task.iterator(process_index=jax.process_index(), process_count=jax.process_count())
    manager = _checkpoint_manager(workdir, cfg)

    total = int(cfg.total_steps)
    latest = manager.latest_step()
    if latest is not None:  # resume: trainable state, optimizer, rng and data position
        try:
            restored = _restore(manager, latest, abstract_like(st.train))
        except ValueError:
            manager.close()  # its background threads stop before the error reaches the user
            raise
        st.train = restored["state"]
        inputs.restore_iterator(data, restored["data"])
        st.frozen = _restore_frozen(workdir, st.frozen)
        _say(f"resumed from step {latest} of {workdir}")
    else:
        _save_frozen(workdir, st.frozen, cfg)

    writer = MetricsWriter(workdir)
    start = int(st.train["step"])
    batch_size = int(cfg.batch_size)
    last = {}
    bar = None
    reported_skips: dict[str, int] = {}
    host_batch = next(data) if start < total else None
    first = task.global_batch(host_batch, mesh) if host_batch is not None else None
    if first is not None:  # compiled ahead of the loop, so its time is reported apart from the steps'
        _say(f"compiling the {task.stage.name} train step ...")
        t0 = time.time()
        step_fn = step_fn.lower(st.train, st.frozen, first).compile()
        compile_seconds = time.time() - t0
        step_flops = model_flops(st.model, cfg, mesh, st.train, st.frozen, first)
        peak, peak_name = hardware.peak_flops(jax.devices()[0])
        if jax.devices()[0].platform == "cpu":  # a host's fake devices share its cores
            peak /= jax.local_device_count()
        _say(f"compiled in {compile_seconds:.1f} s; {step_flops / 1e9:.3g} GFLOP a step (model FLOPs), "
             f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_name})")
    resumed = f" (resumed from step {start})" if latest is not None else ""
    bar = tqdm(total=total, initial=start, unit="step", desc=f"train {task.stage.name}{resumed}",
               disable=not progress or jax.process_index() != 0)
    t0, logged_at = time.time(), start
    try:
        images = tokens = 0
        for step in range(start, total):
            if step != start:
                host_batch = next(data)
            batch = first if step == start else task.global_batch(host_batch, mesh)
            counts = flops.batch_counts(host_batch)  # this process's rows
            images, tokens = images + counts[0], tokens + counts[1]
            st.train, metrics = step_fn(st.train, st.frozen, batch)
            done = step + 1
            if done % cfg.log_every == 0 or done == total:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = max(time.time() - t0, 1e-9)
                values["steps_per_sec"] = (done - logged_at) / dt
                values["examples_per_sec"] = values["steps_per_sec"] * batch_size
                n = done - logged_at  # per-step means of what this process fed, times the processes
                values.update(flops.throughput(step_flops, values["steps_per_sec"], jax.device_count(), peak,
                                               images / n * jax.process_count(), tokens / n * jax.process_count()))
                images = tokens = 0
                values["host_rss_mib"] = hardware.host_rss_bytes() / (1 << 20)  # creeping host memory shows here
                t0, logged_at = time.time(), done
                skipped = _data_report(task, data, workdir, done)
                values["skipped_records"] = float(sum(skipped.values()))
                if skipped != reported_skips and jax.process_index() == 0:
                    logging.warning("data: %d bad records skipped so far %s (W/data_report.json)",
                                    sum(skipped.values()), skipped)
                    reported_skips = skipped
                writer.write(done, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                last = {"step": done, **values}
                _check_finite(st.train, cfg)
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == total:
                manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(st.train),
                                                           data=ocp.args.JsonSave(inputs.iterator_state(data))),
                             force=True)
        _check_finite(st.train, cfg)
        if first is not None:
            last["compile_seconds"] = compile_seconds  # apart from metrics.jsonl's per-step figures
        last["model"] = str(export_model(workdir, st, task))
        if cfg.report and jax.process_count() == 1 and cfg.data.kind in ("synthetic", "synthetic_pairs") and not cfg.data.mixture:
            from blip_jax.train.report import report

            last["report"] = report(cfg, st, task)
            atomic.write_json(workdir / "report.json", last["report"])
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        if bar is not None:
            bar.close()
    return last


# metrics.jsonl fields that measure the machine (speed, memory), not the model: they differ between
# two runs of the same job
MACHINE_METRICS = ("steps_per_sec", "examples_per_sec", "tflops_per_sec_per_device", "mfu",
                   "images_per_sec_per_device", "tokens_per_sec_per_device", "host_rss_mib")


# Fields a resumed run may change: how long it runs and how it logs, not what it computes.
RESUMABLE_CHANGES = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "async_checkpointing",
                     "report", "nonfinite")


def _claim(workdir: Path, cfg) -> None:
    """Resume only the run that wrote `workdir` (blip_jax.jobs): the same initial model and the same
    settings, except RESUMABLE_CHANGES."""
    from blip_jax import jobs

    settings = json.loads(cfg.to_json_best_effort())
    for name in RESUMABLE_CHANGES:
        settings.pop(name, None)
    models = {}
    if cfg.model.init_from:
        init = checkpoint.model_dir(cfg.model.init_from)
        settings["model"]["init_from"] = str(Path(init).resolve())
        models["init_from"] = jobs.model_identity(init)
    checkpoints = workdir / "checkpoints"
    jobs.claim(workdir, {"job": "train", "models": models, "settings": settings},
               has_outputs=checkpoints.is_dir() and any(checkpoints.iterdir()), write=jax.process_index() == 0)


def _data_report(task, data, workdir: Path, step: int) -> dict[str, int]:
    """Skipped records by reason, summed over processes (a collective: every process calls it at
    the same step), written by process 0 to W/data_report.json."""
    from jax.experimental import multihost_utils

    from blip_jax.data.records import REASONS, add_counts

    local = task.skipped(data)
    counts = np.asarray([local.get(r, 0) for r in REASONS], np.int64)
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
    total = add_counts({r: int(n) for r, n in zip(REASONS, counts) if n}, task.source_skipped)
    if jax.process_index() == 0:
        report = {"step": step, "skipped": total, "skipped_total": sum(total.values())}
        atomic.write_json(workdir / "data_report.json", report)
    return total


def _check_finite(train: dict, cfg):
    bad = int(train["bad_step"])
    if bad >= 0 and cfg.nonfinite == "stop":
        raise NonFiniteLossError(f"the loss or gradient norm is not finite at step {bad} (counting from 0); the "
                                 "update was not applied. Set --config.nonfinite=skip to skip such steps instead.")
