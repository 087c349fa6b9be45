"""VQA answer normalization and accuracy, reproducing the official VQA evaluation.

Reference: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (``VQAEval``).
Two variants of its ``evaluate`` loop exist and both are reproduced here:

* ``variant="official"`` (default): the current upstream code (commit a013f00, 2021 "Fixed processing
  answers bug"). Predicted and ground-truth answers get '\n'/'\t' -> ' ' and ``strip()``; then, only
  when the ground-truth answers are *not all identical* (``len(set(gtAnswers)) > 1``), both the
  prediction and every ground-truth answer go through ``processPunctuation`` + ``processDigitArticle``.
  When all ground-truth answers are identical nothing is normalized: the stripped prediction must equal
  the stripped answer exactly (e.g. "Yes" scores 0 against ten "yes").
* ``variant="lavis"``: the pre-2021 code that LAVIS copies (``lavis/common/vqa_tools/vqa_eval.py``) and
  uses for its VQAv2 numbers. The prediction is always cleaned and fully normalized; ground-truth answers
  are not stripped and get only ``processPunctuation`` (no digit/article processing), and only when they
  are not all identical.

Per question, the accuracy is the mean over leave-one-out subsets (one per given human answer, usually
10) of ``min(1, #matches in the subset / 3)``. Leave-one-out is by position: the official code drops the
answer *dict* equal to the current one, and VQA answer dicts carry a unique ``answer_id``, so exactly one
answer is dropped even when several answers share the same text.

Units: ``vqa_accuracy`` returns a fraction in [0, 1] (the official per-question ``acc``); ``score_vqa``
and ``exact_match_accuracy`` report percentages, rounded to 2 decimals as the official ``setAccuracy``
(``round(100 * sum / n, 2)``) under the plain keys, and at full precision under ``*_unrounded`` keys.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

__all__ = [
    "CONTRACTIONS",
    "MANUAL_MAP",
    "ARTICLES",
    "PUNCT",
    "process_punctuation",
    "process_digit_article",
    "clean_whitespace",
    "normalize_answer",
    "vqa_accuracy",
    "score_vqa",
    "exact_match",
    "exact_match_accuracy",
]

# The official table, verbatim (keys with capitals such as "Im" can never match: words are lower-cased
# before the lookup - kept as in the reference).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
         ",", "?", "!")
# Exactly the reference's patterns. "(?!<=\d)" is a (buggy) negative *lookahead* for the literal "<="
# followed by a digit, which never fires in front of a "."; so in effect: strip every "." that is not
# followed by a digit ("3.5" keeps its period, "yes." and "3." lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The reference calls ``periodStrip.sub("", outText, re.UNICODE)``: the flag lands in the ``count``
# argument, so at most re.UNICODE (= 32) periods are removed.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """``VQAEval.processPunctuation``: each punctuation mark is deleted when it touches a space anywhere in
    the input, or when the input contains a digit-comma-digit ("1,000"); otherwise it becomes a space.
    Then periods not followed by a digit are removed."""
    out = text
    comma_digits = _COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or comma_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``: lower-case, whitespace-split, number words -> digits, drop
    articles, expand apostrophe-less contractions ("dont" -> "don't"), join with single spaces."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def clean_whitespace(text: str) -> str:
    """The reference's first step: newlines and tabs -> spaces, then ``strip()``."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full official normalization of an answer: ``clean_whitespace`` -> ``process_punctuation`` ->
    ``process_digit_article`` (what the reference applies to a prediction that is normalized)."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def _check_variant(variant: str) -> None:
    if variant not in ("official", "lavis"):
        raise ValueError(f"variant must be 'official' or 'lavis', got {variant!r}")


def vqa_accuracy(prediction: str, gt_answers: Iterable[str], variant: str = "official") -> float:
    """Official VQA accuracy of one prediction against the human answers, as a fraction in [0, 1].

    ``min(1, matches / 3)`` averaged over the leave-one-out subsets, one per given answer (so fewer than
    10 answers are handled as the reference does: it iterates over whatever answers there are). With 10
    answers, 1/2/3/>=4 matches give 0.3/0.6/0.9/1.0. See the module docstring for ``variant``.
    """
    _check_variant(variant)
    if isinstance(gt_answers, str):
        raise TypeError("gt_answers must be a list of answer strings, not one string")
    gts = [str(a) for a in gt_answers]
    if not gts:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    if variant == "official":
        gts = [clean_whitespace(a) for a in gts]
        res = clean_whitespace(prediction)
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(a)) for a in gts]
            res = process_digit_article(process_punctuation(res))
    else:  # the pre-2021 loop copied by LAVIS
        res = normalize_answer(prediction)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        accs.append(min(1, float(matches) / 3))
    return float(sum(accs)) / len(accs)


def _answers_of(record: Any) -> tuple[list[str], Any, Any]:
    """(answers, answer_type, question_type) of one annotation in any of the accepted forms."""
    answer_type = question_type = None
    if isinstance(record, Mapping):
        answers = record["answers"]
        answer_type = record.get("answer_type")
        question_type = record.get("question_type")
    elif isinstance(record, str):
        answers = [record]
    else:
        answers = record
    out = []
    for a in answers:
        out.append(a["answer"] if isinstance(a, Mapping) else a)
    return out, answer_type, question_type


