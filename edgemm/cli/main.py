"""The `edgemm` command. Commands load lazily, so `edgemm run` on a device never imports torch; a
command whose optional dependencies are missing still shows in --help, with the reason."""

from __future__ import annotations

import importlib
import logging
import sys
import traceback

import click

from ..errors import EdgemmError, first_line, storage_error

COMMANDS = {
    "compile": ("edgemm.cli.compile", "Compile a model into a verified bundle."),
    "run": ("edgemm.cli.run", "Run a bundle on inputs from an .npz file."),
    "verify": ("edgemm.cli.verify", "Check a bundle against its reference (accuracy + latency)."),
    "inspect": ("edgemm.cli.inspect", "Show a bundle's or model's IO, precision, sizes and ops."),
    "example": ("edgemm.cli.example", "Write a reference zoo model with calibration and eval data."),
    "targets": ("edgemm.cli.targets", "List target device profiles."),
    "build": ("edgemm.cli.build", "Finish a portable TensorRT bundle into an engine on the device."),
    "bench": ("edgemm.cli.bench", "Benchmark a bundle against FP32 and torch, side by side."),
    "monitor": ("edgemm.cli.monitor", "Check data against a bundle's calibration profile (drift, NaN, latency)."),
    "sign": ("edgemm.cli.sign", "Sign a bundle (model-signing), or make a key pair for it."),
    "export": ("edgemm.cli.export", "Export bundles as a Triton Inference Server model repository."),
    "serve": ("edgemm.cli.serve", "Serve a bundle with a local Triton server on loopback (try-out)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, help_text = COMMANDS[name]
        try:
            return importlib.import_module(module_name).command
        except ImportError as exc:
            reason = f"unavailable here: {exc}"

            @click.command(name=name, help=f"{help_text} [{reason}]",
                           context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args):
                from ..errors import DependencyError
                raise DependencyError(f"`edgemm {name}` {reason}", fix="pip install 'edgemm[compile]'")
            return unavailable


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Show progress details and full tracebacks.")
@click.version_option(package_name="edgemm")
@click.pass_context
def cli(ctx, verbose):
    """edgemm: compile fused multimodal models into verified bundles for CPUs, Jetson and GPUs."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    # Third-party libraries (onnxruntime.quantization, modelopt) log advice through the root logger; only
    # edgemm's own warnings are shown unless --verbose.
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(message)s")
    # Python warnings from torch / onnx (deprecations, tracer notes: edgemm itself issues none) go the same
    # way: through the "py.warnings" logger, on the console only with --verbose.
    logging.captureWarnings(True)
    logging.getLogger("edgemm").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv=None) -> int:
    verbose = "--verbose" in (argv or sys.argv[1:]) or "-v" in (argv or sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="edgemm", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except EdgemmError as exc:
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:  # one line, as every other error: click's own is a 3-line block
        where = exc.ctx.command_path if exc.ctx is not None else "edgemm"
        param = getattr(exc, "param", None)
        field = None if param is None else (param.opts[0] if isinstance(param, click.Option)
                                            else param.human_readable_name)
        detail = " ".join(exc.format_message().split())
        click.echo(f"error: {field + ': ' if field else ''}{detail} (fix: see `{where} --help`)", err=True)
        return 2
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # a bug in edgemm, not the user's input (unless the disk refused a write)
        disk = storage_error(exc)
        if disk is not None:
            if verbose:
                traceback.print_exc()
            click.echo(f"error: {disk}", err=True)
            return disk.exit_code
        first = first_line(exc, default="")
        if verbose:  # the traceback is right above: no hint to rerun
            traceback.print_exc()
            click.echo(f"internal error: {type(exc).__name__}: {first}", err=True)
        else:
            click.echo(f"internal error: {type(exc).__name__}: {first} (rerun with --verbose for the traceback)",
                       err=True)
        return 3


def _exit_on_sigterm() -> None:
    """SIGTERM (`kill`, container stop) would end Python without unwinding, leaving temporary folders;
    turn it into SystemExit so every `with` block cleans up, as for Ctrl-C."""
    import signal

    def handler(signum, frame):
        sys.exit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main thread, or a platform without SIGTERM
        pass


def _ignore_signals_while_exiting() -> None:
    """main() returned: every `with` block has cleaned up, and Python's exit (atexit, finalizers: torch
    unregistering its operator libraries, temporary files) takes a moment. A SIGTERM/Ctrl-C landing there
    raised SystemExit inside an atexit callback: 'Exception ignored ... Traceback' on stderr, and the
    remaining finalizers skipped. Let the exit finish instead (found by the random-kill trials)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


def entry() -> None:
    _exit_on_sigterm()
    code = main()
    _ignore_signals_while_exiting()
    sys.exit(code)
