import pytest

from edgemm.errors import InputError
from edgemm.iospec import TensorSpec, apply_dynamic_axes, parse_dynamic_flag, parse_input_flag


def test_parse_input_flag():
    s = parse_input_flag("image:1x3x224x224:float32")
    assert (s.name, s.dtype, s.shape) == ("image", "float32", (1, 3, 224, 224))


@pytest.mark.parametrize("bad", ["image:1x3:float", "image:1x0:float32", "image", "image:axb:int64"])
def test_bad_input_flags(bad):
    with pytest.raises(InputError, match="--input"):
        parse_input_flag(bad)


def test_dynamic_axes_batch_and_sequence():
    specs = [TensorSpec("input_ids", "int64", (1, 77))]
    out = apply_dynamic_axes(specs, [parse_dynamic_flag("input_ids:1=1:77:128")])
    assert out[0].shape == ("batch", "input_ids_dim1")
    assert out[0].ranges["input_ids_dim1"].max == 128


def test_dynamic_flag_errors():
    with pytest.raises(InputError, match="MIN <= OPT <= MAX"):
        parse_dynamic_flag("x:1=5:2:9")
    with pytest.raises(InputError, match="unknown input"):
        apply_dynamic_axes([TensorSpec("a", "float32", (1, 2))], [parse_dynamic_flag("b:1=1:2:3")])


def test_concrete_shape_batch_takes_the_requested_size_within_its_range():
    from edgemm.iospec import DimRange, TensorSpec

    spec = TensorSpec("ids", "int64", ("batch", "seq"), {"batch": DimRange(1, 1, 64), "seq": DimRange(8, 32, 64)})
    assert spec.concrete_shape(3) == (3, 32)        # batch follows the request, seq its opt
    assert spec.concrete_shape(500) == (64, 32)     # clamped to the declared range
    static = TensorSpec("x", "float32", (4, "seq"), {"seq": DimRange(8, 16, 64)})
    assert static.concrete_shape(3) == (4, 16)
