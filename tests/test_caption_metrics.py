"""COCO caption metrics against the reference implementation (pycocoevalcap 1.2).

The comparisons with pycocoevalcap's scorers need it installed (`pip install pycocoevalcap==1.2`, the
test extra); the Java ones (CoreNLP tokenizer, METEOR) also need `java`, and skip with the reason
otherwise. Everything else runs without Java.
"""

import json
import random

import numpy as np
import pytest

from blip_jax.eval import caption_metrics as cm
from blip_jax.eval import ptb_tokenizer as ptb

TOL = 1e-6

# 24 images, 5 references each; predictions cover punctuation, capitals, contractions, repeated words,
# an empty prediction, a very long one, an exact copy of a reference and a few tokenizer corner cases.
REFERENCES = {
    "img_000": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
                "a person on a surf board riding a wave", "Man surfing on a big blue wave.",
                "The surfer is catching a wave at the beach."],
    "img_001": ["Two dogs playing with a frisbee in the park.", "A couple of dogs chase a red frisbee.",
                "two dogs are running on the grass", "Dogs play in a grassy field, one has a frisbee.",
                "A brown dog and a white dog playing outside."],
    "img_002": ["A plate of food with broccoli and rice.", "Chicken, rice and broccoli on a white plate.",
                "a dinner plate with meat and vegetables", "A healthy meal sitting on a table.",
                "The plate has rice, broccoli, and some chicken on it."],
    "img_003": ["A cat sleeping on a laptop keyboard.", "The cat is lying on the computer.",
                "a cat that is laying on a keyboard", "Cat napping on top of an open laptop.",
                "A gray cat asleep on someone's laptop."],
    "img_004": ["A red double decker bus driving down a street.", "A double-decker bus on a city road.",
                "the bus is red and has two levels", "A tour bus drives past some buildings.",
                "Red bus traveling down the street in London."],
    "img_005": ["A woman holding an umbrella in the rain.", "A lady with an umbrella walks in the rain.",
                "person holding a black umbrella on a rainy day", "A woman walks down a wet sidewalk.",
                "Someone's carrying an umbrella while it's raining."],
    "img_006": ["A kitchen with stainless steel appliances.", "A modern kitchen with a stove and a fridge.",
                "the kitchen has white cabinets and a sink", "An empty kitchen in a house.",
                "A clean kitchen (with a microwave) and an oven."],
    "img_007": ["A giraffe standing next to a tree.", "A tall giraffe eating leaves from a tree.",
                "a giraffe in a zoo enclosure", "The giraffe is reaching up into the branches.",
                "One giraffe stands near some trees, eating."],
    "img_008": ["A boy swinging a baseball bat at a ball.", "A young baseball player at bat.",
                "a kid playing baseball in a field", "The batter is about to hit the ball.",
                "Little league player swings his bat."],
    "img_009": ["A pizza with pepperoni and cheese on a table.", "A large pizza sitting on a wooden table.",
                "a pepperoni pizza cut into slices", "Someone is about to eat a whole pizza.",
                "The pizza's got cheese, pepperoni & olives."],
    "img_010": ["A man on a skateboard doing a trick.", "A skateboarder jumps in the air.",
                "a guy skateboarding at a skate park", "The skater is doing a kick-flip.",
                "A teenager rides his skateboard down a ramp."],
    "img_011": ["A train traveling down the tracks.", "A passenger train pulling into a station.",
                "the train is blue and yellow", "A long train on the railroad tracks.",
                "An old train moves through the countryside."],
    "img_012": ["Two people flying a kite on the beach.", "A couple flying kites by the ocean.",
                "people on the beach with a kite", "A kite flies high above the sand.",
                "Two friends fly a colorful kite at the shore."],
    "img_013": ["A bowl of fruit on a kitchen counter.", "Apples, bananas and oranges in a bowl.",
                "a fruit bowl full of fresh fruit", "A wooden bowl filled with fruit.",
                "There's a bowl of fruit next to the sink."],
    "img_014": ["A man in a suit and tie.", "A businessman wearing a black suit.",
                "a man dressed in a suit smiles", "The man is wearing a red tie.",
                "Mr. Smith poses in his suit and tie."],
    "img_015": ["A bedroom with a large bed and a window.", "A neatly made bed in a hotel room.",
                "the bed has white sheets and pillows", "A small bedroom with a lamp.",
                "A bed, a night-stand and a lamp in a room."],
    "img_016": ["A group of people standing around a table.", "People gathered at a party.",
                "a crowd of people in a room", "Several friends talk at a table.",
                "A group of men and women at an event."],
    "img_017": ["A clock tower in the middle of a city.", "A large clock on top of a building.",
                "the clock tower is made of stone", "A tall tower with a clock on it.",
                "Big Ben, the famous clock tower in the U.K."],
    "img_018": ["An elephant walking through the grass.", "A large elephant in a field.",
                "an elephant standing in the dirt", "The elephant is eating some grass.",
                "A baby elephant walks with its mother."],
    "img_019": ["A motorcycle parked on the side of the road.", "A black motorcycle parked by a curb.",
                "a motor bike on the street", "The motorcycle is parked near a building.",
                "A shiny motorcycle sits in a parking lot."],
    "img_020": ["A horse grazing in a field.", "A brown horse eating grass in a pasture.",
                "a horse standing in the grass", "The horse is in a fenced field.",
                "One horse grazes on a sunny day."],
    "img_021": ["A little girl eating a piece of cake.", "A child with cake on her face.",
                "a girl eating cake at a birthday party", "The girl is enjoying a slice of cake.",
                "A young girl's birthday cake."],
    "img_022": ["A laptop and a cup of coffee on a desk.", "A computer desk with a mug.",
                "a desk with a laptop, a phone and a cup", "The laptop is open on the desk.",
                "Someone's workspace: a laptop & coffee."],
    "img_023": ["A stop sign on a street corner.", "A red stop sign next to a road.",
                "a stop sign at an intersection", "The sign says \"STOP\" in white letters.",
                "A stop sign with a street sign above it."],
}
PREDICTIONS = {
    "img_000": "a man riding a wave on top of a surfboard",
    "img_001": "Two dogs playing with a Frisbee in the park!",
    "img_002": "A plate of food with broccoli, rice, and chicken.",
    "img_003": "a cat cat cat cat sleeping on a a laptop",
    "img_004": "",
    "img_005": "A woman isn't holding an umbrella; it's raining...",
    "img_006": "A kitchen (with a stove) and a refrigerator.",
    "img_007": "giraffe",
    "img_008": "A boy swinging a baseball bat at a ball.",  # exact copy of a reference
    "img_009": "a pizza with pepperoni & cheese on a wooden table",
    "img_010": "A skateboarder doing a kick-flip at the skate-park.",
    "img_011": " ".join(["a long train traveling down the tracks next to a station with many people"] * 5),
    "img_012": "Two people are flying kites on the beach, don't they?",
    "img_013": "A bowl of apples, bananas & oranges.",
    "img_014": "Mr. Smith in a suit & tie at the U.S. office",
    "img_015": "A BEDROOM WITH A LARGE BED AND A WINDOW",
    "img_016": "a group of people standing around a table  with   drinks",
    "img_017": "A clock tower -- in the middle of a city.",
    "img_018": "An elephant's walking through the tall grass.",
    "img_019": "A motorcycle parked on the side of the road near a building.",
    "img_020": "a \"horse\" grazing in a field",
    "img_021": "A little girl can't stop eating cake.",
    "img_022": "a laptop, a phone and a cup of coffee on a desk: work",
    "img_023": "a stop sign",
}


