"""Every stage exports W/model, and a workdir stands for its model wherever a model directory goes."""

from pathlib import Path

import numpy as np
import pytest

from blip_jax.config_files import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _train(config: str, workdir, **overrides):
    from blip_jax.train import trainer

    cfg = load_config(CONFIGS / f"{config}.py", "tiny")
    cfg.update_from_flattened_dict({"total_steps": 4, "log_every": 2, "checkpoint_every": 2, **overrides})
    return trainer.train(cfg, workdir, progress=False)


@pytest.mark.parametrize("config", ["blip2_stage2_opt", "instructblip_vicuna"])
def test_lm_stages_export_a_model_that_generates(config, tmp_path):
    import blip_jax

    last = _train(config, tmp_path / "w")
    assert last["model"] == str(tmp_path / "w" / "model")
    model = blip_jax.load(tmp_path / "w")  # the workdir names its model/
    assert model.architecture == "generation"
    image = np.zeros((32, 32, 3), np.uint8)
    texts = model.generate([image], ["a photo of"], max_new_tokens=3)
    assert len(texts) == 1 and isinstance(texts[0], str)
    assert model.rank([image], "a photo of", ["red", "blue"]).shape == (1, 2)


def test_unfinished_workdir_is_refused_with_what_to_do(tmp_path):
    import blip_jax

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="training workdir with no model/ yet.*rerun its `blip-jax train`"):
        blip_jax.load(tmp_path)


def test_a_workdir_as_init_from(tmp_path):
    """Fine-tuning names the pre-training workdir, not its model/."""
    _train("blip_pretrain", tmp_path / "pt")
    last = _train("blip_caption", tmp_path / "cap", **{"model.init_from": str(tmp_path / "pt")})
    assert last["step"] == 4 and np.isfinite(last["loss"])
