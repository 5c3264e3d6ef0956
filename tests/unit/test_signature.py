"""The calling convention: which parameters are inputs, and how forward() is called with them."""

import inspect

import pytest
import torch

from edgemm.errors import InputError
from edgemm.signature import from_callable, from_program, from_torchscript


class HFStyle(torch.nn.Module):
    """Like a Hugging Face model: optional inputs, flags with defaults, **kwargs."""

    def forward(self, input_ids, pixel_values=None, attention_mask=None, return_loss=None,
                interpolate_pos_encoding: bool = False, **kwargs):
        out = input_ids.float().sum(1, keepdim=True)
        if pixel_values is not None:
            out = out + pixel_values.sum(1, keepdim=True)
        if attention_mask is not None:
            out = out * 2
        return out


class KeywordOnly(torch.nn.Module):
    def forward(self, *, a, b):
        return a - b


def test_inputs_are_required_plus_optional_ones_in_the_data():
    sig = from_callable(HFStyle().forward)
    assert sig.required == ["input_ids"]
    assert sig.var_keyword
    assert sig.select(["attention_mask", "input_ids"]) == ["input_ids", "attention_mask"]
    with pytest.raises(InputError, match="missing required input 'input_ids'"):
        sig.select(["pixel_values"])
    with pytest.raises(InputError, match="'labels' is not a parameter"):
        sig.select(["input_ids", "labels"])


def test_bind_passes_positionally_until_a_gap_then_by_keyword():
    sig = from_callable(HFStyle().forward)
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)
    args, kwargs = sig.bind({"input_ids": ids, "attention_mask": mask})
    assert args == (ids,) and list(kwargs) == ["attention_mask"]
    model = HFStyle()
    assert torch.equal(sig.call(model, {"input_ids": ids, "attention_mask": mask}),
                       model(ids, attention_mask=mask))


def test_keyword_only_forward_is_called_with_keywords():
    sig = from_callable(KeywordOnly().forward)
    a, b = torch.ones(2), torch.zeros(2)
    assert sig.bind({"a": a, "b": b}) == ((), {"a": a, "b": b})
    assert torch.equal(sig.call(KeywordOnly(), {"b": b, "a": a}), a - b)


def test_positional_only_gap_gets_its_default():
    def f(x, y=None, z=None, /):
        return x, y, z
    sig = from_callable(f)
    assert sig.bind({"x": 1, "z": 3}) == ((1, None, 3), {})


def test_torchscript_schema_defaults_are_optional():
    class M(torch.nn.Module):
        def forward(self, x, scale: float = 2.0):
            return x * scale
    sig = from_torchscript(torch.jit.script(M()))
    assert sig.required == ["x"] and sig.names == ["x", "scale"]


def test_keyword_exported_program_is_called_with_keywords():
    class M(torch.nn.Module):
        def forward(self, a, b):
            return a + 2 * b
    kw = {"b": torch.randn(2, 3), "a": torch.randn(2, 3)}
    program = torch.export.export(M(), (), kwargs=kw)
    sig = from_program(program, list(program.graph_signature.user_inputs))
    assert sig.names == ["b", "a"] and sig.required == ["b", "a"]
    assert sig.bind(kw) == ((), kw)
    assert torch.allclose(sig.call(program.module(), kw), kw["a"] + 2 * kw["b"])
    positional = torch.export.export(M(), (kw["a"], kw["b"]))
    sig = from_program(positional, list(positional.graph_signature.user_inputs))
    assert sig.bind({"a": kw["a"], "b": kw["b"]})[1] == {}
    assert "self" not in inspect.signature(M().forward).parameters
