import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemm import zoo
from edgemm.errors import InputError
from edgemm.task import KNOWN_METRICS

torch = pytest.importorskip("torch")

NAMES = ("dual-encoder", "cross-attention", "early-fusion")
REPO = Path(__file__).resolve().parents[2]
# Chance level of each task (percent): uniform answers, or retrieving a random caption.
CHANCE = {"dual-encoder": 100 / 144, "cross-attention": 100 / 14, "early-fusion": 100 / 12}


@pytest.fixture(scope="module")
def eval_sets():
    return {name: zoo.make_data(name, "eval") for name in NAMES}


def _run(model, name, data):
    from edgemm.zoo import evaluate

    return evaluate.run(model, name, data)


def test_names_and_cards():
    assert zoo.names() == list(NAMES)
    for name in NAMES:
        card = zoo.get(name)
        assert card.name == name
        assert card.metric in KNOWN_METRICS
        assert set(card.metric_outputs) <= set(card.outputs)
        assert all(shape[0] == "batch" for _, shape, _ in card.inputs)
        assert math.isfinite(card.fp32_metric), "weights/metrics.json lacks this model"
    assert zoo.get("dual-encoder").outputs == ("image_embeds", "text_embeds", "logits_per_image")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(InputError) as info:
        zoo.get("resnet")
    assert all(name in str(info.value) for name in NAMES)
    with pytest.raises(InputError):
        zoo.build("resnet")


def test_package_import_stays_light():
    code = "import sys, edgemm.zoo as z; z.names(); z.get('dual-encoder'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", NAMES)
def test_data_matches_the_card_and_is_deterministic(name):
    card = zoo.get(name)
    calib = zoo.make_data(name, "calib", 6)
    assert sorted(calib) == sorted(card.input_names)  # inputs only, no labels
    for key, shape, dtype in card.inputs:
        assert calib[key].shape == (6, *shape[1:]) and calib[key].dtype == np.dtype(dtype)
    again = zoo.make_data(name, "calib", 9)
    for key in calib:
        np.testing.assert_array_equal(calib[key], again[key][:6])  # same seeds, n only extends
    train, evaluation = zoo.make_data(name, "train", 6), zoo.make_data(name, "eval", 6)
    assert train["labels"].dtype == np.int64 and evaluation["labels"].shape == (6,)
    assert not np.array_equal(train["image"], evaluation["image"])  # disjoint streams
    assert not np.array_equal(calib["image"], evaluation["image"])


def test_make_data_rejects_bad_arguments():
    with pytest.raises(InputError, match="split"):
        zoo.make_data("dual-encoder", "test")
    for n in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="sample count"):
            zoo.make_data("dual-encoder", "eval", n)


def test_text_inputs_use_padding_id_zero():
    ids = zoo.make_data("dual-encoder", "eval", 64)["input_ids"]
    assert (ids[:, 0] != 0).all() and (ids == 0).any()
    # Padding is trailing: once a row hits 0 it stays 0.
    padded = (ids == 0).astype(int)
    assert (np.diff(padded, axis=1) >= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_reproduce_the_recorded_metric(name, eval_sets):
    from edgemm.zoo import evaluate

    card = zoo.get(name)
    model = zoo.build(name)
    assert not model.training
    measured = evaluate.score(name, model, eval_sets[name])
    assert measured == pytest.approx(card.fp32_metric, abs=0.5)
    assert measured > max(80.0, 5 * CHANCE[name])
    untrained = evaluate.score(name, zoo.build(name, pretrained=False), eval_sets[name])
    assert untrained < measured - 40


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_are_small(name):
    from edgemm.zoo import registry

    assert registry.weights_path(name).stat().st_size < 2_000_000


@pytest.mark.parametrize("name", NAMES)
def test_shipped_calibration_set_is_the_calib_split(name):
    with np.load(REPO / "calib" / f"{name}.npz", allow_pickle=False) as shipped:
        expected = zoo.make_data(name, "calib")
        assert sorted(shipped.files) == sorted(expected)
        for key in expected:
            assert shipped[key].dtype == expected[key].dtype
            # allclose, not equal: another numpy build may round the FFT of the audio differently.
            np.testing.assert_allclose(shipped[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert (REPO / "calib" / f"{name}.npz").stat().st_size < 3_000_000


def test_dual_encoder_embeddings_are_unit_length_and_logits_consistent(eval_sets):
    model = zoo.build("dual-encoder")
    out = _run(model, "dual-encoder", {k: v[:16] for k, v in eval_sets["dual-encoder"].items()})
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=1), 1.0, rtol=1e-5)
    cosine = out["image_embeds"] @ out["text_embeds"].T
    scale = out["logits_per_image"] / cosine
    np.testing.assert_allclose(scale, np.median(scale), rtol=1e-3)
    assert 1.0 < np.median(scale) <= 100.0


@pytest.mark.parametrize("name", NAMES)
def test_write_example_files_load_and_match_build(name, tmp_path, eval_sets):
    paths = zoo.write_example(name, tmp_path)
    assert {p.name for p in paths.values()} == {"model.pt", "model.pt2", "calib.npz", "eval.npz"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "eval.npz", "model.pt", "model.pt2"]

    card = zoo.get(name)
    with np.load(paths["calib"]) as calib:
        assert sorted(calib.files) == sorted(card.input_names)
    with np.load(paths["eval"]) as evaluation:
        assert "labels" in evaluation.files and evaluation["labels"].dtype == np.int64

    reference = zoo.build(name)
    scripted = torch.jit.load(str(paths["torchscript"]))
    program = torch.export.load(str(paths["exported_program"])).module()
    for batch in (1, 7):  # neither is the batch of 2 used to trace/export: the batch dim must be dynamic
        data = {k: v[:batch] for k, v in eval_sets[name].items()}
        expected = _run(reference, name, data)
        for loaded in (scripted, program):
            got = _run(loaded, name, data)
            for key in card.outputs:
                np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)
