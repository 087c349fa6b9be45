"""`blip-jax export M OUT --to stablehlo`: the model's programs as `jax.export` artifacts that run
with JAX alone (no blip_jax import), for serving without the training code.

OUT holds one serialized program per task (`<name>.jaxexport`), the weights they take as their
first argument (`params.npz`: a flat {"a/b/kernel": array} dict, the argument as it is passed), the
tokenizer and image-processor files (inputs are token ids and preprocessed pixels), and
`programs.json`: each program's inputs and outputs, with "b" (and "t", the text length) where the
shape is symbolic. A reader needs only:

    exported = jax.export.deserialize(open("OUT/itm.jaxexport", "rb").read())
    params = dict(np.load("OUT/params.npz"))
    logits = exported.call(params, pixels, ids, mask)

Programs, by what the model serves (`model.tasks`):
  encode_image     pixels [b, H, W, 3] -> image tokens [b, T, D]                      every model
  image_features   pixels -> unit-norm ITC features [b, E] (BLIP-2: [b, Q, E])         itc
  text_features    ids, mask [b, t] -> unit-norm ITC features [b, E]                   itc
  itm              pixels, ids, mask -> match logits [b, 2]                           itm
  caption_greedy   pixels -> ids [b, 1 + new] ([DEC] + caption; `model.caption`'s defaults,
  caption_beam       greedy, or its beams)                                            BLIP caption
  nlvr             left, right pixels, ids, mask -> logits [b, 2]                     BLIP nlvr
  generate_greedy  pixels, prompt_ids, prompt_mask [b, 16] (as `model._llm_tokens` makes them:
  generate_beam      left-padded for decoder LLMs, right for T5; InstructBLIP also qformer_ids,
                     qformer_mask [b, t]) -> new ids [b, new]; `model.caption`'s settings  BLIP-2
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from flax import traverse_util

from blip_jax import atomic, checkpoint

MANIFEST = "programs.json"
PARAMS = "params.npz"
TEXT_LENGTH = 35  # BLIP's max_txt_len: the text length a program compiles for when "t" cannot be symbolic
PROMPT_LENGTH = 16  # LLM prompts of the generation programs, padded to this (their cache is sized by it)


def available(model) -> list[str]:
    """The programs `model` can be exported as (module docstring)."""
    tasks = set(model.tasks)
    names = ["encode_image"]
    if "itc" in tasks:
        names += ["image_features", "text_features"]
    if "itm" in tasks:
        names.append("itm")
    if "caption" in tasks and model.family == "BLIP":
        names += ["caption_greedy", "caption_beam"]
    if "generate" in tasks:  # BLIP-2 / InstructBLIP
        names += ["generate_greedy", "generate_beam"]
    if "nlvr" in tasks:
        names.append("nlvr")
    return names


def _programs(model) -> dict:
    """name -> (function of (flat params, *inputs), input specs as (name, shape with "b"/"t", dtype))."""
    import jax.numpy as jnp

    from blip_jax import generation
    from blip_jax.prompts import BLIP2_CAPTION, BLIP_CAPTION

    blip2 = model.family == "BLIP-2"
    if blip2:
        from blip_jax import blip2_api as impl
    else:
        from blip_jax import api as impl
    config = model.config
    size = model.image_processor.size
    pixels = ("pixels", ("b", size["height"], size["width"], 3), "float32")
    ids, mask = ("input_ids", ("b", "t"), "int32"), ("attention_mask", ("b", "t"), "int32")

    def tree(flat):
        return traverse_util.unflatten_dict(flat, sep="/")

    def encode(params, px):
        return impl.encode_image(config, tree(params), px)

    def caption(num_beams):  # BLIP's caption defaults (model.caption's), greedy or beam
        options = generation.GenerationConfig.from_kwargs(
            **{**BLIP_CAPTION, "num_beams": num_beams}, eos_token_id=config.text.sep_token_id,
            pad_token_id=config.text.pad_token_id)

        def run(params, px):
            states = encode(params, px)
            prompt = jnp.full((px.shape[0], 1), config.text.bos_token_id, jnp.int32)
            return impl.generate_sequences(config, tree(params), states, None, prompt, options)
        return run

    out = {
        "encode_image": (encode, [pixels]),
        "image_features": (lambda p, px: impl._image_features(config, tree(p), encode(p, px)), [pixels]),
        "text_features": (lambda p, i, m: impl._text_features(config, tree(p), i, m), [ids, mask]),
        "itm": (lambda p, px, i, m: impl._itm_logits(config, tree(p), encode(p, px), i, m), [pixels, ids, mask]),
    }
    if not blip2:
        out.update(caption_greedy=(caption(1), [pixels]), caption_beam=(caption(BLIP_CAPTION["num_beams"]), [pixels]))
        left, right = ("left_pixels", pixels[1], "float32"), ("right_pixels", pixels[1], "float32")
        out["nlvr"] = (lambda p, a, b, i, m: impl._nlvr_logits(config, tree(p), encode(p, a), encode(p, b), i, m),
                       [left, right, ids, mask])
    if blip2 and config.architecture == "generation":  # the soft prompt, then the LLM's decode loop
        prompt = [("prompt_ids", ("b", PROMPT_LENGTH), "int32"), ("prompt_mask", ("b", PROMPT_LENGTH), "int32")]
        instruction = [("qformer_ids", ("b", "t"), "int32"), ("qformer_mask", ("b", "t"), "int32")]

        def generate(num_beams):
            options = model._generation_config(BLIP2_CAPTION, {"num_beams": num_beams})

            def run(params, px, ids, mask, q_ids=None, q_mask=None):
                p = tree(params)
                prefix = impl.language_prefix(config, p, encode(params, px), q_ids, q_mask)
                return impl.new_token_array(config, p, prefix, ids, mask, options)
            return run

        specs = [pixels, *prompt, *(instruction if config.instruct else [])]
        out.update(generate_greedy=(generate(1), specs), generate_beam=(generate(BLIP2_CAPTION["num_beams"]), specs))
    return out


def _export(fn, specs, params, symbols: tuple[str, ...]):
    """`fn` exported for `specs`, the named dims in `symbols` symbolic, the others concrete (b = 2,
    t = TEXT_LENGTH)."""
    import jax
    from jax import export

    dims = dict(zip(symbols, export.symbolic_shape(", ".join(symbols)))) if symbols else {}
    shapes = [jax.ShapeDtypeStruct(tuple(_dim(d, dims) for d in shape), dtype) for _, shape, dtype in specs]
    param_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
    return export.export(jax.jit(fn))(param_specs, *shapes)


def _dim(d, dims: dict):
    if not isinstance(d, str):
        return d
    return dims.get(d, 2 if d == "b" else TEXT_LENGTH)


def export_stablehlo(src, out, *, programs: list[str] | None = None, overwrite: bool = False) -> dict:
    """Write the programs of the model at `src` into `out` (module docstring); returns a report."""
    import blip_jax

    src, out = checkpoint.model_dir(src), Path(out)
    model = blip_jax.load(src)
    can = available(model)
    wanted = programs or can
    missing = [p for p in wanted if p not in can]
    if missing:
        raise ValueError(f"{src} is a {model.family} {model.architecture} model: it has no {', '.join(missing)} "
                         f"program; it exports {', '.join(can)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    params = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(model.params, sep="/").items()}
    table = _programs(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {"family": model.family, "architecture": model.architecture, "params": PARAMS, "programs": {}}
    for name in wanted:
        fn, specs = table[name]
        reasons = []
        for symbols in (("b", "t"), ("b",), ()):  # as symbolic as JAX allows this program
            try:
                exported = _export(fn, specs, params, symbols)
                break
            except Exception as e:  # noqa: BLE001 - shapes JAX cannot keep symbolic: fewer symbols
                reasons.append(str(e).splitlines()[0][:300])
        symbolic = [d for d in symbols if any(d in shape for _, shape, _ in specs)]
        (tmp / f"{name}.jaxexport").write_bytes(exported.serialize())
        entry = {"file": f"{name}.jaxexport", "symbolic": symbolic,
                 "inputs": [{"name": n, "shape": [d if d in symbolic else _dim(d, {}) for d in shape], "dtype": dt}
                            for n, shape, dt in specs],
                 "outputs": [{"shape": [d if isinstance(d, int) else str(d) for d in o.shape], "dtype": str(o.dtype)}
                             for o in exported.out_avals]}
        if reasons:
            entry["fewer_symbols_because"] = reasons
        manifest["programs"][name] = entry
    np.savez(tmp / PARAMS, **params)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "preprocessor_config.json",
                 "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    atomic.write_json(tmp / MANIFEST, manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"source": str(src), "out": str(out), "programs": {k: v["symbolic"] for k, v in manifest["programs"].items()},
            "params_bytes": (out / PARAMS).stat().st_size}
