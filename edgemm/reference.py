"""Run the source model (torch, or the original ONNX file) as the FP32 reference."""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import numpy as np

from .errors import EdgemmError, InputError, first_line
from .frontends import LoadedModel
from .model_outputs import flatten_outputs  # noqa: F401  (re-exported: prune/ imports it from here)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` for the block (None: unchanged)."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Reference:
    """Callable FP32 reference: feeds (numpy) -> {output name: numpy}."""

    def __init__(self, loaded: LoadedModel, input_names: Sequence[str],
                 output_names: Sequence[str] | None = None, *, names_from: str = "--output-names"):
        """``names_from``: where ``output_names`` came from, for the error when they do not fit (the
        compile's --output-names, or the bundle that `verify --reference` compares against)."""
        self.loaded = loaded
        self.names_from = names_from
        self.input_names = list(input_names)
        # Names for the flattened outputs, by position (tuple-returning models have none of their own).
        self.rename = list(output_names) if output_names else None
        self._ort = None
        if not loaded.is_torch:
            from .onnx_io import cpu_session

            try:
                self._ort = cpu_session(loaded.onnx_path)
            except Exception as exc:  # ORT raises its own exception types for graphs it cannot run
                first = first_line(exc)
                raise InputError(f"ONNX Runtime cannot load the model ({first})", file=loaded.source,
                                 fix="check the model with onnx.checker; re-export it") from exc
        self.output_names: list[str] | None = None
        if names_from == "--reference":
            self._check_takes_the_bundle_inputs()

    def _check_takes_the_bundle_inputs(self) -> None:
        """`verify --reference` of another model: say so up front, naming the reference, rather than a
        bare "no value for required input" once the first sample is bound."""
        if self._ort is not None:
            required = [i.name for i in self._ort.get_inputs()]
        else:
            required = list(self.loaded.signature.required) if self.loaded.signature is not None else []
        missing = [n for n in required if n not in self.input_names]
        if missing:
            raise InputError(f"requires input(s) {', '.join(missing)} that the bundle does not take (bundle "
                             f"inputs: {', '.join(self.input_names)})", file=self.loaded.source,
                             field="--reference", fix="pass the model this bundle was compiled from")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._ort is not None:
            names = [o.name for o in self._ort.get_outputs()]
            self.output_names = names
            return dict(zip(names, self._ort.run(names, dict(feeds))))
        import torch

        values = {n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names}
        with torch.inference_mode():
            try:
                out = self.loaded.call(values)
            except (EdgemmError, MemoryError):
                raise
            except Exception as exc:  # the model's own code refused the data (dtype, shape, index)
                raise model_refused(self.loaded.source, exc, feeds, self.input_names) from exc
        names, leaves = flatten_outputs(out)
        if self.rename:
            if len(self.rename) != len(names):
                if self.names_from == "--output-names":
                    raise InputError(f"the model returns {len(names)} outputs but {len(self.rename)} names were "
                                     f"given ({', '.join(self.rename)})", file=self.loaded.source,
                                     field="--output-names", fix=f"give exactly {len(names)} names")
                raise InputError(f"the model returns {len(names)} outputs but the bundle has {len(self.rename)} "
                                 f"({', '.join(self.rename)})", file=self.loaded.source, field=self.names_from,
                                 fix="pass the model this bundle was compiled from")
            names = self.rename
        self.output_names = names
        return {n: t.detach().cpu().numpy() for n, t in zip(names, leaves)}

    def callable_for(self, feeds: Mapping[str, np.ndarray], *, threads: int | None = None):
        """A zero-argument callable for latency measurement (conversion done once, outside the timing).
        ``threads``: intra-op threads for an ONNX reference (a torch reference: see ``torch_threads``)."""
        if self._ort is not None:
            sess, f = self._ort, dict(feeds)
            if threads:
                from .onnx_io import cpu_session

                sess = cpu_session(self.loaded.onnx_path, intra_op_threads=threads)
            return lambda: sess.run(None, f)
        import torch

        values = {n: torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names}
        args, kwargs = self.loaded.calling_convention(values).bind(values)
        module = self.loaded.module

        def call():
            with torch.inference_mode():
                return module(*args, **kwargs)
        return call


def model_refused(source, exc: BaseException, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> InputError:
    """A model whose forward() raised on the user's data (a float16 array into float32 weights, a width
    its Linear does not take, a token id past its embedding) is an input error naming what was fed,
    not an internal error."""
    fed = ", ".join(f"{n} {np.asarray(feeds[n]).dtype}{list(np.shape(feeds[n]))}" for n in names if n in feeds)
    return InputError(f"raised {type(exc).__name__}: {first_line(exc, limit=200)} on inputs {fed}",
                      file=source, field="forward()",
                      fix="give each input the dtype and shape the model takes (see `edgemm inspect MODEL "
                          "--data FILE`), or pass the model these data were made for")
