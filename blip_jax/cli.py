"""`blip-jax` command line: train, eval, eval-suite, capfilt, embed, search, convert, export, caption, generate, itm, vqa, demo, data, score.

train, eval, eval-suite, capfilt, embed and search have parsers of their own (blip_jax.train.main,
eval.main, eval.suite, capfilt, embed, search).

Results go to stdout as JSON (or to `--output FILE`, written atomically), progress to stderr.
Images that cannot be read are skipped, listed and counted; the good ones are still processed.
Compiled programs are kept in JAX's persistent cache (`BLIP_JAX_CACHE_DIR`, default
~/.cache/blip_jax/jax; "off" disables it), so a repeated command skips most compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

GENERATION_FLAGS = {  # flag -> (type, help); None values are left to the task defaults
    "num_beams": (int, "beam width"),
    "max_new_tokens": (int, "longest output, in tokens"),
    "min_new_tokens": (int, "shortest output, in tokens"),
    "length_penalty": (float, "beam score / length ** penalty"),
    "repetition_penalty": (float, "penalty on tokens already present (1.0 = off)"),
    "top_k": (int, "sampling: keep the k most likely tokens (0 = off)"),
    "top_p": (float, "sampling: nucleus probability mass"),
    "temperature": (float, "sampling temperature"),
    "seed": (int, "sampling seed"),
    "num_return_sequences": (int, "outputs per input"),
}


CACHE_ENV = "BLIP_JAX_CACHE_DIR"
CACHE_OFF = ("", "0", "off", "none")


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache for this process (the directory, or None when off)."""
    where = os.environ.get(CACHE_ENV, str(Path.home() / ".cache" / "blip_jax" / "jax"))
    if where.strip().lower() in CACHE_OFF:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", where)
    # cache every program: a tiny model's compiles are short and small, and still most of a call's time
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where


def _say(message: str) -> None:
    print(f"blip-jax: {message}", file=sys.stderr, flush=True)


def _add_generation_flags(p: argparse.ArgumentParser):
    for name, (kind, text) in GENERATION_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    p.add_argument("--sample", action="store_true", help="nucleus / top-k sampling instead of beam search")


def _generation_options(args) -> dict:
    options = {k: getattr(args, k) for k in GENERATION_FLAGS if getattr(args, k) is not None}
    if args.sample:
        options["do_sample"] = True
        options.setdefault("num_beams", 1)
    return options


def _read_images(paths: list[str]):
    """(good paths, their RGB arrays, skipped [{path, error}])."""
    from blip_jax.images import load_image

    good, arrays, skipped = [], [], []
    for path in paths:
        try:
            arrays.append(load_image(path))
            good.append(path)
        except (OSError, ValueError) as e:
            skipped.append({"path": path, "error": str(e)})
            print(f"skipping {path}: {e}", file=sys.stderr)
    return good, arrays, skipped


def _emit(args, data) -> None:
    if getattr(args, "output", None):
        from blip_jax.atomic import write_json

        write_json(args.output, data)
    print(json.dumps(data, indent=2))


def cmd_convert(args) -> int:
    from blip_jax.convert import convert, convert_lavis
    from blip_jax.convert.reader import free_large_blocks_at_once

    free_large_blocks_at_once()
    if not args.lavis and (Path(args.src) / "params").is_dir():  # a blip-jax stage-1 model onto a new LLM
        from blip_jax.convert.compose import compose

        if not args.llm:
            raise ValueError(f"{args.src} is a blip-jax model already; give --llm DIR to put its Q-Former in front of "
                             "that language model (stage 2 onto a new LLM)")
        _emit(args, compose(args.src, args.llm, args.dst, instruct=args.instruct, overwrite=args.overwrite))
        return 0
    if args.lavis:
        from blip_jax.convert.lavis import parse_heads

        if not args.tokenizer:
            raise ValueError("--lavis needs --tokenizer DIR: the BERT (bert-base-uncased) tokenizer directory "
                             "the checkpoint was trained with")
        if args.verify:
            raise ValueError("--verify compares with a transformers model; a LAVIS checkpoint has none")
        report = convert_lavis(args.src, args.dst, args.lavis, tokenizer=args.tokenizer,
                               heads=parse_heads(args.heads), vision=args.vision, llm=args.llm,
                               scan_layers=args.scan_layers,
                               param_dtype=args.param_dtype, overwrite=args.overwrite)
        _emit(args, report)
        return 0
    report = convert(args.src, args.dst, scan_layers=args.scan_layers, param_dtype=args.param_dtype,
                     frozen_dtype=args.frozen_dtype, overwrite=args.overwrite)
    if args.verify:
        from blip_jax.convert.verify import compare

        report["verify_max_abs_diff"] = compare(args.src, args.dst)
    _emit(args, report)
    return 0