@pytest.fixture(scope="module")
def fixture_set(tmp_path_factory):
    """The fixture written to JSON and read back (as an evaluation job would hand it over)."""
    path = tmp_path_factory.mktemp("captions") / "captions.json"
    path.write_text(json.dumps({"predictions": PREDICTIONS, "references": REFERENCES}))
    data = json.loads(path.read_text())
    return data["predictions"], data["references"]


@pytest.fixture(scope="module")
def tokenized(fixture_set):
    """(gts, res) in pycocoevalcap's format, tokenized by our pure-Python PTB tokenizer."""
    preds, refs = fixture_set
    ids = list(refs)
    flat = ptb.tokenize_captions_python([c for i in ids for c in refs[i]])
    it = iter(flat)
    gts = {i: [next(it) for _ in refs[i]] for i in ids}
    res = {i: [h] for i, h in zip(ids, ptb.tokenize_captions_python([preds[i] for i in ids]))}
    return gts, res


def _java_tokenizer_or_skip():
    jar, reason = ptb.java_tokenizer_status()
    if jar is None:
        pytest.skip(f"Java PTB tokenizer unavailable: {reason}")
    return jar


def _coco_tokenize(captions_by_id):
    """pycocoevalcap's own PTBTokenizer (Java) on {id: [str]}."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions_by_id.items()})


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("A man's dog (brown) isn't running.", "a man 's dog -lrb- brown -rrb- is n't running"),
    ("They're here; we've got it: \"yes\"!", "they 're here we 've got it yes"),
    ("I cannot -- gonna be e-mail co-ed...", "i can not gon na be e-mail co-ed"),
    ("Mr. Smith at the U.S. office, 3.5 cats & 1,000 dogs", "mr. smith at the u.s. office 3.5 cats & 1,000 dogs"),
    ("A [red] {blue} 'quoted' `thing'", "a -lsb- red -rsb- -lcb- blue -rcb- quoted thing"),
    ("", ""),
    ("...", ""),
    ("\u201cCurly\u201d quotes \u2014 and \u2018single\u2019 ones", "curly quotes and single ones"),
])
def test_python_tokenizer_known_outputs(text, expected):
    assert ptb.tokenize_captions_python([text]) == [expected]


def test_python_tokenizer_line_handling():
    # '\n' inside a caption is a space (pycocoevalcap); other line breaks too (see ptb_tokenizer's doc).
    out = ptb.tokenize_captions_python(["a\nb", "c\rd", "", "e\u2028f", "g"])
    assert out == ["a b", "c d", "", "e f", "g"]
    assert ptb.tokenize_captions_python([]) == []


def _fuzz_lines(n, seed=0):
    rng = random.Random(seed)
    pieces = ("a the man's dog isn't can't they're we'll I'd cannot gonna U.S. Mr. Dr. etc. e.g. a.m. No. 5 "
              "3.5 1,000 1/2 12:30 3-4 1990s '90s $5 100% & &amp; x-ray co-ed e-mail www.x.com http://a.org/b "
              "a@b.com @bob #tag c++ ( ) [ ] { } \" ' ` `` '' -- --- ... . , ; : ! ? < > = / * :) ^_^ "
              "caf\u00e9 \u00bd \u20ac \u00a3 \u2026 \u2013 \u2014 \u2018 \u2019 \u201c \u201d \u00ab \u00bb "
              "O'Neil o'clock rock'n'roll y'all 'tis 'twas ol' T-shirt A.k.a. Inc. I. The He").split()
    seps = [" "] * 6 + ["", ". ", ", ", "-", "'", "  ", "\t", "\u00a0"]
    return ["".join(rng.choice(pieces) + rng.choice(seps) for _ in range(rng.randint(0, 14))) for _ in range(n)]


def test_python_tokenizer_equals_java(fixture_set):
    """Our Python tokenizer == pycocoevalcap's PTBTokenizer (the Java jar) on caption text (the
    fixture's references and predictions); our Java runner == pycocoevalcap's on fuzzed lines too."""
    pytest.importorskip("pycocoevalcap")
    _java_tokenizer_or_skip()
    preds, refs = fixture_set
    fuzz = _fuzz_lines(400)
    java_refs = _coco_tokenize(refs)
    java_rest = _coco_tokenize({"preds": [preds[i] for i in refs], "fuzz": fuzz})
    ours_refs = ptb.tokenize_captions_python([c for i in refs for c in refs[i]])
    assert ours_refs == [c for i in refs for c in java_refs[i]]
    assert ptb.tokenize_captions_python([preds[i] for i in refs]) == java_rest["preds"]
    assert ptb.tokenize_captions_java(fuzz) == java_rest["fuzz"]


def test_tokenizer_choice(monkeypatch):
    with pytest.raises(ValueError):
        ptb.tokenize_captions(["a"], "perl")
    out, used = ptb.tokenize_captions(["A Dog."], "python")
    assert (out, used) == (["a dog"], "python")
    if ptb.java_tokenizer_status()[0] is not None:  # "auto" falls back to Python when the jar fails

        def broken(captions):
            raise RuntimeError("PTBTokenizer failed")

        with monkeypatch.context() as patch:
            patch.setattr(ptb, "tokenize_captions_java", broken)
            assert ptb.tokenize_captions(["A Dog."], "auto") == (["a dog"], "python")
    monkeypatch.setattr(ptb.shutil, "which", lambda name: None)
    assert ptb.tokenize_captions(["A Dog."], "auto") == (["a dog"], "python")
    with pytest.raises(RuntimeError, match="java"):
        ptb.tokenize_captions(["A Dog."], "java")


# ----------------------------------------------------------------------------------------------
# BLEU / ROUGE-L / CIDEr-D against pycocoevalcap's scorers (pure Python, no Java needed)
# ----------------------------------------------------------------------------------------------

def test_bleu_rouge_cider_equal_pycocoevalcap(tokenized):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = tokenized
    ids = list(gts)
    hyps, refs = [res[i][0] for i in ids], [gts[i] for i in ids]

    ref_bleu, ref_bleu_img = Bleu(4).compute_score(gts, res, verbose=0)
    bleu, bleu_img = cm.compute_bleu(hyps, refs)
    np.testing.assert_allclose(bleu, ref_bleu, rtol=0, atol=TOL)
    np.testing.assert_allclose(np.array(bleu_img), np.array(ref_bleu_img).T, rtol=0, atol=TOL)

    ref_rouge, ref_rouge_img = Rouge().compute_score(gts, res)
    rouge, rouge_img = cm.compute_rouge_l(hyps, refs)
    assert abs(rouge - ref_rouge) <= TOL
    np.testing.assert_allclose(rouge_img, ref_rouge_img, rtol=0, atol=TOL)

    ref_cider, ref_cider_img = Cider().compute_score(gts, res)
    cider, cider_img = cm.compute_cider(hyps, refs)
    assert abs(cider - ref_cider) <= TOL
    np.testing.assert_allclose(cider_img, ref_cider_img, rtol=0, atol=TOL)
    # sanity on the corner cases: an exact copy of a reference scores well, an empty prediction 0
    assert cider_img[ids.index("img_008")] > 2 and cider_img[ids.index("img_004")] == 0


def test_score_captions_equals_pycocoevalcap_pipeline(fixture_set, tokenized):
    """score_captions (tokenize + score, per image) == pycocoevalcap's scorers on the same tokens."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = fixture_set
    gts, res = tokenized
    out = cm.score_captions(preds, refs, metrics=("bleu", "rouge_l", "cider"), tokenizer="python", per_image=True)
    assert out["tokenizer"] == "python" and out["unavailable"] == {}
    assert set(out) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "unavailable", "tokenizer",
                        "per_image"}
    bleu, bleu_img = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_img = Rouge().compute_score(gts, res)
    cider, cider_img = Cider().compute_score(gts, res)
    expected = {"bleu_1": bleu[0], "bleu_2": bleu[1], "bleu_3": bleu[2], "bleu_4": bleu[3], "rouge_l": rouge,
                "cider": cider}
    for key, value in expected.items():
        assert isinstance(out[key], float) and abs(out[key] - value) <= TOL, key
    for n, i in enumerate(gts):
        row = out["per_image"][i]
        want = {**{f"bleu_{k + 1}": bleu_img[k][n] for k in range(4)}, "rouge_l": rouge_img[n],
                "cider": cider_img[n]}
        assert set(row) == set(want)
        for key, value in want.items():
            assert abs(row[key] - value) <= TOL, (i, key)


