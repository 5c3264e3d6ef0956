"""The FP32 reference names its outputs after the bundle (verify) or --output-names (compile); a model
whose outputs do not fit says which of the two is wrong."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgemm.errors import InputError  # noqa: E402
from edgemm.frontends.base import LoadedModel  # noqa: E402
from edgemm.reference import Reference  # noqa: E402


def _loaded():
    return LoadedModel(source="other.pt2", format="factory", sha256="", name="other",
                       module=torch.nn.Linear(4, 2).eval(), input_names=["x"])


@pytest.mark.parametrize("names_from, field, fix", [
    ("--output-names", "--output-names", "give exactly 1 names"),
    ("--reference", "--reference", "pass the model this bundle was compiled from"),
])
def test_outputs_that_do_not_fit_name_their_source(names_from, field, fix):
    ref = Reference(_loaded(), ["x"], ["image_embeds", "text_embeds"], names_from=names_from)
    with pytest.raises(InputError) as info:
        ref.run({"x": np.zeros((2, 4), np.float32)})
    assert info.value.field == field and info.value.fix == fix and info.value.file == "other.pt2"


def test_outputs_that_fit_are_renamed():
    ref = Reference(_loaded(), ["x"], ["logits"], names_from="--reference")
    assert list(ref.run({"x": np.zeros((3, 4), np.float32)})) == ["logits"]


def test_a_reference_for_other_inputs_is_refused_naming_it():
    """`verify --reference` of a model taking other inputs: one line naming the reference and both input
    lists (it was a bare "image: no value for required input 'image'" with no file)."""
    from edgemm.signature import positional

    loaded = _loaded()
    loaded.signature = positional(["image", "tokens"], "forward()")
    with pytest.raises(InputError, match=r"requires input\(s\) image, tokens that the bundle does not take "
                                         r"\(bundle inputs: audio, input_ids\)") as info:
        Reference(loaded, ["audio", "input_ids"], ["logits"], names_from="--reference")
    assert info.value.file == "other.pt2" and info.value.field == "--reference"
    loaded.signature = positional(["audio", "input_ids"], "forward()")
    Reference(loaded, ["audio", "input_ids"], ["logits"], names_from="--reference")
