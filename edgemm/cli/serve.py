"""`edgemm serve`: try bundles out behind a real Triton server on 127.0.0.1.

    edgemm serve engines/vqa --http-port 8000     # Ctrl-C (or SIGTERM) stops it and removes its files

The bundles are exported (flavor edgemm) into a temporary repository, which is removed on exit."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click

from .options import signature_options, verbose_option


@click.command("serve")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--http-port", type=click.IntRange(1, 65535), default=None, help="[default: a free port]")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=None, help="[default: a free port]")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="[default: a free port]")
@click.option("--instances", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--max-queue-delay-us", type=click.IntRange(0, 60_000_000), default=0, show_default=True,
              help="How long the dynamic batcher may hold a request to form a larger batch.")
@click.option("--monitor", is_flag=True, help="Publish the runtime monitor's input checks (out of calibration range, "
                                             "NaN/Inf, unknown tokens, drift windows) as Triton metrics.")
@click.option("--timeout", "start_timeout", type=click.IntRange(1, 3600), default=120, show_default=True,
              help="Seconds to wait for the server and its models.")
@signature_options
@verbose_option
def command(bundles, http_port, grpc_port, metrics_port, instances, max_queue_delay_us, monitor, start_timeout,
            trusted_keys, require_signature):
    """Serve BUNDLES with Triton (python backend + edgemm.runtime) on loopback until Ctrl-C."""
    import os

    from ..errors import DependencyError
    from ..serving import TritonOptions, TritonServer, export_triton
    from ..serving.tritonserver import require_tritonserver

    install = require_tritonserver()  # before any work: say at once when there is no server here
    work = Path(tempfile.mkdtemp(prefix="edgemm-serve-"))
    server = None
    try:
        options = TritonOptions(instances=instances, max_queue_delay_us=max_queue_delay_us,
                                require_signature=require_signature, monitor=monitor)
        say = lambda m: click.echo(m, err=True)  # noqa: E731
        repo = export_triton(bundles, work / "repository", options, trusted_keys=list(trusted_keys) or None, say=say)
        env = {"EDGEMM_TRUSTED_KEYS": os.pathsep.join(str(Path(k).resolve()) for k in trusted_keys)} \
            if trusted_keys else None
        server = TritonServer(repo, workdir=work, http_port=http_port, grpc_port=grpc_port,
                              metrics_port=metrics_port, env=env, install=install)
        with server.start(timeout=start_timeout):
            names = ", ".join(m["name"] for m in server.models())
            click.echo(f"serving {names}\n  http    http://{server.http_url}/v2/models/<name>/infer\n"
                       f"  grpc    {server.grpc_url}\n  metrics {server.metrics_url}\n(Ctrl-C to stop)", err=False)
            try:
                while server.process is not None and server.process.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                click.echo("stopping", err=True)
                return 0
            raise DependencyError(f"tritonserver stopped on its own: {server.last_error()}", file=server.log_path)
    except DependencyError as exc:
        # The temporary folder goes below; an error naming the server's log must name a log that stays.
        if server is None or exc.file != str(server.log_path) or not server.log_path.is_file():
            raise
        fd, kept = tempfile.mkstemp(prefix="edgemm-serve-", suffix=".log")
        os.close(fd)
        shutil.copyfile(server.log_path, kept)
        raise DependencyError(exc.detail, file=kept, field=exc.field, fix=exc.fix) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
