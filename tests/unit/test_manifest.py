"""The typed, versioned manifest: old bundles still load, new sections survive a round trip, and a
section a reader must understand is refused by a reader that does not know it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemm import runtime
from edgemm.errors import BundleError
from edgemm.runtime import manifest as mf

V1_BUNDLE = Path(__file__).parents[1] / "fixtures" / "bundle_v1"   # written by edgemm before format 2


@pytest.fixture
def v1_copy(tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(V1_BUNDLE, dest)
    return dest


def _edit(bundle: Path, change) -> None:
    path = bundle / mf.MANIFEST_NAME
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_a_format_1_bundle_still_loads_and_runs(v1_copy):
    manifest = mf.load_manifest(v1_copy)
    assert manifest.format_version == 1 and mf.FORMAT_VERSION >= 2
    assert manifest.name == "tiny" and manifest.backend.name == "onnxruntime"
    assert manifest.backend.model_file == "model.onnx" and manifest.precision.label == "fp32"
    assert manifest.input_names == ["image", "input_ids"] and manifest.output_names == ["logits", "text_embeds"]
    assert manifest.source.format == "torchscript" and manifest.requires == ()
    bundle = runtime.load(v1_copy)
    out = bundle.run({"image": np.zeros((2, 3, 16, 16), np.float32), "input_ids": np.ones((2, 8), np.int64)})
    assert out["logits"].shape == (2, 5)


def test_to_dict_is_the_document_as_read_with_unknown_sections(v1_copy):
    _edit(v1_copy, lambda d: d.update(future_section={"inputs": {"image": {"mean": 0.5}}}))
    manifest = mf.load_manifest(v1_copy)
    assert manifest.section("future_section") == {"inputs": {"image": {"mean": 0.5}}}
    assert manifest.to_dict() == json.loads((v1_copy / mf.MANIFEST_NAME).read_text())
    # a copy: editing it (as refit and build do before writing) leaves the loaded manifest as validated
    manifest.to_dict()["files"].clear()
    assert manifest.files and manifest.to_dict()["future_section"]


def test_a_registered_section_is_parsed_once_and_its_errors_name_the_field(v1_copy, monkeypatch):
    def parse(value, bad):
        if not isinstance(value.get("mean"), float):
            raise bad("must be a number", "mean")
        return ("profile", value["mean"])

    monkeypatch.setattr(mf, "_SECTIONS", {})
    mf.register_section("calibration_profile", parse)
    _edit(v1_copy, lambda d: d.update(calibration_profile={"mean": 0.25}))
    assert mf.load_manifest(v1_copy).section("calibration_profile") == ("profile", 0.25)
    _edit(v1_copy, lambda d: d.update(calibration_profile={"mean": "x"}))
    with pytest.raises(BundleError, match=r"calibration_profile\.mean: must be a number"):
        mf.load_manifest(v1_copy)
    with pytest.raises(ValueError, match="already registered"):
        mf.register_section("calibration_profile", lambda v, bad: v)
    with pytest.raises(ValueError, match="core manifest key"):
        mf.register_section("backend", parse)


def test_a_critical_section_is_required_of_readers(monkeypatch):
    monkeypatch.setattr(mf, "_SECTIONS", {})
    mf.register_section("variants", lambda value, bad: tuple(value), critical=True)
    doc = json.loads(json.dumps(mf.manifest_document(
        {**json.loads((V1_BUNDLE / mf.MANIFEST_NAME).read_text()), "variants": ["avx512_vnni"]})))
    assert doc["format_version"] == mf.FORMAT_VERSION and doc["requires"] == ["variants"]
    assert mf.Manifest.from_dict(doc).section("variants") == ("avx512_vnni",)
    monkeypatch.setattr(mf, "_SECTIONS", {})   # a reader that does not know the section
    with pytest.raises(BundleError, match="variants: the bundle needs manifest section 'variants'.*upgrade edgemm"):
        mf.Manifest.from_dict(doc)
    # "requires" only exists from format 2 on, and must name sections the manifest has
    with pytest.raises(BundleError, match="requires"):
        mf.Manifest.from_dict({**doc, "format_version": 1})
    with pytest.raises(BundleError, match="requires: names section 'pipeline'"):
        mf.Manifest.from_dict({**doc, "requires": ["pipeline"]})


def test_a_compiled_bundle_is_written_at_the_current_format(tiny_bundle):
    doc = json.loads((tiny_bundle / mf.MANIFEST_NAME).read_text())
    assert doc["format_version"] == mf.FORMAT_VERSION
    assert "requires" not in doc   # nothing critical in a plain bundle: a reader needs nothing new
    manifest = mf.load_manifest(tiny_bundle)
    assert manifest.to_dict() == doc and manifest.target.name == doc["target"]["name"]


def test_precision_reads_the_old_text_form_and_the_structured_one(v1_copy):
    _edit(v1_copy, lambda d: d["precision"].update(mode="mixed:fp32+int8"))
    old = mf.load_manifest(v1_copy).precision
    _edit(v1_copy, lambda d: d["precision"].update(mode="mixed", precisions=["fp32", "int8"],
                                                     per_branch={"vision": "int8", "text": "fp32"}))
    new = mf.load_manifest(v1_copy).precision
    assert old.label == new.label == "mixed:fp32+int8"
    assert new.value.per_branch == {"vision": "int8", "text": "fp32"} and old.value.parts == ("fp32", "int8")


def test_a_feed_that_is_not_an_array_is_one_line_naming_it():
    """iospec.check_feed: the runtime's (and a split part's) check of what a caller feeds."""
    import numpy as np

    from edgemm import runtime
    from edgemm.errors import InputError

    bundle = runtime.load(V1_BUNDLE)
    ids = np.zeros((1, 8), np.int64)
    with pytest.raises(InputError, match=r"^image: expected a numpy array, got list \(fix: wrap it with numpy"):
        bundle.run({"image": [[0.0]], "input_ids": ids})
    with pytest.raises(InputError, match=r"^feeds: input_ids: dtype int32 but expected int64"):
        bundle.run({"image": np.zeros((1, 3, 16, 16), np.float32), "input_ids": ids.astype(np.int32)})
