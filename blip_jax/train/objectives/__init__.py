"""The training stages, one record each (`Stage`), by the name a config's `objective` gives.

Adding a stage: write its loss, example and batch shapes (and, if it needs them, its report, extra
state and microbatch weight) in one file here, and add its record to `STAGES`.
"""

from __future__ import annotations

from blip_jax.train.objectives import blip, blip2
from blip_jax.train.objectives.stage import Stage

STAGES = {s.name: s for s in (blip2.STAGE1, blip2.STAGE1_RETRIEVAL, blip2.LM, blip.PRETRAIN, blip.RETRIEVAL, blip.CAPTION, blip.VQA, blip.NLVR)}


def stage_of(cfg) -> Stage:
    """The stage a training config runs (its `objective`)."""
    if cfg.objective not in STAGES:
        raise ValueError(f"objective={cfg.objective!r} is not a training stage; known: {', '.join(STAGES)}")
    return STAGES[cfg.objective]


__all__ = ["STAGES", "Stage", "stage_of"]
