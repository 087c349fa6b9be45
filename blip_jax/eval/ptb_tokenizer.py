"""COCO caption tokenization: the Stanford PTB tokenizer as pycocoevalcap runs it.

pycocoevalcap 1.2 (``tokenizer/ptbtokenizer.py``, used by LAVIS and the COCO caption server) joins all
captions of one side into one text, one caption a line (``'\\n'`` in a caption becomes a space), runs

    java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase

on it, splits the output into lines again and drops the tokens in ``PUNCTUATIONS`` from each line.

``tokenizer="java"`` runs that jar itself (found in an installed pycocoevalcap, never downloaded): the
reference. ``"python"`` is this project's own small tokenizer with the PTB conventions that caption
text meets: lower-casing, punctuation split off words, clitics split (``man's`` -> ``man 's``,
``isn't`` -> ``is n't``, ``they're`` -> ``they 're``), ``cannot`` / ``gonna`` / ``wanna`` / ``gotta``
split in two, brackets written as ``-lrb-`` ``-rrb-`` ``-lsb-`` ``-rsb-`` ``-lcb-`` ``-rcb-`` (which
survive the filter, whose list is upper-case, as in the Java pipeline), quotes dropped, numbers with
``.`` / ``,`` / ``:`` kept whole, dotted abbreviations (``u.s.``, ``e.g.``, ``mr.``) kept whole,
hyphenated words kept whole. It equals the jar on ordinary captions (the tests check a fixture set);
unusual text (URLs, e-mail addresses, emoticons, SGML, rare abbreviations) can differ, so prefer Java
for reported numbers: ``"auto"`` picks it when ``java`` and the jar are present.

One deliberate deviation from pycocoevalcap: besides ``'\\n'``, the other characters the tokenizer takes
for line breaks (``\\r``, VT, FF, U+2028, U+2029) also become spaces before tokenizing, in both modes.
pycocoevalcap leaves them in, so the tokenizer emits an extra output line and every later caption is
scored against the wrong image.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "PUNCTUATIONS",
    "ptb_tokenize_line",
    "tokenize_captions",
    "tokenize_captions_python",
    "tokenize_captions_java",
    "java_tokenizer_status",
    "pycocoevalcap_dir",
]

# pycocoevalcap's PUNCTUATIONS (compared against the *lowercased* tokens, hence "-lrb-" stays).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

CORENLP_JAR = "stanford-corenlp-3.4.1.jar"
# Characters the PTB lexer treats as line breaks; all become spaces inside a caption (see module doc).
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\u2028\u2029"})


# Abbreviations the PTB tokenizer keeps with their period (a small list: the ones captions use).
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc inc ltd co no jan feb mar apr aug sept sep oct nov "
                           "dec ave blvd mt ft approx".split())
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"),
                "gotta": ("got", "ta"), "gimme": ("gim", "me"), "lemme": ("lem", "me")}
_SYMBOLS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
            '"': "''"}  # PTB writes double quotes as `` / '', which the filter drops
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2014": " -- ",
                         "\u2013": " -- ", "\u2026": " ... "})
_TOKEN = re.compile(r"""
    (?:[a-z]\.){2,}                                  # dotted abbreviations: u.s., e.g., a.m.
  | \d+(?:[.,:/]\d+)*(?:'?s)?                          # numbers: 3.5 1,000 12:30 1/2 1990s
  | [^\W\d_](?:[\w]|[-'&](?=\w))*                    # words, with inner hyphens and apostrophes
  | \.{2,} | -{2,} | `{1,2} | '{1,2}                  # ellipses, dashes, quotes
  | \S                                               # any other symbol on its own
""", re.VERBOSE)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def _word_tokens(word: str) -> list[str]:
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    match = _CLITIC.match(word)
    if match and "'" not in match.group(1):
        return [match.group(1), match.group(2)]
    return [word]


def ptb_tokenize_line(text: str) -> list[str]:
    """Lower-cased PTB-style tokens of one caption, punctuation kept (module docstring)."""
    tokens = []
    matches = list(_TOKEN.finditer(text.translate(_QUOTES).lower()))
    for i, m in enumerate(matches):
        if m is None:  # a period already joined to its abbreviation
            continue
        tok = m.group()
        nxt = matches[i + 1] if i + 1 < len(matches) else None
        if tok in _ABBREVIATIONS and nxt is not None and nxt.group() == "." and nxt.start() == m.end():
            matches[i + 1] = None  # "mr." stays one token
            tokens.append(tok + ".")
            continue
        tokens += _word_tokens(tok) if tok[0].isalpha() else [_SYMBOLS.get(tok, tok)]
    return tokens


def _drop_punctuation(line: str) -> str:
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def _prepare(captions: Iterable[str]) -> list[str]:
    return [str(c).translate(_LINE_BREAKS) for c in captions]


def tokenize_captions_python(captions: Sequence[str]) -> list[str]:
    """Tokenized captions (punctuation dropped as pycocoevalcap does), without Java."""
    return [_drop_punctuation(" ".join(ptb_tokenize_line(c))) for c in _prepare(captions)]


# ----------------------------------------------------------------------------------------------
# The Java tokenizer itself (CoreNLP jar shipped inside pycocoevalcap).
# ----------------------------------------------------------------------------------------------

def pycocoevalcap_dir() -> Path | None:
    """Directory of an installed pycocoevalcap package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def java_tokenizer_status(jar: str | os.PathLike | None = None) -> tuple[Path | None, str | None]:
    """(jar path, None) when the Java tokenizer can run, else (None, reason)."""
    if shutil.which("java") is None:
        return None, "no `java` executable on PATH (the PTB tokenizer jar needs Java)"
    if jar is None:
        root = pycocoevalcap_dir()
        if root is None:
            return None, f"pycocoevalcap is not installed (it ships {CORENLP_JAR})"
        jar = root / "tokenizer" / CORENLP_JAR
    jar = Path(jar)
    if not jar.is_file():
        return None, f"{jar} not found"
    return jar, None


def tokenize_captions_java(captions: Sequence[str], jar: str | os.PathLike | None = None,
                           timeout: float = 600.0) -> list[str]:
    """pycocoevalcap's PTBTokenizer, run exactly as it runs it (Java + the CoreNLP 3.4.1 jar)."""
    path, reason = java_tokenizer_status(jar)
    if path is None:
        raise RuntimeError(f"Java PTB tokenizer unavailable: {reason}")
    captions = _prepare(captions)
    if not captions:
        return []
    with tempfile.TemporaryDirectory(prefix="blip_jax_ptb_") as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_bytes("\n".join(captions).encode("utf-8"))
        proc = subprocess.run(["java", "-cp", str(path), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", str(src)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    lines += [""] * (len(captions) - len(lines))
    return [_drop_punctuation(line) for line in lines[:len(captions)]]


def tokenize_captions(captions: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], str]:
    """Tokenized captions and the tokenizer used ("java" or "python").

    ``tokenizer``: "python", "java" (error when Java or the jar is missing or fails) or "auto" (Java
    when available and working, else Python; both give the same output, see the module doc).
    """
    if tokenizer not in ("auto", "python", "java"):
        raise ValueError(f"tokenizer must be 'auto', 'python' or 'java', got {tokenizer!r}")
    if tokenizer == "java" or tokenizer == "auto" and java_tokenizer_status()[0] is not None:
        try:
            return tokenize_captions_java(captions), "java"
        except (OSError, RuntimeError, subprocess.SubprocessError):
            if tokenizer == "java":
                raise
    return tokenize_captions_python(captions), "python"
