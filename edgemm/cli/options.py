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


class FiniteFloat(click.ParamType):
    """A float option that refuses nan and inf: a NaN threshold compares False with everything, so
    ``--max-metric-drop nan`` would pass any drop."""
    name = "number"

    def convert(self, value, param, ctx):
        import math

        if isinstance(value, float) and math.isfinite(value):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE_FLOAT = FiniteFloat()


def threshold_options(f):
    """Pass/fail bars; unset ones default by precision (edgemm.parity.thresholds)."""
    f = click.option("--max-metric-drop", type=FINITE_FLOAT, default=None,
                     help="Largest allowed task-metric drop, in points.")(f)
    f = click.option("--min-top1", "min_top1_agreement", type=FINITE_FLOAT, default=None,
                     help="Least top-1 agreement of logits outputs (0..1).")(f)
    f = click.option("--min-cosine", type=FINITE_FLOAT, default=None,
                     help="Least mean cosine similarity of every float output.")(f)
    return f


def signature_options(f):
    """--trusted-key / --require-signature: check bundle.sig before any backend reads the bundle."""
    f = click.option("--require-signature", is_flag=True,
                     help="Refuse a bundle without a valid signature by a --trusted-key (default when a key is "
                          "trusted).")(f)
    f = click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(),
                     help="Public key (PEM) whose signature the bundle must carry, or a CA certificate "
                          "that issued the signer's certificate; repeatable [default: $EDGEMM_TRUSTED_KEYS].")(f)
    return f


def trust_options(trusted_keys, require_signature) -> dict:
    """The runtime.load keywords for the flags above: unset flags leave the defaults (environment) alone."""
    return {"trusted_keys": list(trusted_keys) if trusted_keys else None,
            "require_signature": True if require_signature else None}


def echo_err(msg: str) -> None:
    click.echo(msg, err=True)
