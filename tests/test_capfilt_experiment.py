"""The CapFilt experiment (benchmarks/capfilt_experiment.py) as a test: on synthetic data with 40%
wrong captions, a tiny BLIP pre-trained on the CapFilt output beats the same pre-training on the
noisy data at held-out retrieval, and the filter removes wrong captions better than chance."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretraining_on_capfilt_output_beats_noisy_data(tmp_path):
    out = tmp_path / "capfilt.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "capfilt_experiment.py"), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    result = json.loads(out.read_text())
    noisy, cleaned, quality = result["noisy"], result["cleaned"], result["filter"]
    print(json.dumps({"noisy": noisy, "cleaned": cleaned, "filter": quality}, indent=1))
    assert quality["web_captions"] == result["settings"]["records"]
    assert 0 < quality["dropped"] < quality["web_captions"] and quality["synthetic_kept"] > 0
    assert 0.0 <= quality["precision"] <= 1.0 and 0.0 <= quality["recall"] <= 1.0
    # the filter finds wrong captions better than dropping at random would (precision = noise rate)
    noise = quality["wrong"] / quality["web_captions"]
    assert quality["precision"] > noise + 0.1 and quality["recall"] > 0.5, quality
    assert result["cleaned_wins"]
    # a real margin, well above chance: both directions summed
    won = cleaned["image_to_text_r1"] + cleaned["text_to_image_r1"]
    lost = noisy["image_to_text_r1"] + noisy["text_to_image_r1"]
    assert won > lost + 2 * cleaned["chance"], (won, lost)