def _as_prediction_dict(predictions: Any) -> dict:
    """dict qid -> answer, or a results list [{"question_id": ..., "answer": ...}] (VQA results format)."""
    if isinstance(predictions, Mapping):
        return dict(predictions)
    out = {}
    for item in predictions:
        out[item["question_id"]] = item["answer"]
    return out


def _pct(values: list[float], ndigits: int) -> tuple[float, float]:
    full = 100 * float(sum(values)) / len(values)  # the reference's order of operations
    return round(full, ndigits), full


def score_vqa(predictions: Any, annotations: Mapping[Any, Any], variant: str = "official",
              ndigits: int = 2) -> dict:
    """VQA accuracy over a set of questions, as the official ``VQAEval.evaluate`` + ``setAccuracy``.

    predictions: {question_id: answer} or a results list of {"question_id", "answer"}. Every predicted
        question is scored; each must have an annotation (``KeyError`` otherwise). Annotated questions
        without a prediction are not scored (the official loader would refuse such a results file) and
        are counted in ``num_unanswered``.
    annotations: {question_id: answers}, answers being a list of strings, a list of {"answer": ...}
        dicts, or a VQA annotation record {"answers": [...], "answer_type": ..., "question_type": ...}.

    Returns percentages: ``accuracy`` (rounded to ``ndigits`` like the reference) and
    ``accuracy_unrounded``; ``per_question`` {qid: rounded percent} (the reference's ``evalQA``) and
    ``per_question_unrounded``; ``per_answer_type`` / ``per_question_type`` (+ ``_unrounded``) when the
    annotations carry those types (questions without a type are left out of that breakdown);
    ``num_questions``, ``num_unanswered``.
    """
    _check_variant(variant)
    preds = _as_prediction_dict(predictions)
    if not preds:
        raise ValueError("score_vqa needs at least one prediction")
    accs: list[float] = []
    per_question, per_question_full = {}, {}
    by_answer_type: dict[Any, list[float]] = {}
    by_question_type: dict[Any, list[float]] = {}
    for qid, answer in preds.items():
        if qid not in annotations:
            raise KeyError(f"no annotation for question {qid!r}")
        gts, answer_type, question_type = _answers_of(annotations[qid])
        acc = vqa_accuracy(answer, gts, variant=variant)
        accs.append(acc)
        per_question[qid] = round(100 * acc, ndigits)
        per_question_full[qid] = 100 * acc
        if answer_type is not None:
            by_answer_type.setdefault(answer_type, []).append(acc)
        if question_type is not None:
            by_question_type.setdefault(question_type, []).append(acc)
    accuracy, accuracy_full = _pct(accs, ndigits)
    out = {
        "accuracy": accuracy,
        "accuracy_unrounded": accuracy_full,
        "per_question": per_question,
        "per_question_unrounded": per_question_full,
        "num_questions": len(accs),
        "num_unanswered": sum(1 for qid in annotations if qid not in preds),
    }
    for name, groups in (("per_answer_type", by_answer_type), ("per_question_type", by_question_type)):
        if groups:
            pairs = {k: _pct(v, ndigits) for k, v in groups.items()}
            out[name] = {k: p[0] for k, p in pairs.items()}
            out[name + "_unrounded"] = {k: p[1] for k, p in pairs.items()}
    return out


def exact_match(prediction: str, gt_answer: str) -> bool:
    """LAVIS ``GQATask._report_metrics`` per question: prediction and ground truth both go through
    ``process_punctuation`` + ``process_digit_article`` (no newline/strip step), then compared."""
    pred = process_digit_article(process_punctuation(prediction))
    gt = process_digit_article(process_punctuation(gt_answer))
    return pred == gt


def exact_match_accuracy(predictions: Any, gt_answers: Mapping[Any, str], ndigits: int = 2) -> dict:
    """Exact-match accuracy (GQA, as LAVIS's GQATask) over the predicted questions.

    predictions: {question_id: answer} or a results list of {"question_id", "answer"}; gt_answers:
    {question_id: answer string}. Returns percentages: ``accuracy_unrounded`` is LAVIS's
    ``sum(acc) / len(acc) * 100``; ``accuracy`` is that rounded to ``ndigits``; ``per_question``
    {qid: 100.0 or 0.0}; ``num_questions``.
    """
    preds = _as_prediction_dict(predictions)
    if not preds:
        raise ValueError("exact_match_accuracy needs at least one prediction")
    hits = []
    per_question = {}
    for qid, answer in preds.items():
        if qid not in gt_answers:
            raise KeyError(f"no ground-truth answer for question {qid!r}")
        hit = 1 if exact_match(answer, gt_answers[qid]) else 0
        hits.append(hit)
        per_question[qid] = 100.0 * hit
    full = sum(hits) / len(hits) * 100
    return {"accuracy": round(full, ndigits), "accuracy_unrounded": full, "per_question": per_question,
            "num_questions": len(hits)}
