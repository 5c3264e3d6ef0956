"""config.pbtxt for Triton, from bundle manifests: every flavor parsed against Triton's own ModelConfig
schema (tritonclient's model_config_pb2), and the fields a server reads checked value by value."""

import pytest

from edgemm.errors import InputError
from edgemm.iospec import DimRange, TensorSpec
from edgemm.runtime.manifest import Manifest
from edgemm.serving.triton_config import TritonOptions, find_batching, model_config, to_pbtxt

text_format = pytest.importorskip("google.protobuf.text_format")
mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")

BATCH = {"batch": DimRange(1, 1, 64)}
IMAGE = TensorSpec("image", "float32", ("batch", 3, 32, 32), BATCH)
IDS = TensorSpec("input_ids", "int64", ("batch", "seq"), {**BATCH, "seq": DimRange(1, 12, 128)})
LOGITS = TensorSpec("logits", "float32", ("batch", 14))
SIMILARITY = TensorSpec("logits_per_image", "float32", ("batch", "batch"))


def _manifest(backend: dict, **sections) -> Manifest:
    """A bundle's typed manifest with ``backend`` (the fields serving reads; the rest minimal but valid)."""
    return Manifest.from_dict({
        "format": "edgemm-bundle", "format_version": 2, "name": "m", "inputs": [IMAGE.to_dict(), IDS.to_dict()],
        "outputs": [LOGITS.to_dict()], "precision": {"mode": "fp32"}, "target": {"name": "cpu"}, "backend": backend,
        "files": {"model.onnx": "0" * 64}, **sections})


def ort_manifest(**backend):
    return _manifest({"name": "onnxruntime", "model": "model.onnx", **backend})


def trt_manifest(**backend):
    return _manifest({"name": "tensorrt", "engine": "model.engine", "portable": False, "compute_capability": "8.7",
                      "built": {"compute_capability": "8.7"}, **backend})


def parsed(config: dict):
    """The config through Triton's schema: unknown fields, wrong types or enum names raise here."""
    return text_format.Parse(to_pbtxt(config), mc.ModelConfig())


