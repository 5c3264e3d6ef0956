"""What every frontend returns."""

from __future__ import annotations

import logging
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError
from ..iospec import TensorSpec
from ..signature import Signature, positional

log = logging.getLogger("edgemm")


@dataclass
class LoadOptions:
    weights: str | None = None          # for factories: .safetensors or a state_dict .pt
    trust_pickle: bool = False          # run the file's code: unpickle a full nn.Module, and let TorchScript /
                                        # .pt2 programs call operators outside op_policy's allow-list


@dataclass
class LoadedModel:
    source: str                         # path or package.module:function, as given
    format: str                         # torchscript | exported_program | onnx | factory | pickle
    sha256: str                         # of the model file (and weights file, for factories)
    name: str                           # default bundle name
    module: Any = None                  # a callable torch module (None for ONNX)
    onnx_path: Path | None = None       # for ONNX inputs
    input_names: list[str] | None = None
    input_specs: list[TensorSpec] | None = None   # when the format itself carries them
    example_inputs: tuple | None = None           # .pt2 example inputs
    notes: list[str] = field(default_factory=list)
    signature: Signature | None = None  # how forward() takes its inputs (torch formats)

    @property
    def is_torch(self) -> bool:
        return self.module is not None

    def call(self, values: Mapping[str, Any], module=None):
        """Run ``module`` (default: this model's own; a pruned copy takes the same inputs) on ``values``
        (input name -> tensor), the way its forward() takes them. Every stage calls the model through
        this, so keyword-only parameters and keyword-exported programs work everywhere."""
        return self.calling_convention(values).call(self.module if module is None else module, values)

    def calling_convention(self, values: Mapping[str, Any] | None = None) -> Signature:
        if self.signature is not None:
            return self.signature
        return positional(self.input_names or list(values or ()), "forward()")


def sha256_of(*paths: Path) -> str:
    from ..runtime.manifest import sha256_files

    return sha256_files(paths)


def check_zip_crc(path: Path) -> None:
    """torch's archive reader does not check CRCs, so a flipped bit in stored weights loads silently as
    different weights. Read every member first (one extra pass over the file), naming the damaged one.
    Files that are not zip archives pass: their own loader reports them."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return
    with zf:
        for info in zf.infolist():
            try:
                with zf.open(info) as member:
                    while member.read(1 << 20):
                        pass
            except zipfile.BadZipFile as exc:
                raise InputError("archive member fails its CRC check (the file is corrupted)", file=path,
                                 field=info.filename, fix="copy the file again, or re-save the model") from exc
            except Exception as exc:  # zlib.error, unsupported compression, encrypted member, short file
                raise InputError(f"archive member cannot be read ({type(exc).__name__}: {exc})", file=path,
                                 field=info.filename, fix="copy the file again, or re-save the model") from exc


def ensure_eval(module, loaded: LoadedModel) -> None:
    """Models always run in eval mode; say so when one arrived in training mode."""
    training = getattr(module, "training", False)
    if training:
        msg = f"{loaded.source}: model arrived in training mode; switched to eval() (dropout/batch-norm frozen)"
        log.warning(msg)
        loaded.notes.append(msg)
    if hasattr(module, "eval"):
        module.eval()
    if hasattr(module, "modules"):
        stragglers = [n for n, m in module.named_modules() if getattr(m, "training", False)]
        if stragglers:
            raise RuntimeError(f"submodules still in training mode after eval(): {stragglers[:3]}")


@contextmanager
def torch_logs_collected():
    """Collect what torch logs while loading a file instead of letting it print to stderr.

    torch reports some load failures as multi-line warnings with tracebacks (and then raises a vague
    error), which would break the CLI's one-line errors. Yields the list of collected records; they are
    passed on to edgemm's logger at INFO level, so ``--verbose`` still shows them."""
    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    collect = _Collect(logging.WARNING)
    saved = {}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name == "torch" or name.startswith("torch.")) and isinstance(logger, logging.Logger) and logger.handlers:
            saved[name] = logger.handlers[:]
            logger.handlers = [collect]
    try:
        yield records
    finally:
        for name, handlers in saved.items():
            logging.getLogger(name).handlers = handlers
        for record in records:
            log.info("torch: %s", record.getMessage())


def logged_error(records: list[logging.LogRecord]) -> str | None:
    """First line of the first exception torch logged, if any (its own raise is often less precise)."""
    for record in records:
        if record.exc_info and record.exc_info[1] is not None:
            text = str(record.exc_info[1]).strip().splitlines()
            return text[0] if text else type(record.exc_info[1]).__name__
    return None


@contextmanager
def torch_warnings_logged(path):
    """Keep the Python warnings torch issues while reading a file (e.g. "Detected pickle protocol 4 in the
    checkpoint...", two lines on stderr) off the console, so an error stays one line. They are passed on
    to edgemm's logger at INFO level, so ``--verbose`` still shows them."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                log.info("%s: %s: %s", path, w.category.__name__, str(w.message).strip().splitlines()[0]
                         if str(w.message).strip() else "")
