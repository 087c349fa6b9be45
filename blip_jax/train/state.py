"""Building the sharded model state: config -> model, parameters placed in their shardings (converted
weights restored straight into them, only the missing ones initialised), split into the trainable
tree (with optimizer state) and the frozen tree (no gradients, no optimizer state, saved once)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh

from blip_jax import checkpoint, paths
from blip_jax.models import lora, transfer
from blip_jax.models.blip import Blip
from blip_jax.models.blip2 import Blip2, Blip2Config, _init_inputs
from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig
from blip_jax.models.llm import FAMILIES
from blip_jax.models.qformer import QFormerConfig
from blip_jax.models import tying
from blip_jax.train import defaults, partition, sharding
from blip_jax.train.objectives import Stage, stage_of


def model_config(cfg, vocab: dict | None = None) -> Blip2Config | BlipConfig:
    """The model config a train config describes: a converted checkpoint's (`model.init_from`) or one
    built from the config's fields (random initialisation, vocabulary sizes and special token ids
    from `vocab`, the task's tokenizers), with the run's dtypes and layout: a `BlipConfig` or a
    `Blip2Config`, as the stage's model says."""
    m = cfg.model
    stage = stage_of(cfg)
    if stage.model == "blip":
        return blip_model_config(cfg, stage, vocab)
    d = defaults.dtypes(m)
    run = dict(dtype=d["dtype"], param_dtype="float32", frozen_param_dtype=d["frozen_dtype"],
               qformer_dtype=d["qformer_dtype"], scan_layers=m.scan_layers, remat_policy=m.remat_policy, **stage.model_fields)
    if m.get("qformer_input") == "question":  # BLIP-2's VQA fine-tune: the question enters the Q-Former
        run.update(instruct=True, qformer_input="question")
    if m.init_from:
        base = checkpoint.read_config(m.init_from)
        if not isinstance(base, Blip2Config):
            raise ValueError(f"{m.init_from} is not a BLIP-2 / InstructBLIP model directory")
        if stage.architecture and base.architecture != stage.architecture:
            raise ValueError(f"{stage.name} trains the {stage.architecture} architecture; "
                             f"{m.init_from} is a {base.architecture} model")
        if m.get("resolution"):  # fine-tuning at another image size: the ViT's positions are resized on load
            run["vision"] = dataclasses.replace(base.vision, image_size=int(m.resolution))
        return base.replace(**run)
    vocab = vocab or {}
    architecture = stage.architecture or m.architecture
    family = FAMILIES.get(m.llm_family) if architecture == "generation" else None
    llm = None
    if family:
        fields = {f.name for f in dataclasses.fields(family.config)}
        ids = {"vocab_size": vocab.get("llm_vocab_size"), "pad_token_id": vocab.get("pad_token_id"),
               "eos_token_id": vocab.get("eos_token_id"), "bos_token_id": vocab.get("bos_token_id"),
               "decoder_start_token_id": vocab.get("pad_token_id")}
        llm = family.config(**{**m.llm.to_dict(), **{k: v for k, v in ids.items() if k in fields and v is not None}})
    return Blip2Config(
        architecture=architecture, instruct=run.pop("instruct", m.instruct), vision=VisionConfig(**m.vision.to_dict()),
        qformer=QFormerConfig(**m.qformer.to_dict()), llm_family=m.llm_family if family else "", llm=llm,
        num_query_tokens=m.num_query_tokens, embed_dim=m.embed_dim,
        qformer_vocab_size=vocab.get("qformer_vocab_size", m.qformer_vocab_size),
        qformer_max_positions=m.qformer_max_positions, **run)