def test_edgemm_flavor_batched_python_backend():
    opts = TritonOptions(preferred_batch=(4, 8), max_queue_delay_us=500, instances=2)
    msg = parsed(model_config("vqa", ort_manifest(), [IMAGE, IDS], [LOGITS], opts))
    assert msg.backend == "python" and not msg.platform
    assert msg.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in msg.input] == [
        ("image", mc.TYPE_FP32, [3, 32, 32]), ("input_ids", mc.TYPE_INT64, [-1])]
    assert [(o.name, list(o.dims)) for o in msg.output] == [("logits", [14])]
    assert list(msg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert msg.dynamic_batching.max_queue_delay_microseconds == 500
    assert msg.instance_group[0].count == 2 and msg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert msg.version_policy.latest.num_versions == 1
    assert msg.parameters["edgemm.require_signature"].string_value == "false"


def test_max_batch_lowers_the_bundle_bound_and_never_raises_it():
    msg = parsed(model_config("m", ort_manifest(), [IMAGE], [LOGITS], TritonOptions(max_batch=8)))
    assert msg.max_batch_size == 8
    with pytest.raises(InputError, match="--max-batch: 65 is above the bundle's batch bound 64"):
        model_config("m", ort_manifest(), [IMAGE], [LOGITS], TritonOptions(max_batch=65))
    with pytest.raises(InputError, match="--preferred-batch: 16 is above max_batch_size 8"):
        model_config("m", ort_manifest(), [IMAGE], [LOGITS], TritonOptions(max_batch=8, preferred_batch=(16,)))


def test_output_spanning_the_batch_twice_is_not_batched():
    """A [batch, batch] similarity computed over a dynamic batch would mix requests: max_batch_size 0,
    full dims with -1 for the batch, no dynamic batcher, and batching flags refused."""
    opts = TritonOptions()
    msg = parsed(model_config("clip", ort_manifest(), [IMAGE, IDS], [LOGITS, SIMILARITY], opts))
    assert msg.max_batch_size == 0 and not msg.HasField("dynamic_batching")
    assert list(msg.input[0].dims) == [-1, 3, 32, 32] and list(msg.output[1].dims) == [-1, -1]
    assert any("logits_per_image" in n for n in opts.notes)
    with pytest.raises(InputError, match="--preferred-batch: requests to this bundle cannot be batched"):
        model_config("clip", ort_manifest(), [IMAGE], [SIMILARITY], TritonOptions(preferred_batch=(2,)))
    # sibling causes: no shared batch axis, a batch minimum above 1, no range to bound it
    assert find_batching([IMAGE, TensorSpec("x", "float32", (3,))], [LOGITS]).max_batch == 0
    assert find_batching([TensorSpec("x", "float32", ("batch", 3), {"batch": DimRange(2, 2, 8)})],
                         [LOGITS]).max_batch == 0
    assert find_batching([TensorSpec("x", "float32", ("batch", 3))], [LOGITS]).max_batch == 0


def test_native_onnxruntime_carries_the_bundle_session_settings():
    opts = TritonOptions(flavor="native")
    manifest = ort_manifest(intra_op_threads=1, disabled_optimizers=["SkipLayerNormFusion"])
    msg = parsed(model_config("m", manifest, [IMAGE, IDS], [LOGITS], opts))
    assert msg.platform == "onnxruntime_onnx" and msg.default_model_filename == "model.onnx"
    assert msg.parameters["intra_op_thread_count"].string_value == "1"
    assert msg.parameters["edgemm.disabled_optimizers"].string_value == "SkipLayerNormFusion"
    assert any("SkipLayerNormFusion" in n for n in opts.notes)  # said out loud: the backend cannot apply it


def test_native_tensorrt_engine_and_refusals():
    manifest = trt_manifest(options={"profiles": [{}, {}]})
    msg = parsed(model_config("m", manifest, [IMAGE], [LOGITS], TritonOptions(flavor="native")))
    assert msg.platform == "tensorrt_plan" and msg.default_model_filename == "model.plan"
    assert msg.cc_model_filenames["8.7"] == "model.plan"
    assert msg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert list(msg.instance_group[0].profile) == ["0", "1"]
    portable = trt_manifest(portable=True, engine=None, built=None)
    for flavor in ("native", "edgemm"):   # the runtime would refuse it on the server too
        with pytest.raises(InputError, match="backend.engine: is a portable TensorRT bundle with no engine yet"):
            model_config("m", portable, [IMAGE], [LOGITS], TritonOptions(flavor=flavor))
    with pytest.raises(InputError, match="--kind: a TensorRT model runs on the GPU only"):
        model_config("m", manifest, [IMAGE], [LOGITS], TritonOptions(flavor="native", kind="cpu"))
    with pytest.raises(InputError, match="--kind: this bundle's runtime runs on the CPU"):
        model_config("m", ort_manifest(), [IMAGE], [LOGITS], TritonOptions(kind="gpu"))


def test_scalar_outputs_and_odd_names_survive_the_schema():
    scalar = TensorSpec('we"ird\\name\n', "float32", ("batch",))
    msg = parsed(model_config("m", ort_manifest(), [IMAGE], [scalar], TritonOptions()))
    assert msg.output[0].name == 'we"ird\\name\n'
    assert list(msg.output[0].dims) == [1] and list(msg.output[0].reshape.shape) == []


def test_dynamic_int8_keeps_client_batches_but_never_merges_requests():
    """Dynamic INT8 scales activations per batch: a client's batch runs as sent (max_batch_size kept),
    but the dynamic batcher must not merge requests (an answer would depend on other clients')."""
    why = "dynamic INT8 quantizes activations with one scale per batch"
    opts = TritonOptions()
    msg = parsed(model_config("m", ort_manifest(), [IMAGE], [LOGITS], opts, rows_mix=why))
    assert msg.max_batch_size == 64 and not msg.HasField("dynamic_batching")
    assert any(why in n for n in opts.notes)
    assert parsed(model_config("m", ort_manifest(), [IMAGE], [LOGITS], TritonOptions(max_batch=4),
                               rows_mix=why)).max_batch_size == 4
    with pytest.raises(InputError, match="--max-queue-delay-us: requests to this bundle must not be merged"):
        model_config("m", ort_manifest(), [IMAGE], [LOGITS], TritonOptions(max_queue_delay_us=10), rows_mix=why)


def split_manifest(fusion_out=LOGITS):
    """A split bundle's manifest (edgemm compile --split): vision and text towers, then the fusion head."""
    vis = TensorSpec("vision.embeds", "float32", ("batch", 16), BATCH)
    txt = TensorSpec("text.embeds", "float32", ("batch", 8), BATCH)
    parts = [{"name": "vision", "inputs": [IMAGE.to_dict()], "outputs": [vis.to_dict()], "after": [],
              "backend": {"model": "parts/vision.onnx"}},
             {"name": "text", "inputs": [IDS.to_dict()], "outputs": [txt.to_dict()], "after": [],
              "backend": {"model": "parts/text.onnx"}},
             {"name": "fusion", "inputs": [vis.to_dict(), txt.to_dict()], "outputs": [fusion_out.to_dict()],
              "after": ["vision", "text"], "backend": {"model": "parts/fusion.onnx"}}]
    return _manifest({"name": "onnxruntime", "model": "model.onnx"}, requires=["pipeline"],
                     pipeline={"format": "edgemm-pipeline", "version": 1, "parts": parts})


@pytest.mark.parametrize("flavor", ["edgemm", "native"])
def test_split_bundle_becomes_an_ensemble_of_its_parts(flavor):
    from edgemm.serving.triton_ensemble import ensemble_configs

    opts = TritonOptions(flavor=flavor, max_queue_delay_us=100)
    ensemble, parts = ensemble_configs("vqa", split_manifest(), [IMAGE, IDS], [LOGITS], opts, source="b",
                                       rows_mix={"text": "dynamic INT8 quantizes activations"})
    msg = parsed(ensemble)
    assert msg.platform == "ensemble" and msg.max_batch_size == 64
    steps = [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in msg.ensemble_scheduling.step]
    assert steps == [("vqa.vision", {"image": "image"}, {"vision.embeds": "vision.embeds"}),
                     ("vqa.text", {"input_ids": "input_ids"}, {"text.embeds": "text.embeds"}),
                     ("vqa.fusion", {"vision.embeds": "vision.embeds", "text.embeds": "text.embeds"},
                      {"logits": "logits"})]
    by_name = {name: parsed(config) for name, config, _ in parts}
    assert [list(by_name["vqa.fusion"].input[i].dims) for i in range(2)] == [[16], [8]]
    assert not by_name["vqa.text"].HasField("dynamic_batching")        # its rows mix: never merged
    assert by_name["vqa.vision"].HasField("dynamic_batching")
    if flavor == "edgemm":
        assert by_name["vqa.text"].parameters["edgemm.part"].string_value == "text"
        assert by_name["vqa.text"].backend == "python"
    else:
        assert by_name["vqa.text"].platform == "onnxruntime_onnx"
        assert by_name["vqa.text"].default_model_filename == "text.onnx"


def test_ensemble_batches_all_parts_or_none():
    """One part that cannot batch (a [batch, batch] output) turns batching off for every step."""
    from edgemm.serving.triton_ensemble import ensemble_configs

    opts = TritonOptions()
    ensemble, parts = ensemble_configs("clip", split_manifest(SIMILARITY), [IMAGE, IDS], [SIMILARITY], opts,
                                       source="b", rows_mix={})
    assert parsed(ensemble).max_batch_size == 0
    assert all(parsed(config).max_batch_size == 0 and "dynamic_batching" not in config for _, config, _ in parts)
    assert list(parsed(parts[0][1]).input[0].dims) == [-1, 3, 32, 32]
    assert any("ensemble and its parts" in n for n in opts.notes)


def test_monitor_is_asked_of_the_ensemble_parts_reading_the_model_inputs():
    """--monitor on a split bundle: the towers (reading the model's inputs) check them; the fusion part
    reads interface tensors only, which no calibration profile describes."""
    from edgemm.serving.triton_ensemble import ensemble_configs

    opts = TritonOptions(monitor=True)
    _, parts = ensemble_configs("vqa", split_manifest(), [IMAGE, IDS], [LOGITS], opts, source="b", rows_mix={})
    assert [parsed(config).parameters["edgemm.monitor"].string_value for _, config, _ in parts] == \
        ["true", "true", "false"]
    assert any("--monitor checks the model's inputs in the parts reading them (vqa.vision, vqa.text)" in n
               for n in opts.notes)
