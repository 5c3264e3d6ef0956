"""`edgemm sign`: sign a bundle (OpenSSF model-signing, elliptic-curve key), or make a key pair.

    edgemm sign --generate-key keys/            # keys/edgemm-signing.key (keep secret) + .pub (ship)
    edgemm sign engines/my-model --key keys/edgemm-signing.key
    edgemm run engines/my-model --trusted-key keys/edgemm-signing.pub --data in.npz -o out.npz
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .options import verbose_option


@click.command("sign")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--key", "key_path", type=click.Path(path_type=Path),
              help="PEM private key (EC P-256/384/521), e.g. from --generate-key.")
@click.option("--cert", "certificate", type=click.Path(path_type=Path),
              help="The key's X.509 certificate (PEM): devices then trust the CA that issued it.")
@click.option("--cert-chain", "chain", multiple=True, type=click.Path(path_type=Path),
              help="Intermediate CA certificates between --cert and the trusted CA (PEM; repeatable).")
@click.option("--force", is_flag=True, help="Replace an existing signature.")
@click.option("--generate-key", "generate_dir", type=click.Path(path_type=Path),
              help="Write a new key pair (edgemm-signing.key, edgemm-signing.pub) into this folder and exit.")
@verbose_option
def command(bundle, key_path, certificate, chain, force, generate_dir):
    """Sign BUNDLE: write bundle.sig over every file of it, for `--trusted-key` checks on devices."""
    from ..errors import InputError
    from ..runtime import signing

    if chain and certificate is None:
        raise InputError("--cert-chain completes a --cert", field="--cert-chain", fix="pass --cert CERT.pem too")
    if generate_dir is not None:
        if bundle is not None or key_path is not None or certificate is not None:
            raise InputError("--generate-key makes a key pair; it signs nothing", field="--generate-key",
                             fix="run `edgemm sign --generate-key DIR` alone, then `edgemm sign BUNDLE --key ...`")
        private, public, fingerprint = signing.generate_key_pair(generate_dir)
        click.echo(f"wrote {private} (private: keep it secret, sign with --key) and {public} (public: give it to "
                   f"--trusted-key on devices); key sha256:{fingerprint}")
        return 0
    if bundle is None or key_path is None:
        raise InputError("needs a BUNDLE and --key PRIVATE_KEY", field="--key",
                         fix="edgemm sign engines/NAME --key edgemm-signing.key "
                             "(make a key pair with `edgemm sign --generate-key DIR`)")
    password = os.environ.get(signing.KEY_PASSWORD_ENV)
    secret = password.encode() if password is not None else None
    try:
        info = signing.sign_bundle(bundle, key_path, password=secret, force=force, certificate=certificate,
                                   chain=chain)
    except InputError as exc:
        # An encrypted key: ask on a terminal (never echoed), else the error names the variable to set.
        if secret is not None or "is encrypted" not in exc.detail or not sys.stdin.isatty():
            raise
        typed = click.prompt(f"password for {key_path}", hide_input=True, err=True)
        info = signing.sign_bundle(bundle, key_path, password=typed.encode(), force=force,
                                   certificate=certificate, chain=chain)
    who = info.signer if info.certificates else f"key sha256:{info.key_fingerprint}"
    click.echo(f"signed {bundle}: {len(info.digests)} files, {who} -> {bundle / signing.SIGNATURE_NAME}")
    return 0
