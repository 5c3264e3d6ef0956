import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgemm.errors import InputError
from edgemm import task as task_metrics
from edgemm.task import KNOWN_METRICS, compute


def test_known_metrics():
    assert KNOWN_METRICS == ("top1", "recall@1")


def test_top1_counts_argmax_hits():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]], dtype=np.float32)
    assert compute("top1", {"logits": logits}, np.array([0, 1, 1]), ["logits"]) == pytest.approx(200 / 3)


def test_top1_reads_the_first_named_output():
    good = np.eye(3, dtype=np.float32)
    bad = np.roll(good, 1, axis=1)
    outputs = {"a": bad, "b": good}
    labels = np.arange(3)
    assert compute("top1", outputs, labels, ["b", "a"]) == 100.0
    assert compute("top1", outputs, labels, ["a", "b"]) == 0.0


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 6)),
              elements=st.floats(-10, 10, width=32)), st.data())
def test_top1_matches_a_direct_count(logits, data):
    labels = np.array(data.draw(st.lists(st.integers(0, logits.shape[1] - 1), min_size=logits.shape[0],
                                         max_size=logits.shape[0])))
    expected = 100.0 * np.mean(logits.argmax(1) == labels)
    assert compute("top1", {"y": logits}, labels, ["y"]) == pytest.approx(expected)


def _embeddings():
    # Three samples; captions 0 and 2 mean the same thing (label 7).
    image = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    text = np.array([[0.8, 0.2], [0.1, 0.9], [1.0, 0.0]])
    return image, text, np.array([7, 3, 7])


def test_recall_accepts_a_duplicate_caption_as_correct():
    image, text, labels = _embeddings()
    # Image 0 retrieves caption 2 (not its own), which has the same label: still correct.
    assert np.argmax(image[0] @ text.T) == 2
    assert compute("recall@1", {"i": image, "t": text}, labels, ["i", "t"]) == 100.0


def test_recall_counts_a_wrong_meaning_as_a_miss():
    image, text, _ = _embeddings()
    assert compute("recall@1", {"i": image, "t": text}, np.array([7, 3, 5]), ["i", "t"]) == pytest.approx(200 / 3)


def test_recall_normalises_the_embeddings():
    image = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Unnormalised, caption 1 (long vector) would win for both images.
    text = np.array([[1.0, 0.1], [5.0, 5.5]])
    labels = np.array([0, 1])
    assert compute("recall@1", {"i": image, "t": text}, labels, ["i", "t"]) == 100.0
    assert np.argmax(image[0] @ text.T) == 1  # what an unnormalised dot product would pick


def test_recall_in_chunks_matches_one_block(monkeypatch):
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    image[:25] = text[:25] + 0.1 * rng.normal(size=(25, 8))
    labels = rng.integers(0, 10, size=50)
    whole = compute("recall@1", {"i": image, "t": text}, labels, ["i", "t"])
    monkeypatch.setattr(task_metrics, "_CHUNK", 7)
    assert compute("recall@1", {"i": image, "t": text}, labels, ["i", "t"]) == whole
    assert whole >= 50.0


def test_non_finite_rows_count_as_wrong():
    logits = np.array([[5.0, 0.0], [np.nan, 0.0]])
    assert compute("top1", {"y": logits}, np.array([0, 0]), ["y"]) == 50.0
    image = np.eye(2)
    text = np.array([[1.0, 0.0], [np.inf, 1.0]])
    # Caption 1 is broken: image 1 cannot retrieve it, and retrieves caption 0 (wrong label).
    assert compute("recall@1", {"i": image, "t": text}, np.array([0, 1]), ["i", "t"]) == 50.0


@pytest.mark.parametrize("metric, outputs, labels, names, fragment", [
    ("accuracy", {"y": np.zeros((2, 2))}, np.zeros(2, int), ["y"], "unknown task metric"),
    ("top1", {"y": np.zeros((2, 2))}, np.zeros(2, int), ["z"], "'z' is missing"),
    ("top1", {"y": np.zeros((3, 2))}, np.zeros(2, int), ["y"], "'y' must be [N=2"),
    ("top1", {"y": np.zeros(2)}, np.zeros(2, int), ["y"], "'y' must be [N=2"),
    ("top1", {"y": np.zeros((2, 2))}, np.zeros((2, 1), int), ["y"], "labels"),
    ("top1", {"y": np.zeros((2, 2))}, np.zeros(2), ["y"], "labels"),
    ("recall@1", {"i": np.zeros((2, 4))}, np.zeros(2, int), ["i"], "reads 2 outputs"),
    ("recall@1", {"i": np.zeros((2, 4)), "t": np.zeros((2, 3))}, np.zeros(2, int), ["i", "t"], "widths differ"),
    ("recall@1", {"i": np.zeros((2, 4)), "t": np.zeros((3, 4))}, np.zeros(2, int), ["i", "t"], "'t' must be"),
])
def test_bad_inputs_raise_input_error_naming_the_problem(metric, outputs, labels, names, fragment):
    with pytest.raises(InputError) as info:
        compute(metric, outputs, labels, names)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# -- how a task is found (edgemm.task: zoo sidecar, manifest, --metric, guess) ------------------------

def test_a_task_is_found_from_the_sidecar_the_manifest_the_user_or_the_outputs():
    from edgemm import task

    assert task.from_sidecar({"metric": "top1", "metric_outputs": ["logits"]}) == \
        {"metric": "top1", "outputs": ["logits"], "zoo": None}
    assert task.from_sidecar({"zoo": "x"}) is None and task.from_sidecar(None) is None
    known = {"metric": "recall@1", "outputs": ["img", "txt"]}
    names = ["img", "txt", "scores"]
    assert task.resolve(names, known=known) == ("recall@1", ["img", "txt"])           # the manifest's
    assert task.resolve(names, heads={"scores": True}) == ("top1", ["scores"])        # a linear head
    assert task.resolve(["image_embeds", "text_embeds"]) == ("recall@1", ["image_embeds", "text_embeds"])
    assert task.resolve(names) is None
    assert task.resolve(names, metric="top1", metric_outputs=["img"], known=known) == ("top1", ["img"])
    assert task.resolve(names, metric="recall@1", known=known) == ("recall@1", ["img", "txt"])
    with pytest.raises(InputError, match="unknown metric 'f1'"):
        task.resolve(names, metric="f1")
    # what the accuracy search asks: the outputs a metric reads, with its own top-1 fallback
    assert task.outputs_for("top1", names, known=("top1", None), top1_fallback=["scores"]) == ["scores"]
    assert task.outputs_for("recall@1", names, known=("top1", ["scores"])) is None
