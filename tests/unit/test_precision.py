"""The one precision table (edgemm/precision.py): every precision has its own bars, mixed builds take
their lowest part's, and every module that names precisions reads the same table."""

import pytest

from edgemm import precision
from edgemm.errors import InputError
from edgemm.parity.gate import GateTolerances
from edgemm.parity.thresholds import DEFAULTS, defaults_for


def test_every_precision_has_its_own_bars():
    assert set(DEFAULTS) == set(precision.ORDER)
    bars = [defaults_for(name) for name in precision.ORDER]
    assert len(set(bars)) == len(bars)        # no precision borrows another's bars
    # Ordered by expected error: each bar is at most as strict as the one before.
    cos = [b.min_cosine for b in bars]
    assert cos == sorted(cos, reverse=True)
    drift = [GateTolerances.for_precision(name).max_abs_rel for name in precision.ORDER]
    assert drift == sorted(drift) and len(set(drift)) == len(drift)


def test_bf16_is_judged_by_bf16_bars_not_fp32():
    # Substring matching of "bf16" against ("fp32", "fp16", ...) found nothing and fell back to FP32.
    bf16 = defaults_for("bf16")
    assert bf16 != DEFAULTS["fp32"] and bf16 != DEFAULTS["fp16"]
    assert DEFAULTS["int8"].min_cosine < bf16.min_cosine < DEFAULTS["fp16"].min_cosine
    assert defaults_for("mixed:fp32+bf16") == bf16
    assert defaults_for("mixed:fp16+bf16") == bf16        # bf16 drifts more than fp16
    assert GateTolerances.for_precision("mixed:fp32+bf16").max_abs_rel == precision.TABLE["bf16"].max_abs_rel
    assert GateTolerances.for_precision("bf16") != GateTolerances.for_precision("fp32")


def test_mixed_takes_its_lowest_part():
    assert defaults_for("mixed:fp32+int8") == DEFAULTS["int8"]
    assert defaults_for("mixed:fp16+fp8+fp32") == DEFAULTS["fp8"]
    assert defaults_for({"mode": "mixed", "precisions": ["int8", "fp32"], "recipe": {}}) == DEFAULTS["int8"]
    assert defaults_for({"mode": "fp16", "recipe": {"name": "fp16"}}) == DEFAULTS["fp16"]


def test_parse_reads_every_form_and_round_trips():
    p = precision.Precision.of(["int8", "fp32", "fp32"], per_branch={"vision": "int8", "text": "fp32"})
    assert p.parts == ("fp32", "int8") and p.mode == "mixed" and p.lowest == "int8"
    assert p.label == "mixed:fp32+int8"
    section = p.to_manifest()
    assert section == {"mode": "mixed", "precisions": ["fp32", "int8"],
                       "per_branch": {"vision": "int8", "text": "fp32"}}
    again = precision.parse({**section, "recipe": {"name": "mixed"}, "notes": []})
    assert again == p and again.per_branch == {"vision": "int8", "text": "fp32"}
    assert precision.parse("mixed:fp32+int8") == p            # the text of older bundles and baselines
    assert precision.parse({"mode": "mixed:fp32+int8"}) == p
    assert precision.parse("fp16").to_manifest() == {"mode": "fp16"}
    # per_branch alone says which precisions a mixed build holds
    assert precision.parse({"mode": "mixed", "per_branch": {"vision": "bf16", "fusion": "fp32"}}).lowest == "bf16"


@pytest.mark.parametrize("bad", ["int4", "mixed:fp32+int3", "", None, 8, {"mode": "mixed"},
                                 {"mode": "mixed", "precisions": "fp32+int8"},
                                 {"mode": "int8", "per_branch": {"vision": "int9"}}])
def test_unknown_precisions_are_one_line_errors(bad):
    with pytest.raises(InputError) as info:
        precision.parse(bad)
    assert "\n" not in str(info.value)


def test_every_module_reads_the_one_table():
    from edgemm import config, targets
    from edgemm.quant import mixed

    assert targets.PRECISIONS == precision.ORDER
    assert mixed.POLICY_PRECISIONS == precision.ORDER
    assert config.PRECISIONS == precision.UNIFORM and set(config.PRECISIONS) <= set(precision.ORDER)
    for target in targets.all_targets():
        assert set(target.precisions) <= set(precision.ORDER), target.name
    assert mixed.mixed_mode_name(["bf16", "fp32"]) == "mixed:fp32+bf16"
    assert precision.QUANTIZED == ("int8", "fp8") and precision.LOW_FLOATS == ("fp16", "bf16")


def test_cpu_engine_requirements_read_precisions_not_substrings():
    from edgemm.quant.cpu_engines import X86_BF16, _requirements

    assert _requirements("openvino", "int8+bf16") == list(X86_BF16)
    assert _requirements("openvino", "fp32") == []
    with pytest.raises(InputError):
        _requirements("openvino", "xbf16")   # was a bf16 engine by substring


def test_config_reads_quantized_precisions_from_the_table(tmp_path):
    from edgemm.config import CompileConfig

    for policy in ("vision=int8", "default=INT8", "*=int8"):
        with pytest.raises(InputError, match="calibration"):
            CompileConfig(model="m.onnx", precision_policy=policy).validate()
    with pytest.raises(InputError, match="unknown precision 'bf17'"):
        CompileConfig(model="m.onnx", precision="bf17").validate()


def test_a_baseline_of_an_older_mixed_bundle_still_matches(tmp_path):
    from edgemm.parity.gate import check_context

    recorded = {"backend": "onnxruntime", "target": "cpu", "precision": "mixed:fp32+int8"}
    now = {"backend": "onnxruntime", "target": "cpu",
           "precision": precision.label_of({"mode": "mixed", "precisions": ["int8", "fp32"], "recipe": {}})}
    check_context(recorded, now, tmp_path / "baseline.json")          # same build: no refusal
    with pytest.raises(InputError, match="precision"):
        check_context(recorded, {**now, "precision": precision.label_of({"mode": "int8"})}, tmp_path / "b.json")


def test_bundle_precision_reads_old_and_new_manifests():
    from edgemm.runtime import Bundle
    from edgemm.runtime.manifest import PrecisionInfo

    for section in ({"mode": "mixed:fp32+int8"}, {"mode": "mixed", "precisions": ["fp32", "int8"]}):
        bundle = Bundle.__new__(Bundle)
        bundle.manifest = type("M", (), {"precision": PrecisionInfo(mode=section["mode"], section=section)})()
        assert bundle.precision == "mixed:fp32+int8"
        assert defaults_for(section) == DEFAULTS["int8"]