def cmd_export(args) -> int:
    import tempfile

    from blip_jax.convert.export import export_lavis, export_transformers
    from blip_jax.models import lora

    if args.merge_lora:  # base + adapter folded into a plain model directory first
        adapter = lora.find_adapter(args.merge_lora)
        if args.to == "blip-jax":
            out = lora.write_merged(args.src, adapter, args.out, overwrite=args.overwrite)
            _emit(args, {"out": str(out), "base": str(args.src), "adapter": str(adapter)})
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            args.src = str(lora.write_merged(args.src, adapter, Path(tmp) / "merged"))
            args.merge_lora = None
            return cmd_export(args)
    if args.to == "blip-jax":
        raise ValueError("--to blip-jax writes a model with an adapter folded in: give --merge-lora ADAPTER")
    if args.programs and args.to != "stablehlo":
        raise ValueError("--programs applies to --to stablehlo")
    if args.to == "stablehlo":
        from blip_jax.convert.stablehlo import export_stablehlo

        programs = [p for p in (args.programs or "").split(",") if p] or None
        _emit(args, export_stablehlo(args.src, args.out, programs=programs, overwrite=args.overwrite))
    elif args.to == "lavis":
        _emit(args, export_lavis(args.src, args.out, trimmed=args.trimmed, overwrite=args.overwrite))
    elif args.trimmed:
        raise ValueError("--trimmed applies to --to lavis")
    else:
        _emit(args, export_transformers(args.src, args.out, overwrite=args.overwrite))
    return 0


def _run_on_images(args, task) -> int:
    """Load the model, check it serves the command (one clear error, exit 2, before any image is
    read), then run `task(model, paths, images)` on the readable images."""
    import blip_jax

    _say(f"loading {args.ckpt}...")
    model = blip_jax.load(args.ckpt, batch_size=args.batch_size, progress=True)
    model.require(args.command)
    paths, images, skipped = _read_images(args.images)
    if images:
        _say(f"compiling and running {args.command} on {len(images)} images...")
    results = task(model, paths, images) if images else []
    _emit(args, {"results": results, "skipped": skipped, "counts": {"ok": len(paths), "skipped": len(skipped)}})
    return 0 if images else 1


def cmd_caption(args) -> int:
    def task(model, paths, images):
        captions = model.caption(images, prompt=args.prompt, **_generation_options(args))
        per = len(captions) // len(paths)
        return [{"image": p, "caption": captions[i * per] if per == 1 else captions[i * per:(i + 1) * per]}
                for i, p in enumerate(paths)]

    return _run_on_images(args, task)


def cmd_generate(args) -> int:
    def task(model, paths, images):
        texts = model.generate(images, args.prompt, **_generation_options(args))
        per = len(texts) // len(paths)
        return [{"image": p, "prompt": args.prompt, "text": texts[i * per: (i + 1) * per] if per > 1 else texts[i]}
                for i, p in enumerate(paths)]

    return _run_on_images(args, task)


