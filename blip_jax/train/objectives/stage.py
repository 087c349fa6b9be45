"""A training stage as one record: everything the trainer, the state builder, the input pipeline,
the dry run, the report and the export need to know about it (on the model of
`blip_jax.models.llm.Family`). The config's `objective` names the stage."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

# (model, params, batch, rng, loss cfg, extra) -> (loss, metrics, extra): over a global batch (jit sees
# global arrays, so features and negatives "across devices" are simply the whole batch)
Loss = Callable[..., tuple[Any, dict, dict]]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    model: str  # "blip" (BlipConfig, the MED model) | "blip2" (Blip2Config: Q-Former, optional LLM)
    loss: Loss
    example: Callable[..., dict]  # (task, record, rng) -> one example's text arrays (pixels are the task's)
    batch_shapes: Callable[..., dict]  # (cfg, encoder_decoder) -> {name: ShapeDtypeStruct [B, ...]} but pixels
    report: Callable[..., dict]  # (cfg, st, task, params, records, batch) -> what the run learned
    bert_text_only: bool = False  # trains on BERT tokens alone: no LLM tokenizer
    architecture: str = ""  # the architecture it trains ("": the config's model.architecture)
    model_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # set on the model config
    init_extra: Callable[..., dict] | None = None  # (params, loss cfg, rng, batch_size) -> the loss's own state
    microbatch_weight: Callable[..., Any] | None = None  # what a microbatch's mean averages over (None: 1)
    prepare: Callable[..., None] | None = None  # (cfg, bert tokenizer, llm tokenizer): loss settings they give
    lr: float = 0.0  # the paper's learning rate, where presets share it (BLIP)
    image_size: int = 0  # the paper's resolution, where presets share it (BLIP)
    two_images: bool = False  # each example has a second image, `pixels1` (NLVR2)

    @property
    def accumulates(self) -> bool:
        """Whether gradients may accumulate over microbatches: not when the loss keeps state that
        must advance every step (BLIP's momentum encoders and queues)."""
        return self.init_extra is None
