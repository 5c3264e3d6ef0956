"""Keeping third-party output (exporters, modelopt, polygraphy, ONNX Runtime's tools) off the CLI's
stdout/stderr, which carry edgemm's own progress and one-line errors only.

- ``redirected_fds``: fd 1/2 into a file, for native code that writes past Python's sys.stdout/stderr.
- ``captured_output``: that, plus Python-level streams, warnings and named loggers, kept as text so the
  caller can log it (``--verbose``) or quote its last line in an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings


@contextlib.contextmanager
def redirected_fds(sink_fd: int):
    """Point fd 1 and 2 at ``sink_fd`` for the block (Python's buffers flushed first, C stdio's flushed
    into the sink before the fds are restored)."""
    saved = []
    try:
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
            try:
                copy = os.dup(fd)
            except OSError:
                continue
            os.dup2(sink_fd, fd)
            saved.append((fd, copy))
        yield
    finally:
        _flush_c_stdio()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


class _Captured:
    """What a third-party call printed (filled in when the ``captured_output`` block ends)."""

    def __init__(self):
        self.text = ""

    def last_line(self) -> str:
        """The line that best explains a failure: the last error-like line, else the last line that is
        not a progress bar; one line, at most 300 characters."""
        lines = [line for line in self.text.splitlines() if line.strip() and not _PROGRESS.search(line)]
        pick = next((line for line in reversed(lines) if _ERRORISH.search(line)), lines[-1] if lines else "")
        return " ".join(pick.split())[:300]


_PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[|it/s\]|s/it\]")
_ERRORISH = re.compile(r"error|exception|fail|fatal|invalid|cannot|could not|not supported", re.I)


@contextlib.contextmanager
def captured_output(logger_names=("modelopt", "polygraphy")):
    """Capture what third-party code prints, so the CLI's stdout/stderr stay edgemm's own.

    Captured: Python-level sys.stdout/sys.stderr (ONNX Runtime's calibrator prints, tqdm bars,
    polygraphy's G_LOGGER, which prints to sys.stdout/sys.stderr), fd 1/2 (native code), Python
    warnings, and records of ``logger_names`` (modelopt attaches its own stdout handler to
    "modelopt.onnx" and also propagates to the root logger, so each warning printed twice).
    The text is available as ``.text`` of the yielded object once the block ends (also on error);
    the caller decides whether to log it or quote it. Unlike edgemm.export's _quiet, which drops the
    exporters' output (through redirected_fds too), this keeps it (and captures under --verbose too; the caller logs it at INFO)."""
    captured = _Captured()
    buf = io.StringIO()
    loggers = [logging.getLogger(name) for name in logger_names]
    propagate = [lg.propagate for lg in loggers]
    streams = _console_streams()
    with tempfile.TemporaryFile() as sink:
        try:
            with redirected_fds(sink.fileno()):
                for lg in loggers:
                    lg.propagate = False   # keep their records off the CLI's root handler
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
                        warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("default")
                    try:
                        yield captured
                    finally:
                        for w in caught:
                            buf.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
        finally:
            for lg, value in zip(loggers, propagate):
                lg.propagate = value
            _rebind_handlers(buf, streams)
            sink.seek(0)
            native = sink.read().decode("utf-8", "replace")
            captured.text = _settle_carriage_returns(buf.getvalue() + native)


def _flush_c_stdio() -> None:
    """Flush C stdio buffers into the captured fds before they are restored (best effort)."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass


def _console_streams() -> dict[str, object]:
    """Logger name -> the stream of its first StreamHandler (see _rebind_handlers)."""
    found = {}
    for name, lg in [("", logging.getLogger()), *list(logging.root.manager.loggerDict.items())]:
        for handler in getattr(lg, "handlers", ()):
            if type(handler) is logging.StreamHandler:
                found.setdefault(name, handler.stream)
    return found


def _rebind_handlers(buf, before: dict[str, object]) -> None:
    """modelopt's configure_logging replaces its console handler with one bound to sys.stdout as it is
    during the call, i.e. our buffer: give such handlers the stream their logger's handler had before the
    call (sys.stdout if it had none), as if the capture had not happened."""
    for name, lg in [("", logging.getLogger()), *list(logging.root.manager.loggerDict.items())]:
        for handler in getattr(lg, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is buf:
                handler.setStream(before.get(name, sys.stdout))


def _settle_carriage_returns(text: str) -> str:
    """Progress bars redraw with \\r: keep each line's final state."""
    out = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        out.append(parts[-1] if parts else "")
    return "\n".join(out).strip("\n")