def test_score_captions_untokenized_and_list_predictions():
    refs = {1: ["a dog runs", "the dog is running"], 2: ["a cat sleeps", "a cat on a bed"]}
    out = cm.score_captions({1: ["a dog runs"], 2: "a cat"}, refs, metrics=("bleu", "cider"), tokenize=False)
    assert out["tokenizer"] == "none" and set(out) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider",
                                                        "unavailable", "tokenizer"}
    with pytest.raises(ValueError, match="same ids"):
        cm.score_captions({1: "a"}, refs, metrics=("bleu",))
    with pytest.raises(ValueError, match="unknown metrics"):
        cm.score_captions({1: "a", 2: "b"}, refs, metrics=("bleurt",))
    with pytest.raises(ValueError, match="non-empty"):
        cm.score_captions({1: "a"}, {1: []}, metrics=("bleu",))


# ----------------------------------------------------------------------------------------------
# Java metrics
# ----------------------------------------------------------------------------------------------

def test_meteor_equals_pycocoevalcap(tokenized):
    pytest.importorskip("pycocoevalcap")
    jar, reason = cm.meteor_status()
    if jar is None:
        pytest.skip(reason)
    from pycocoevalcap.meteor.meteor import Meteor

    gts, res = tokenized
    ids = list(gts)
    ref_score, ref_scores = Meteor().compute_score(gts, res)
    score, scores = cm.compute_meteor([res[i][0] for i in ids], [gts[i] for i in ids])
    assert abs(score - ref_score) <= TOL
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=TOL)
    assert 0 < score < 1


def test_spice_reported_unavailable_without_its_jars(fixture_set):
    preds, refs = fixture_set
    jar, reason = cm.spice_status()
    if jar is not None:
        pytest.skip("SPICE's CoreNLP 3.6.0 jars are installed here; nothing to report")
    out = cm.score_captions(preds, refs, metrics=("spice",), tokenizer="python")
    assert out["spice"] is None
    assert out["unavailable"]["spice"] == reason and "SPICE" in reason


def test_without_java_everything_pure_python_still_works(monkeypatch, fixture_set):
    """CI without Java: the Python tokenizer is used and METEOR/SPICE say why they are missing."""
    monkeypatch.setattr(ptb.shutil, "which", lambda name: None)
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    preds, refs = fixture_set
    out = cm.score_captions(preds, refs)
    assert out["tokenizer"] == "python"
    assert out["meteor"] is None and out["spice"] is None
    assert "Java" in out["unavailable"]["meteor"] and "Java" in out["unavailable"]["spice"]
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"):
        assert isinstance(out[key], float) and 0 < out[key] < 10
