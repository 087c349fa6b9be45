"""COCO caption metrics, equal to the reference COCO caption evaluation (pycocoevalcap 1.2, used by LAVIS).

``score_captions(predictions, references)`` tokenizes both sides like pycocoevalcap's ``PTBTokenizer``
(see ``ptb_tokenizer``: the CoreNLP jar when Java is available, else our Python tokenizer, equal on caption text) and
computes:

* BLEU-1..4: pycocoevalcap's ``BleuScorer`` with ``option="closest"``: per image, n-gram matches clipped
  by the maximum count in any one reference, the reference length closest to the hypothesis length
  (the shorter on ties); corpus BLEU from the summed counts and lengths,
  ``prod_k (correct_k + 1e-15) / (guess_k + 1e-9)`` to the power ``1/n``, times the brevity penalty
  ``exp(1 - r/c)`` when ``(c + 1e-15) / (r + 1e-9) < 1``. Per-image BLEU uses the same formula on the
  image's own counts. Words are ``str.split()`` tokens.
* ROUGE-L: per image, the longest common subsequence against each reference, the maximum precision and
  maximum recall over references (taken separately), ``F = (1 + b^2) P R / (R + b^2 P)`` with
  ``b = 1.2`` (0 when either is 0); the corpus value is the mean. Words are ``str.split(" ")`` tokens.
* CIDEr-D: n = 1..4, TF-IDF vectors with document frequencies counted over the evaluated corpus's
  reference sets, ``log(#images)`` as the log reference count, hypothesis weights clipped by the
  reference weights, a Gaussian length penalty ``exp(-d^2 / (2 * 6^2))`` where the "length" is, as in
  pycocoevalcap, the number of *bigrams*, the mean over n and over references, times 10; the corpus
  value is the mean over images.
* METEOR (Java): pycocoevalcap's ``meteor-1.5.jar -stdio -l en -norm`` protocol; the corpus value is the
  jar's aggregate (not the mean of per-image scores).
* SPICE (Java): ``spice-1.0.jar`` with the Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on
  first use. blip_jax never downloads them, so SPICE is usually reported unavailable.

Java-backed metrics that cannot run come back as ``None`` with the reason under ``"unavailable"``; they
never raise. The jars are looked up in an installed pycocoevalcap (``pip install pycocoevalcap==1.2``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from blip_jax.eval.ptb_tokenizer import pycocoevalcap_dir, tokenize_captions

__all__ = [
    "METRICS",
    "score_captions",
    "compute_bleu",
    "compute_rouge_l",
    "compute_cider",
    "compute_meteor",
    "compute_spice",
    "meteor_status",
    "spice_status",
]

METRICS = ("bleu", "meteor", "rouge_l", "cider", "spice")
BLEU_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4")
_SMALL = 1e-9  # BleuScorer's smoothing constants
_TINY = 1e-15


def _ngrams(words: Sequence[str], n: int = 4) -> Counter:
    """Counts of all 1..n-grams (as tuples), in pycocoevalcap's order (by length, then position)."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


# ----------------------------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------------------------

def _bleu_from_counts(correct, guess, testlen, reflen, n):
    scores, bleu = [], 1.0
    for k in range(n):
        bleu *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


def compute_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4):
    """(corpus [BLEU-1..n], per-image [[BLEU-1..n] per image]) on tokenized strings."""
    total_correct, total_guess = [0] * n, [0] * n
    total_test = total_ref = 0
    per_image = []
    for hyp, refs in zip(hypotheses, references):
        words = hyp.split()
        testlen = len(words)
        max_ref: dict = {}
        ref_lens = []
        for ref in refs:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, count in _ngrams(ref_words, n).items():
                if count > max_ref.get(gram, 0):
                    max_ref[gram] = count
        reflen = min(ref_lens, key=lambda length: (abs(length - testlen), length))  # "closest"
        guess = [max(0, testlen - k) for k in range(n)]
        correct = [0] * n
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
        per_image.append(_bleu_from_counts(correct, guess, testlen, reflen, n))
        total_test += testlen
        total_ref += reflen
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
    corpus = _bleu_from_counts(total_correct, total_guess, total_test, total_ref, n)
    return corpus, per_image


# ----------------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------------

def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = prev_diag + 1 if x == y else max(above, row[j - 1])
            prev_diag = above
    return row[-1]


def compute_rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2):
    """(corpus ROUGE-L, per-image scores) on tokenized strings."""
    scores = []
    for hyp, refs in zip(hypotheses, references):
        cand = hyp.split(" ")
        precision = recall = 0.0
        for ref in refs:
            ref_words = ref.split(" ")
            lcs = _lcs_length(ref_words, cand)
            precision = max(precision, lcs / float(len(cand)))
            recall = max(recall, lcs / float(len(ref_words)))
        if precision != 0 and recall != 0:
            scores.append(((1 + beta ** 2) * precision * recall) / float(recall + beta ** 2 * precision))
        else:
            scores.append(0.0)
    return float(np.mean(np.array(scores))), scores