def cmd_itm(args) -> int:
    def task(model, paths, images):
        itc = model.itc(images, args.text)
        out = []
        for i, path in enumerate(paths):
            probs = model.itm([images[i]], args.text)
            out += [{"image": path, "text": t, "itm_probability": float(probs[j]), "itc_similarity": float(itc[i, j])}
                    for j, t in enumerate(args.text)]
        return out

    return _run_on_images(args, task)


def cmd_vqa(args) -> int:
    def task(model, paths, images):
        out = []
        for question in args.question:
            answers = model.vqa(images, [question], **_generation_options(args))
            out += [{"image": p, "question": question, "answer": a} for p, a in zip(paths, answers)]
        return out

    return _run_on_images(args, task)


def cmd_demo(args) -> int:
    from blip_jax.demo import run_demo

    _emit(args, run_demo(args.workdir))
    return 0


SOURCE_FLAGS = {  # flag -> help; each is a field of blip_jax.data.sources' source settings
    "kind": "synthetic | json | webdataset | tfds | packed",
    "path": "annotation file (json), shard directory / glob / .tar (webdataset), or packed directory",
    "image_root": "json: folder the annotations' image paths are relative to",
    "layout": "json: auto | lavis | jsonl | karpathy | coco | vqa | gqa | vg_regions",
    "split": "karpathy / tfds split (karpathy 'train' includes restval)",
    "annotations": "json, layout vqa: the answers file",
    "image_pattern": "json, layout vqa: image file name pattern",
    "tfds_name": "tfds: dataset name (prepared beforehand under --data-dir)",
    "data_dir": "tfds: data directory",
    "task": "the records' task family (caption, vqa, ...)",
    "num_records": "synthetic: number of records",
}


def _source_spec(args) -> dict:
    spec = {k: getattr(args, k) for k in SOURCE_FLAGS if getattr(args, k) is not None}
    if args.keep_caption_lists:
        spec["expand_captions"] = False
    return spec


def cmd_data_check(args) -> int:
    from blip_jax.data.check import check

    _emit(args, check(_source_spec(args), image_size=args.image_size, augment=args.augment, limit=args.limit,
                      worker_count=args.workers))
    return 0


def cmd_data_pack(args) -> int:
    from blip_jax.data.packed import pack
    from blip_jax.data.sources import build_source

    _emit(args, pack(build_source(_source_spec(args)), args.out, records_per_shard=args.records_per_shard,
                     verify=not args.no_verify, overwrite=args.overwrite))
    return 0


def cmd_score(args) -> int:
    from blip_jax.eval.score import score

    _emit(args, score(args.kind, args.predictions, args.annotations, split=args.split, metric=args.metric,
                      variant=args.variant))
    return 0


def _add_score_command(sub):
    from blip_jax.eval.score import KINDS

    p = sub.add_parser("score", help="score predictions made elsewhere with the evaluation jobs' metrics")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--predictions", required=True, help="predictions file (see blip_jax.eval.score)")
    p.add_argument("--annotations", required=True, help="ground-truth annotation file")
    p.add_argument("--split", default="test", help="split of a Karpathy-layout annotation file")
    p.add_argument("--metric", default="vqa", choices=["vqa", "exact_match"], help="vqa: VQA accuracy or GQA's")
    p.add_argument("--variant", default="official", choices=["official", "lavis"],
                   help="vqa: the current vqaEval.py rule, or the older one LAVIS reports its numbers with")
    p.add_argument("--output", help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_score)


