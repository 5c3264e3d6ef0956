"""Reusable click options, shared by commands."""

from __future__ import annotations

import logging

import click


def _set_verbose(ctx, param, value):
    if value:
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("edgemm").setLevel(logging.INFO)
    return value


verbose_option = click.option("--verbose", "-v", is_flag=True, expose_value=False, callback=_set_verbose,
                              is_eager=True, help="Show details and full tracebacks on error.")


def threshold_options(f):
    """Pass/fail bars; unset ones default by precision (edgemm.parity.thresholds)."""
    f = click.option("--max-metric-drop", type=float, default=None,
                     help="Largest allowed task-metric drop, in points.")(f)
    f = click.option("--min-top1", "min_top1_agreement", type=float, default=None,
                     help="Least top-1 agreement of logits outputs (0..1).")(f)
    f = click.option("--min-cosine", type=float, default=None,
                     help="Least mean cosine similarity of every float output.")(f)
    return f


def echo_err(msg: str) -> None:
    click.echo(msg, err=True)