def blip_model_config(cfg, stage: Stage, vocab: dict | None = None) -> BlipConfig:
    """BLIP: the stage's architecture; from `model.init_from`, the checkpoint's sizes at the run's
    resolution (`model.vision.image_size`: positions are resized on load)."""
    m = cfg.model
    architecture = stage.architecture
    run = dict(dtype=defaults.dtypes(m)["dtype"], param_dtype="float32", scan_layers=m.scan_layers, remat_policy=m.remat_policy)
    if m.init_from:
        base = checkpoint.read_config(m.init_from)
        if not isinstance(base, BlipConfig):
            raise ValueError(f"{m.init_from} is not a BLIP model directory")
        vision = dataclasses.replace(base.vision, image_size=m.vision.image_size)
        text = base.text
        if vocab and vocab.get("qformer_enc_token_id") is not None:  # trained here: [ENC] as LAVIS
            text = dataclasses.replace(text, enc_token_id=vocab["qformer_enc_token_id"])
        # NLVR2 from a pre-trained BLIP: its cross-attention split in two (`transfer.twin_source`)
        text = dataclasses.replace(text, twin_cross_attention=architecture == "nlvr",
                                   merge_from_layer=m.text.get("merge_from_layer", text.merge_from_layer))
        return base.replace(architecture=architecture, vision=vision, text=text, **run)
    vocab = vocab or {}
    ids = {"vocab_size": vocab.get("qformer_vocab_size"), "bos_token_id": vocab.get("qformer_bos_token_id"),
           "pad_token_id": vocab.get("qformer_pad_token_id"), "sep_token_id": vocab.get("qformer_sep_token_id"),
           "enc_token_id": vocab.get("qformer_enc_token_id")}
    text = TextConfig(**{**m.text.to_dict(), **{k: v for k, v in ids.items() if v is not None}},
                      twin_cross_attention=architecture == "nlvr")
    return BlipConfig(architecture=architecture, vision=VisionConfig(**m.vision.to_dict()), text=text,
                      embed_dim=m.embed_dim, **run)


def model_of(config):
    """(module, init args, init kwargs) of a model config."""
    if isinstance(config, BlipConfig):
        size = config.vision.image_size
        ids = jnp.zeros((1, 4), jnp.int32)
        return Blip(config), (jnp.zeros((1, size, size, 3), jnp.float32), ids, jnp.ones_like(ids)), {}
    args, kwargs = _init_inputs(config)
    return Blip2(config), args, kwargs


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat):
    return traverse_util.unflatten_dict(flat, sep="/")


@dataclasses.dataclass
class ModelState:
    """Everything the train step needs besides the batch."""

    model: Blip2 | Blip
    config: Blip2Config | BlipConfig
    train: dict  # {"step", "params" (trainable), "opt_state", "extra", "rng", "bad_step"}
    frozen: dict  # frozen parameters
    param_shardings: dict  # all parameters (merged tree)
    mesh: Mesh


def init_params(config: Blip2Config, mesh: Mesh, rules, rng, init_from: str = ""):
    """(params placed in their shardings, their shardings, paths initialised at random). With
    `init_from`, stored parameters are restored into their shardings and only the others initialised:
    init runs under jit with only those outputs, so the rest is never materialised."""
    model, args, kwargs = model_of(config)
    stored_form = functools.partial(tying.stored_form, config)  # BLIP pre-training: the tied decoder once
    boxed = stored_form(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))["params"])
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = nn.unbox(boxed)
    flat_sh, flat_abs = _flat(shardings), _flat(abstract)
    restored = {}
    if init_from and isinstance(config, BlipConfig):  # maybe another architecture or resolution
        restored = _transferred(init_from, config, abstract, flat_sh)
    elif init_from:
        stored = checkpoint.stored_shapes(init_from)
        unknown = [p for p in stored if p not in flat_abs]
        if unknown:
            raise ValueError(f"{init_from} holds parameters this model does not have: {unknown[:5]}")
        # another resolution (`model.resolution`): the ViT's positions are read as stored, then resized
        resized = [p for p in stored if tuple(stored[p]) != tuple(flat_abs[p].shape)]
        if [p for p in resized if p != transfer.POSITIONS]:
            p = next(p for p in resized if p != transfer.POSITIONS)
            raise ValueError(f"{init_from}: {p} is {tuple(stored[p])}, this model's {tuple(flat_abs[p].shape)}")
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        target = {p: jax.ShapeDtypeStruct(tuple(stored[p]) if p in resized else flat_abs[p].shape, flat_abs[p].dtype,
                                          sharding=replicated if p in resized else flat_sh[p]) for p in stored}
        restored = _flat(checkpoint.restore_params(init_from, _unflat(target)))
        for p in resized:
            grid = int(round((flat_abs[p].shape[1] - 1) ** 0.5))
            value = transfer.resize_positions(jax.device_get(restored[p]), grid).astype(flat_abs[p].dtype)
            restored[p] = jax.device_put(value, flat_sh[p])
    missing = sorted(p for p in flat_abs if p not in restored)
    if missing and init_from:
        logging.info("initialised at random (not in %s): %s", init_from, missing)
    if missing:
        def init_missing(key):
            params = _flat(stored_form(nn.unbox(model.init(key, *args, **kwargs)["params"])))
            return {p: params[p] for p in missing}

        out_sh = {p: flat_sh[p] for p in missing}
        with mesh:
            restored.update(jax.jit(init_missing, out_shardings=out_sh)(rng))
    return _unflat(restored), shardings, missing