def _add_data_commands(sub):
    data = sub.add_parser("data", help="inspect and pack training data").add_subparsers(dest="data_command",
                                                                                         required=True)
    check = data.add_parser("check", help="run a source through the full input pipeline and count bad records")
    pack = data.add_parser("pack", help="convert a source to ArrayRecord shards for fast random access")
    for p in (check, pack):
        for name, text in SOURCE_FLAGS.items():
            p.add_argument("--" + name.replace("_", "-"), type=int if name == "num_records" else str, help=text)
        p.add_argument("--keep-caption-lists", action="store_true",
                       help="one record per image with all its captions (default: one per caption, except tfds)")
        p.add_argument("--output", help="also write the summary to this JSON file")
    check.add_argument("--image-size", type=int, default=224)
    check.add_argument("--augment", default="eval", help="blip2_train | blip_train | eval")
    check.add_argument("--limit", type=int, default=0, help="check only the first N records")
    check.add_argument("--workers", type=int, default=0, help="grain worker processes")
    check.set_defaults(func=cmd_data_check)
    pack.add_argument("out", help="directory to create")
    pack.add_argument("--records-per-shard", type=int, default=10_000)
    pack.add_argument("--no-verify", action="store_true", help="do not decode images while packing")
    pack.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    pack.set_defaults(func=cmd_data_pack)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip-jax", description=__doc__.split("\n")[0],
                                     epilog="Errors are one line (exit status 2); add --debug to any command for "
                                            "the traceback.")
    sub = parser.add_subparsers(dest="command", required=True)

    # commands with parsers of their own (dispatched before this one): listed here for --help
    for name, text in (("train", "train a stage from a config (blip_jax.train.main; --help for its flags)"),
                       ("eval", "run an evaluation job from a config (blip_jax.eval.main)"),
                       ("eval-suite", "run a suite of evaluation jobs in turn, one table (blip_jax.eval.suite)"),
                       ("capfilt", "caption and filter web data, BLIP's bootstrapping (blip_jax.capfilt)"),
                       ("embed", "write the ITC features of an image or text set as a search index"),
                       ("search", "exact top-k over an index, optionally ITM re-ranked")):
        sub.add_parser(name, help=text, add_help=False)
    p = sub.add_parser("convert", help="convert a transformers BLIP / BLIP-2 / InstructBLIP model directory, "
                       "a LAVIS BLIP .pth (--lavis), or a blip-jax stage-1 model onto a new LLM (--llm)")
    p.add_argument("src", help="transformers model directory (config.json + safetensors or pytorch_model.bin), "
                   "or a LAVIS .pth with --lavis")
    p.add_argument("dst", help="blip-jax model directory to create")
    p.add_argument("--scan-layers", action="store_true", help="store layer stacks stacked, for nn.scan")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--frozen-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="BLIP-2 / InstructBLIP: store the frozen ViT and LLM in this dtype (default: --param-dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--verify", action="store_true",
                   help="run the transformers model beside the converted one and print max abs differences")
    p.add_argument("--output", help="also write the report to this JSON file")
    p.add_argument("--lavis", metavar="MODEL_TYPE", help="SRC is a LAVIS .pth of this arch/type, e.g. "
                   "blip_caption/base_coco (blip_caption, blip_retrieval, blip_vqa, blip_pretrain, "
                   "blip_feature_extractor, blip_nlvr; BLIP-2: blip2, blip2_feature_extractor, blip2_opt)")
    p.add_argument("--tokenizer", help="--lavis: the BERT tokenizer directory (vocab.txt); [DEC] / [ENC] are added")
    p.add_argument("--vision", help="--lavis: the ViT's own .pth for a checkpoint without it (trimmed BLIP-2 files; "
                   "EVA ViT-g: eva_vit_g.pth)")
    p.add_argument("--llm", help="--lavis, BLIP-2 with an LLM: the LLM's transformers directory (config, tokenizer; "
                   "its weights for a trimmed checkpoint); with a blip-jax stage-1 model as SRC: the language model "
                   "(OPT, Flan-T5, LLaMA, Vicuna, Mistral, Qwen2) to put its Q-Former in front of, for stage 2")
    p.add_argument("--instruct", action="store_true",
                   help="with a stage-1 SRC and --llm: an InstructBLIP model (the Q-Former also reads the instruction)")
    p.add_argument("--heads", help="--lavis: head counts the tensors cannot show, e.g. vision=16,text=12 "
                   "(default: 64-wide heads, as every released BLIP)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a blip-jax model as a transformers model directory or a LAVIS .pth")
    p.add_argument("src", help="blip-jax model directory (or a training workdir: its model/)")
    p.add_argument("out", help="transformers model directory, or LAVIS .pth file, to create")
    p.add_argument("--to", choices=["transformers", "lavis", "blip-jax", "stablehlo"], required=True,
                   help="the target library: transformers (BLIP, BLIP-2, InstructBLIP), lavis (BLIP caption, "
                        "retrieval, VQA, NLVR; BLIP-2 stage 1, OPT, Flan-T5; InstructBLIP Vicuna, Flan-T5), blip-jax "
                        "(with --merge-lora: SRC with the adapter folded in), or stablehlo (jax.export programs "
                        "that run with JAX alone)")
    p.add_argument("--programs", help="--to stablehlo: comma-separated programs (default: every one the model has: "
                   "encode_image, image_features, text_features, itm, caption_greedy, caption_beam, nlvr)")
    p.add_argument("--merge-lora", metavar="ADAPTER",
                   help="fold this LoRA adapter (a run's W/adapter, or W) into SRC, the base it was trained on, first")
    p.add_argument("--trimmed", action="store_true",
                   help="--to lavis, BLIP-2 / InstructBLIP: leave out the frozen ViT and LLM, as LAVIS's runner saves")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--output", help="also write the report to this JSON file")
    p.set_defaults(func=cmd_export)

    def model_command(name, help_text, func):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--ckpt", required=True, help="blip-jax model directory")
        p.add_argument("images", nargs="+", help="image files")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--output", help="also write the results to this JSON file")
        p.set_defaults(func=func)
        return p

    p = model_command("caption", "caption images", cmd_caption)
    p.add_argument("--prompt", default=None, help='text the caption starts with, e.g. "a picture of"')
    _add_generation_flags(p)
    p = model_command("generate", "BLIP-2 / InstructBLIP: text for each image from a prompt or instruction "
                      "(transformers' generate defaults: the checkpoint's generation_config.json)", cmd_generate)
    p.add_argument("--prompt", default="", help="the prompt (BLIP-2) or instruction (InstructBLIP)")
    _add_generation_flags(p)
    p = model_command("itm", "image-text matching probability and ITC similarity", cmd_itm)
    p.add_argument("--text", action="append", required=True, help="a text to match (repeatable)")
    p = model_command("vqa", "answer questions about images", cmd_vqa)
    p.add_argument("--question", action="append", required=True, help="a question (repeatable)")
    _add_generation_flags(p)

    p = sub.add_parser("demo", help="build a tiny random BLIP, convert it, caption and match images")
    p.add_argument("--workdir", default="blip_jax_demo", help="where the demo writes its files")
    p.add_argument("--output", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_demo)
    _add_data_commands(sub)
    _add_score_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from blip_jax import errors

    if argv is None:  # the `blip-jax` command itself: a process of its own, so the cache is its to turn on
        argv = sys.argv[1:]
        enable_compilation_cache()
    argv = list(argv)  # (called from Python, e.g. tests, JAX's global config is left as it is)
    command = next((a for a in argv if not a.startswith("-")), "")
    return errors.run(command, _dispatch, argv)


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["train"]:  # absl flags with ml_collections configs (see blip_jax.train.main)
        from blip_jax.train.main import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["eval"]:  # the same, for evaluation jobs (see blip_jax.eval.main)
        from blip_jax.eval.main import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["eval-suite"]:  # evaluation jobs in turn, one table (see blip_jax.eval.suite)
        from blip_jax.eval.suite import main as suite_main

        return suite_main(argv[1:])
    if argv[:1] == ["embed"]:  # ITC features of an image or text set (see blip_jax.embed)
        from blip_jax.embed import main as embed_main

        return embed_main(argv[1:])
    if argv[:1] == ["search"]:  # top-k over such an index (see blip_jax.search)
        from blip_jax.search import main as search_main

        return search_main(argv[1:])
    if argv[:1] == ["capfilt"]:  # the same, for CapFilt dataset bootstrapping (see blip_jax.capfilt)
        from blip_jax.capfilt import main as capfilt_main

        return capfilt_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
