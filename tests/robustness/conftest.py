import pytest

from tests.robustness.make_corpus import good_from


@pytest.fixture(scope="session")
def good(tiny, tiny_bundle, tmp_path_factory):
    """The valid artefacts the corpus is made from: the tiny model as .pt/.pt2/.onnx, its calibration
    data and one compiled FP32 bundle (shared; cases copy it before tampering)."""
    return good_from(tiny, tiny_bundle, tmp_path_factory.mktemp("good"))