def _transferred(init_from: str, config: BlipConfig, abstract: dict, flat_sh: dict) -> dict:
    """A BLIP checkpoint's parameters moved to `config`'s architecture and resolution
    (`blip_jax.models.transfer`), placed in their shardings; BLIP is small enough to read whole."""
    _, source = checkpoint.load(init_from, scan_layers=config.scan_layers)
    flat, unused = transfer.transfer(source, abstract)
    if unused:
        logging.info("%s: not used by the %s model: %s", init_from, config.architecture, unused)
    return {p: jax.make_array_from_callback(v.shape, flat_sh[p], lambda index, v=v: v[index]) for p, v in flat.items()}


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract(cfg, mesh: Mesh, optimizer: optax.GradientTransformation, vocab: dict | None = None) -> ModelState:
    """The train state as ShapeDtypeStructs in their shardings, nothing allocated: what `create`
    fills, what a checkpoint restores into and what the dry run compiles against (one builder, so
    they cannot drift apart)."""
    config = model_config(cfg, vocab)
    stage = stage_of(cfg)
    rules = sharding.rules_from_config(cfg.rules)
    model, args, kwargs = model_of(config)
    with nn.logical_axis_rules(rules):
        boxed = tying.stored_form(config, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args,
                                                                            **kwargs))["params"])
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    params = _abstract(nn.unbox(boxed), shardings)
    adapter = _abstract_adapter(cfg, boxed, mesh)
    params = _unflat({**_flat(params), **_flat(adapter)})
    trainable, frozen = partition.split(params, trainable_patterns(cfg))
    trainable = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, _master(s.dtype), sharding=s.sharding), trainable)
    opt_shapes = jax.eval_shape(optimizer.init, trainable)
    opt_state = _abstract(opt_shapes, opt_state_shardings(opt_shapes, jax.tree.map(lambda x: x.sharding, trainable),
                                                          mesh))
    replicated = sharding.replicated(mesh)
    key = jax.eval_shape(jax.random.PRNGKey, 0)
    extra = {}
    if stage.init_extra:  # e.g. BLIP's momentum encoders (sharded like their twins) and queues
        shapes = jax.eval_shape(lambda p, r: stage.init_extra(p, cfg=cfg.loss, rng=r, batch_size=cfg.batch_size),
                                params, key)
        extra = {k: (jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding), v,
                                  {n: params[n] for n in v}) if k == "momentum"
                     else _abstract(v, jax.tree.map(lambda _: replicated, v))) for k, v in shapes.items()}
    scalar = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated)  # noqa: E731
    train = {"params": trainable, "opt_state": opt_state, "extra": extra,
             "step": scalar(jax.ShapeDtypeStruct((), jnp.int32)), "rng": scalar(key),
             "bad_step": scalar(jax.ShapeDtypeStruct((), jnp.int32))}
    return ModelState(model, config, train, frozen, shardings, mesh)


def _master(dtype):
    """What a trainable parameter is kept in: fp32 master weights for every float (a tower stored
    in bf16, e.g. the ViT, trains in fp32 and is cast to the compute dtype at use)."""
    return jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype


def trainable_patterns(cfg) -> list[str]:
    """The config's `trainable` regexes, and an adapter's A and B when the run has one."""
    return list(cfg.trainable) + (list(lora.TRAINABLE) if cfg.get("lora") and cfg.lora.targets else [])


def _lora_plan(cfg, boxed) -> tuple[lora.LoraConfig, dict]:
    """(the run's LoRA settings, the adapted kernels: path -> (layer axes, input axes))."""
    config = lora.LoraConfig.from_config(cfg.get("lora"))
    if not config.targets:
        return config, {}
    config.validate()
    names = {p: tuple(v.names) for p, v in traverse_util.flatten_dict(boxed, sep="/").items() if p.endswith("/kernel")}
    return config, lora.targets(names, config)


