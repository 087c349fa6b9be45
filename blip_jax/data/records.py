"""The record every source yields, and how a bad one is reported.

A *raw record* is a dict with some of these keys (sources fill what their format has):

    image         encoded image bytes, an image file path (str), or a uint8 [H, W, 3] array
    caption       one caption (str); training sources yield one record per caption
    captions      every reference caption of an image (list[str]), for evaluation
    question      a question (str)
    answers       distinct answers (list[str]) and answer_weights (list[float], same length);
                  all_answers: every annotator's answer, repeats kept (for VQA accuracy)
    instruction   / output: an instruction-tuning pair (str, str), when the data has them
    task          the task family of the source (see blip_jax.data.instructions), e.g. "caption"
    image_id      / question_id: identifiers (str), kept for evaluation and provenance
    source        the name of the source in a mixture

Nothing in a raw record is decoded: images stay bytes or paths until the transform, which runs
inside the pipeline's workers. Anything wrong with a record raises `BadRecord(reason, detail)`; the
pipeline then drops that record, counts it under `reason` and goes on, so one corrupt file never
stops a run and every good record still arrives.
"""

from __future__ import annotations

# Reasons a record is skipped; the summary (`blip-jax data check`, W/data_report.json) counts by these.
REASONS = (
    "missing_file",  # the image path does not exist
    "outside_root",  # the image path resolves outside the dataset's root (never opened; data/paths.py)
    "empty_file",  # zero bytes
    "corrupt_image",  # undecodable or truncated image data
    "zero_size_image",  # decodes to width or height 0
    "image_too_large",  # more pixels than PIL's decompression-bomb bound (never decoded)
    "bad_text",  # empty, whitespace-only or non-string caption / question / answer
    "malformed_json",  # an annotation line, entry or packed record that is not valid JSON or lacks fields
    "truncated_tar_member",  # a WebDataset tar member cut short
    "incomplete_sample",  # a WebDataset sample without an image or without text
)


class BadRecord(Exception):
    """A record that cannot be used; `reason` is one of REASONS, `detail` says which and why."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}; known: {', '.join(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def add_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """`total` updated with `more` (counts by reason), returned for chaining."""
    for reason, n in more.items():
        total[reason] = total.get(reason, 0) + int(n)
    return total