# ----------------------------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------------------------

def compute_cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
                  sigma: float = 6.0):
    """(corpus CIDEr-D, per-image scores) on tokenized strings; document frequencies come from the
    references of exactly these images."""
    hyp_counts = [_ngrams(h.split(), n) for h in hypotheses]
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for counts in refs for gram in counts})
    log_ref_count = math.log(float(len(ref_counts))) if ref_counts else 0.0

    def weights(counts):
        vec = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = float(tf) * (log_ref_count - math.log(max(1.0, doc_freq[gram])))
            vec[k][gram] = w
            norm[k] += w ** 2
            if k == 1:  # pycocoevalcap's "length" counts bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        vec, norm, length = weights(hyp)
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, length_r = weights(ref)
            delta = float(length - length_r)
            penalty = math.e ** (-(delta ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = 0.0
                for gram, w in vec[k].items():
                    w_r = vec_r[k].get(gram, 0.0)
                    val += min(w, w_r) * w_r  # hypothesis weights clipped by the reference's
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(float(np.mean(np.array(total)) / len(refs) * 10.0))
    return (float(np.mean(np.array(scores))) if scores else 0.0), scores


# ----------------------------------------------------------------------------------------------
# METEOR and SPICE (Java)
# ----------------------------------------------------------------------------------------------

def _java_missing() -> str | None:
    return None if shutil.which("java") else "no `java` executable on PATH"


def meteor_status() -> tuple[Path | None, str | None]:
    """(meteor-1.5.jar path, None) when METEOR can run, else (None, reason)."""
    reason = _java_missing()
    if reason:
        return None, f"METEOR needs Java: {reason}"
    root = pycocoevalcap_dir()
    if root is None:
        return None, "METEOR needs meteor-1.5.jar from pycocoevalcap, which is not installed"
    jar = root / "meteor" / "meteor-1.5.jar"
    data = root / "meteor" / "data" / "paraphrase-en.gz"
    for path in (jar, data):
        if not path.is_file():
            return None, f"METEOR needs {path}, which is missing"
    return jar, None


def compute_meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                   jar: str | os.PathLike | None = None, timeout: float = 1800.0):
    """(corpus METEOR, per-image scores) from meteor-1.5.jar, driven like pycocoevalcap's ``Meteor``:
    one ``SCORE ||| ref ||| ... ||| hyp`` line per image (``|||`` and double spaces removed from the
    hypothesis), then one ``EVAL`` line with all the statistics. The jar is killed after ``timeout``
    seconds."""
    if jar is None:
        jar, reason = meteor_status()
        if jar is None:
            raise RuntimeError(reason)
    jar = Path(jar)
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(["java", "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"],
                                cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()

        def read() -> str:
            answer = proc.stdout.readline()
            if not answer:
                code = proc.wait()
                errors.seek(0)
                tail = errors.read().decode("utf-8", "replace")[-2000:]
                why = f"killed after {timeout:g} s" if not watchdog.is_alive() and code < 0 else f"exit {code}"
                raise RuntimeError(f"meteor-1.5.jar stopped ({why}): {tail}")
            return answer.decode("utf-8").strip()

        def ask(line: str) -> str:
            proc.stdin.write((line.replace("\n", " ") + "\n").encode("utf-8"))
            proc.stdin.flush()
            return read()

        try:
            stats = []
            for hyp, refs in zip(hypotheses, references):
                hyp = hyp.replace("|||", "").replace("  ", " ")
                stats.append(ask(" ||| ".join(("SCORE", " ||| ".join(refs), hyp))))
            scores = [float(ask(" ||| ".join(["EVAL", *stats])))]
            scores += [float(read()) for _ in range(len(stats) - 1)]
            corpus = float(read())
        finally:
            watchdog.cancel()
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
    return corpus, scores


def spice_status() -> tuple[Path | None, str | None]:
    """(spice-1.0.jar path, None) when SPICE can run, else (None, reason)."""
    reason = _java_missing()
    if reason:
        return None, f"SPICE needs Java: {reason}"
    root = pycocoevalcap_dir()
    if root is None:
        return None, "SPICE needs spice-1.0.jar from pycocoevalcap, which is not installed"
    jar = root / "spice" / "spice-1.0.jar"
    if not jar.is_file():
        return None, f"SPICE needs {jar}, which is missing"
    missing = [name for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
               if not (jar.parent / "lib" / name).is_file()]
    if missing:
        return None, (f"SPICE needs {' and '.join(missing)} in {jar.parent / 'lib'} (pycocoevalcap downloads "
                      "them from nlp.stanford.edu on first use; blip_jax does not download anything)")
    return jar, None


def compute_spice(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                  jar: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                  timeout: float = 7200.0):
    """(corpus SPICE, per-image F-scores) from spice-1.0.jar, run like pycocoevalcap's ``Spice``
    (``-subset -silent``, 8 GB heap). The corpus value is the mean of the per-image "All" F-scores
    (NaN when any is NaN, as in pycocoevalcap)."""
    if jar is None:
        jar, reason = spice_status()
        if jar is None:
            raise RuntimeError(reason)
    jar = Path(jar)
    with tempfile.TemporaryDirectory(prefix="blip_jax_spice_") as tmp:
        src, out = Path(tmp) / "input.json", Path(tmp) / "output.json"
        src.write_text(json.dumps([{"image_id": i, "test": h, "refs": list(r)}
                                   for i, (h, r) in enumerate(zip(hypotheses, references))]))
        cmd = ["java", "-jar", "-Xmx8G", jar.name, str(src)]
        if cache_dir is not None:
            cmd += ["-cache", str(cache_dir)]
        cmd += ["-out", str(out), "-subset", "-silent"]
        proc = subprocess.run(cmd, cwd=jar.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"spice-1.0.jar failed (exit {proc.returncode}): "
                               f"{proc.stderr.decode('utf-8', 'replace')[-2000:]}")
        results = json.loads(out.read_text())

    def as_float(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return float("nan")

    by_index = {item["image_id"]: as_float(item["scores"]["All"]["f"]) for item in results}
    scores = [by_index.get(i, float("nan")) for i in range(len(hypotheses))]
    return float(np.mean(np.array(scores))), scores


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def _prediction_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    raise ValueError(f"a prediction must be one caption string, got {value!r}")


def score_captions(predictions: Mapping[Hashable, Any], references: Mapping[Hashable, Sequence[str]], *,
                   metrics: Sequence[str] = METRICS, tokenize: bool = True, tokenizer: str = "auto",
                   per_image: bool = False) -> dict:
    """COCO caption metrics of ``predictions`` ({id: caption}) against ``references`` ({id: [captions]}).

    Both mappings must have the same ids; images are scored in the order of ``references``.
    ``tokenize``: run the PTB tokenizer first (as pycocoevalcap's COCOEvalCap does); ``tokenizer``:
    "auto" (Java when available, else the pure-Python port), "python" or "java".

    Returns {"bleu_1".."bleu_4", "meteor", "rouge_l", "cider", "spice": float or None (only the requested
    metrics), "unavailable": {metric: reason} for Java metrics that could not run, "tokenizer": "java",
    "python" or "none"}, plus "per_image": {id: {metric: value}} when ``per_image`` is set.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    if set(predictions) != set(references):
        missing = set(references) - set(predictions)
        extra = set(predictions) - set(references)
        raise ValueError(f"predictions and references must cover the same ids "
                         f"({len(missing)} without a prediction, {len(extra)} without references)")
    ids = list(references)
    hyps = [_prediction_text(predictions[i]) for i in ids]
    refs = [list(references[i]) for i in ids]
    for i, r in zip(ids, refs):
        if not r or not all(isinstance(t, str) for t in r):
            raise ValueError(f"image {i!r} needs a non-empty list of reference strings, got {r!r}")

    result: dict = {}
    used = "none"
    if tokenize:
        flat, used = tokenize_captions([t for r in refs for t in r], tokenizer)
        it = iter(flat)
        refs = [[next(it) for _ in r] for r in refs]
        hyps, _ = tokenize_captions(hyps, used)
    unavailable: dict = {}
    images: list = [{} for _ in ids]

    def record(names, corpus, scores):
        for name, value in zip(names, corpus):
            result[name] = value
        for row, values in zip(images, scores):
            row.update(zip(names, values))

    if not ids:
        for name in metrics:
            for key in (BLEU_KEYS if name == "bleu" else (name,)):
                result[key] = None
        unavailable.update({name: "no images to score" for name in metrics})
    else:
        for name in metrics:
            if name == "bleu":
                corpus, scores = compute_bleu(hyps, refs)
                record(BLEU_KEYS, [float(c) for c in corpus], [[float(x) for x in s] for s in scores])
            elif name == "rouge_l":
                corpus, scores = compute_rouge_l(hyps, refs)
                record(("rouge_l",), [corpus], [[s] for s in scores])
            elif name == "cider":
                corpus, scores = compute_cider(hyps, refs)
                record(("cider",), [corpus], [[s] for s in scores])
            else:  # Java metrics
                status, compute = (meteor_status, compute_meteor) if name == "meteor" else (spice_status, compute_spice)
                jar, reason = status()
                if jar is not None:
                    try:
                        corpus, scores = compute(hyps, refs, jar=jar)
                    except Exception as exc:  # noqa: BLE001 - reported, never raised
                        reason = f"{name} failed: {type(exc).__name__}: {exc}"
                    else:
                        record((name,), [corpus], [[s] for s in scores])
                if reason is not None:
                    result[name] = None
                    unavailable[name] = reason
    result["unavailable"] = unavailable
    result["tokenizer"] = used
    if per_image:
        result["per_image"] = dict(zip(ids, images))
    return result