def _abstract_adapter(cfg, boxed, mesh: Mesh) -> dict:
    """The adapter's leaves as ShapeDtypeStructs, replicated (they are small), or {}."""
    config, chosen = _lora_plan(cfg, boxed)
    if not chosen:
        return {}
    shapes = {p: v.shape for p, v in _flat(nn.unbox(boxed)).items()}
    leaves = jax.eval_shape(lambda k: lora.init(k, shapes, chosen, config), jax.random.PRNGKey(0))
    return _abstract(leaves, jax.tree.map(lambda _: sharding.replicated(mesh), leaves))


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def create(cfg, mesh: Mesh, optimizer: optax.GradientTransformation, vocab: dict | None = None) -> ModelState:
    """The train state `abstract` describes, made: parameters restored or initialised in place,
    optimizer state and the stage's extra state initialised under jit into their shardings."""
    st = abstract(cfg, mesh, optimizer, vocab)
    stage = stage_of(cfg)
    rules = sharding.rules_from_config(cfg.rules)
    rng = jax.random.PRNGKey(cfg.seed)
    init_rng, train_rng = jax.random.split(rng)
    with nn.logical_axis_rules(rules):
        params, _, _ = init_params(st.config, mesh, rules, init_rng, cfg.model.init_from)
    adapter_shapes = {p: v for p, v in _flat(partition.merge(st.train["params"], st.frozen)).items()
                      if lora.is_adapter_path(p)}
    if adapter_shapes:  # fresh adapters (B = 0: the run starts from the base model exactly)
        model, args, kwargs = model_of(st.config)
        with nn.logical_axis_rules(rules):
            boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
        config, chosen = _lora_plan(cfg, boxed)
        shapes = {p: v.shape for p, v in _flat(params).items()}
        out = {p: v.sharding for p, v in adapter_shapes.items()}
        with mesh:
            fresh = jax.jit(lambda k: lora.init(k, shapes, chosen, config), out_shardings=out)(
                jax.random.fold_in(init_rng, 1))
        params = _unflat({**_flat(params), **fresh})
    trainable, frozen = partition.split(params, trainable_patterns(cfg))
    trainable = jax.tree.map(lambda x: x.astype(_master(x.dtype)), trainable)  # e.g. a bf16 ViT fine-tuned
    with mesh:
        opt_state = jax.jit(optimizer.init, out_shardings=shardings_of(st.train["opt_state"]))(trainable)
    extra = {}
    saved = Path(cfg.model.init_from) / checkpoint.TRAIN_EXTRA if cfg.model.init_from else None
    if stage.init_extra and saved is not None and saved.is_dir():  # e.g. a LAVIS pre-training run's
        extra = _saved_extra(saved, st.train["extra"])
    elif stage.init_extra:
        init_extra = lambda p, r: stage.init_extra(p, cfg=cfg.loss, rng=r, batch_size=cfg.batch_size)  # noqa: E731
        with mesh:
            extra = jax.jit(init_extra, out_shardings=shardings_of(st.train["extra"]))(params, rng)
    replicated = sharding.replicated(mesh)
    scalars = {"step": jnp.zeros((), jnp.int32), "rng": train_rng, "bad_step": jnp.full((), -1, jnp.int32)}
    train = {"params": trainable, "opt_state": opt_state, "extra": extra, **jax.device_put(scalars, replicated)}
    # committed arrays: the train step then sees the same input placements at every call (one compile)
    st.train = jax.tree.map(lambda x: jax.device_put(x, x.sharding), train)
    if cfg.model.get("int8_frozen"):  # the frozen towers' kernels in int8 (blip_jax.models.quant)
        from blip_jax.models import quant

        frozen = quant.quantize_sharded(frozen, scanned=st.config.scan_layers)
    st.frozen = frozen
    return st


def _saved_extra(path: Path, target: dict) -> dict:
    """The stage's extra state as a model directory stored it (momentum encoders, queues), checked
    against what this run builds (its queue size, its encoders' shapes)."""
    stored = checkpoint.stored_shapes(path)
    wanted = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(target, sep="/").items()}
    if stored != wanted:
        differ = sorted(p for p in set(stored) | set(wanted) if stored.get(p) != wanted.get(p))
        raise ValueError(f"{path} does not fit this run (e.g. {differ[0]}: stored {stored.get(differ[0])}, the run "
                         f"builds {wanted.get(differ[0])}); match loss.queue_size and the model's sizes to it")
    logging.info("momentum encoders and queues continued from %s", path)
    return checkpoint.restore_params(path, target)


def opt_state_shardings(opt_state, param_shardings, mesh: Mesh):
    """Each optimizer-state leaf that mirrors a parameter (Adam's moments) takes that parameter's
    sharding; the rest (step counts) is replicated."""
    by_path = _flat(param_shardings)
    replicated = sharding.replicated(mesh)

    def pick(path, _):
        keys = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        return by_path.get(keys, replicated)

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def frozen_dir(workdir: str | Path) -> Path:
    return paths.path(workdir) / "frozen"
