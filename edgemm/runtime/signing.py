"""Signed bundles: sign a bundle folder, and check its signature before any backend reads a byte.

Why OpenSSF `model-signing` (PyPI ``model-signing``) and not a hand-made signature over manifest.json:
it is the ecosystem's format (a Sigstore bundle over a DSSE-wrapped in-toto statement listing every
file's sha256), other tools verify it (``model_signing verify key``), and the same package does
certificate and keyless Sigstore signing. It is heavy for a device (sigstore, tuf, requests,
cryptography, pyOpenSSL: ~30 MB, ~600 modules), so it is the optional extra ``edgemm[sign]``, imported
only when a signature is made or checked; a check asked for without it is refused, never skipped.

What is signed: every file of the bundle folder except the signature itself (``bundle.sig``), reports
and manifest included. The signed digests must equal the manifest's ``files`` and the manifest the
runtime parsed must be the signed one, so the chain "signed digest = manifest digest = sha256 of the
bytes the backend gets" (ort_session hashes the bytes it hands to ONNX Runtime) holds even if files
are swapped while a bundle loads.

Trust comes only from the caller (``trusted_keys=``, ``--trusted-key``) or the EDGEMM_TRUSTED_KEYS
environment variable, never from a file inside the bundle. Standard library only at import time.

Long module: one security boundary (sign, check, bind the manifest, keys and certificates) kept together
so its whole chain of checks reads in one place.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Union

from ..errors import BundleError, DependencyError, InputError, SecurityError, first_line
from .atomic import write_bytes_atomic
from .manifest import MANIFEST_NAME, sha256_file

SIGNATURE_NAME = "bundle.sig"
TRUSTED_KEYS_ENV = "EDGEMM_TRUSTED_KEYS"          # os.pathsep-separated public key files
KEY_PASSWORD_ENV = "EDGEMM_SIGNING_KEY_PASSWORD"  # for an encrypted private key, when no terminal asks
MAX_SIGNATURE_BYTES = 16 << 20   # a signature lists one digest per file: a few KiB
SIGN_EXTRA_FIX = "pip install 'edgemm[sign]'"
# model-signing v1.0 payloads, made by file (not shard) with sha256: the only kind edgemm writes, so
# the only kind it accepts (older "Digests/v0.1" payloads need not list every file).
_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_CURVES = ("secp256r1", "secp384r1", "secp521r1")   # what model-signing's key signer supports

_LOG = logging.getLogger("edgemm.signature")
KeySource = Union[str, os.PathLike, bytes]


@dataclass
class SignatureInfo:
    """A bundle's signature as read from bundle.sig. ``verified`` only after a trusted key checked it."""

    path: Path
    key_fingerprint: str | None   # sha256 of the signer's public key (model-signing's key hint)
    digests: dict[str, str]        # file (posix, relative) -> sha256 hex, as signed
    ignore_paths: list[str]
    certificates: list[bytes] = field(default_factory=list)   # DER, signing certificate first (cert-signed)
    verified: bool = False
    trusted_key: str | None = field(default=None)   # which trusted key or CA verified it (its source)

    @property
    def signer(self) -> str:
        """Who signed, as far as the file says: the key fingerprint, or the signing certificate's sha256."""
        if self.certificates:
            return f"certificate sha256:{hashlib.sha256(self.certificates[0]).hexdigest()[:16]}"
        return f"key {short(self.key_fingerprint)}"

    def to_dict(self) -> dict:
        d = {"signed": True, "file": SIGNATURE_NAME, "key_fingerprint": self.key_fingerprint,
             "verified": self.verified, "trusted_key": self.trusted_key, "files": len(self.digests)}
        if self.certificates:
            d["certificate_sha256"] = hashlib.sha256(self.certificates[0]).hexdigest()
        return d


REPORTS_KEPT_NOTE = ("report.json/report.md not rewritten: the bundle is signed and rewriting them would void "
                     "its signature (the report is printed; --json, --markdown or --junit keep it elsewhere)")


def is_signed(bundle_dir: os.PathLike) -> bool:
    """Whether the bundle carries a signature file (checked or not)."""
    return os.path.lexists(Path(bundle_dir) / SIGNATURE_NAME)


def short(fingerprint: str | None) -> str:
    return f"sha256:{fingerprint[:16]}" if fingerprint else "an unknown key"


# -- trust policy --------------------------------------------------------------------------------------

@dataclass
class TrustedKey:
    source: str            # the path given, or "trusted_keys[i]" for PEM bytes
    pem: bytes             # a public key's SubjectPublicKeyInfo PEM (as model-signing re-encodes it), or
                           # a CA's certificates (PEM)
    fingerprint: str       # sha256 of that PEM (a key's is model-signing's key hint)
    is_ca: bool = False    # a CA certificate: trusts every signing certificate it issued


@dataclass
class TrustPolicy:
    keys: list[TrustedKey]
    required: bool


def resolve_policy(trusted_keys: Iterable[KeySource] | None = None, require_signature: bool | None = None,
                   *, field_name: str = "--trusted-key") -> TrustPolicy:
    """The caller's keys (or EDGEMM_TRUSTED_KEYS when ``trusted_keys`` is None) and whether a signature
    is required (by default: whenever a trusted key is configured). Checked before the bundle is read."""
    from_env = trusted_keys is None
    if from_env:
        raw = os.environ.get(TRUSTED_KEYS_ENV, "")
        trusted_keys = [p for p in raw.split(os.pathsep) if p.strip()]
        field_name = TRUSTED_KEYS_ENV
    elif isinstance(trusted_keys, (str, bytes, os.PathLike)):
        trusted_keys = [trusted_keys]
    sources = list(trusted_keys)
    required = bool(sources) if require_signature is None else bool(require_signature)
    if required and not sources:
        raise InputError("a signature is required but no trusted public key was given", field="--require-signature",
                         fix=f"pass --trusted-key KEY.pub (Python: trusted_keys=[...]) or set {TRUSTED_KEYS_ENV}")
    keys = [_load_public_key(src, i, field_name) for i, src in enumerate(sources)]
    return TrustPolicy(keys, required)


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError as exc:
        raise DependencyError("signed bundles need the model-signing package (and cryptography)",
                              fix=SIGN_EXTRA_FIX) from exc
    return serialization, ec


def _load_public_key(src: KeySource, index: int, field_name: str) -> TrustedKey:
    serialization, ec = _crypto()
    if isinstance(src, bytes):
        label, data, where = f"trusted_keys[{index}]", src, None
    else:
        label = where = str(src)
        try:
            st = os.stat(src)
            if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
                raise InputError("is not a public key file (not a regular file, or over 1 MiB)", file=where,
                                 field=field_name, fix="pass the .pub file written by `edgemm sign --generate-key`")
            data = Path(src).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read the trusted key ({exc.strerror or exc})", file=where, field=field_name,
                             fix="pass the path of a PEM public key (e.g. edgemm-signing.pub)") from exc
    if b"-----BEGIN CERTIFICATE-----" in data:
        return _load_ca(data, label, where)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        private = b"PRIVATE KEY" in data
        raise InputError("is a private key; trust is given with the public key" if private else
                         "is not a PEM public key", file=where, field=None if where else label,
                         fix="pass the .pub file (openssl ec -in KEY -pubout), never the private key"
                         if private else "pass a PEM public key, e.g. the .pub from `edgemm sign --generate-key`"
                         ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise InputError("is not an elliptic-curve P-256/P-384/P-521 public key (what model-signing verifies)",
                         file=where, field=None if where else label,
                         fix="generate a key pair with `edgemm sign --generate-key DIR`")
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return TrustedKey(label, pem, hashlib.sha256(pem).hexdigest())


def _load_ca(data: bytes, label: str, where: str | None) -> TrustedKey:
    """A trusted CA certificate (or several, concatenated): bundles signed with a certificate it issued
    (`edgemm sign --cert`) verify. Any such certificate does: trust a CA that issues only your signers."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InputError(f"is not a readable PEM certificate ({first_line(exc, 80)})", file=where,
                         field=None if where else label, fix="pass the CA certificate in PEM form") from exc
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return TrustedKey(label, pem, hashlib.sha256(pem).hexdigest(), is_ca=True)


# -- reading bundle.sig (standard library; no trust implied) ---------------------------------------------

def read_signature_bytes(bundle_dir: Path) -> bytes | None:
    """bundle.sig's bytes (read once), or None when the bundle has none. A link or special file is refused."""
    path = bundle_dir / SIGNATURE_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SecurityError(f"cannot read the signature ({exc.strerror or exc})", file=path,
                            fix="check the bundle folder's permissions") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SecurityError("is not a regular file (a link or special file)", file=path,
                            fix=f"re-sign the bundle with `edgemm sign {bundle_dir} --key KEY --force`")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SecurityError("is not a regular file", file=path, fix="re-sign the bundle")
            data = f.read(MAX_SIGNATURE_BYTES + 1)
    except OSError as exc:
        raise SecurityError(f"cannot read the signature ({exc.strerror or exc})", file=path,
                            fix="check the file's permissions, or re-sign the bundle") from exc
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SecurityError(f"is larger than {MAX_SIGNATURE_BYTES >> 20} MiB; not a bundle signature", file=path,
                            fix="re-sign the bundle")
    return data


def parse_signature(bundle_dir: Path, data: bytes) -> SignatureInfo:
    """What bundle.sig claims (signer's key fingerprint, signed digests), without checking it. A
    malformed file is refused naming bundle.sig; only the checked claims are trusted later."""
    path = bundle_dir / SIGNATURE_NAME
    fix = f"re-sign the bundle (`edgemm sign {bundle_dir} --key KEY --force`) or recopy it"
    try:
        doc = json.loads(data.decode("utf-8"))
        material = doc["verificationMaterial"]
        certificates, hint = [], None
        if "x509CertificateChain" in material:   # signed with a certificate (edgemm sign --cert)
            certificates = [base64.b64decode(c["rawBytes"], validate=True)
                            for c in material["x509CertificateChain"]["certificates"]]
        else:
            hint = material["publicKey"]["hint"]
        envelope = doc["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"], validate=True).decode("utf-8"))
        predicate = statement["predicate"]
        serialization = predicate["serialization"]
        resources = predicate["resources"]
        digests = {}
        for r in resources:
            name, algorithm, digest = r["name"], r["algorithm"], r["digest"]
            if not (isinstance(name, str) and isinstance(digest, str)):
                raise TypeError("resource name/digest must be strings")
            if algorithm != "sha256":
                raise ValueError(f"file {name!r} is hashed with {algorithm!r}, edgemm signs with sha256")
            if name in digests:
                raise ValueError(f"file {name!r} is listed twice")
            digests[name] = digest
        ignore = [str(p) for p in serialization.get("ignore_paths", [])]
        kind = (statement.get("predicateType"), serialization.get("method"), serialization.get("hash_type"))
    except (UnicodeDecodeError, json.JSONDecodeError, binascii.Error, RecursionError) as exc:
        raise SecurityError(f"is not a model-signing signature ({type(exc).__name__})", file=path, fix=fix) from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise SecurityError(f"is not a model-signing signature (missing or malformed {first_line(exc, 80)})",
                            file=path, fix=fix) from exc
    except ValueError as exc:
        raise SecurityError(f"is not an edgemm bundle signature: {first_line(exc, 200)}", file=path, fix=fix) from exc
    if kind != (_PREDICATE_TYPE, "files", "sha256"):
        raise SecurityError(f"is not an edgemm bundle signature (predicate {kind[0]!r}, serialization "
                            f"{kind[1]!r}/{kind[2]!r}; expected {_PREDICATE_TYPE!r}, files/sha256)", file=path, fix=fix)
    # Paths the signer left out are not checked by model-signing's verifier: only the signature itself
    # may be left out, or a file could ride along unsigned.
    if any(p != SIGNATURE_NAME for p in ignore):
        raise SecurityError(f"leaves files unsigned (ignore_paths {ignore!r}); edgemm signs every file",
                            file=path, fix=fix)
    if not certificates and (not isinstance(hint, str) or len(hint) != 64):
        raise SecurityError("names no signing key or certificate (made by model-signing < 1.0?)", file=path, fix=fix)
    return SignatureInfo(path, hint, digests, ignore, certificates)


# -- checking ------------------------------------------------------------------------------------------

def _model_signing():
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as exc:
        raise DependencyError(f"signed bundles need the model-signing package ({first_line(exc, 120)})",
                              fix=SIGN_EXTRA_FIX) from exc
    return hashing, signing, verifying


def _hashing_config(hashing):
    """One pinned configuration for signing and verifying: every file, sha256, no symlinks, nothing
    left out but the signature (model-signing's default also skips .git* paths: not here)."""
    return (hashing.Config()
            .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False))


def check_bundle(bundle_dir: os.PathLike, policy: TrustPolicy, *, note: bool = True) -> SignatureInfo | None:
    """Verify bundle.sig with the policy's keys over every file of the folder (before the manifest is
    trusted or any backend reads a byte). Returns the verified signature; None when the bundle is
    unsigned and none is required, or when no trusted key is configured (then a signed bundle gets a
    note: only the sha256 manifest is checked)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        return None   # load_manifest says what is wrong with the path
    data = read_signature_bytes(bundle_dir)
    if data is None:
        if policy.required:
            raise SecurityError("the bundle is not signed and a signature is required", file=bundle_dir,
                                field=SIGNATURE_NAME, fix=f"sign it with `edgemm sign {bundle_dir} --key KEY` "
                                "where it was built, or load it without --require-signature / trusted keys")
        return None
    info = parse_signature(bundle_dir, data)
    if not policy.keys:
        if note:
            _LOG.warning(f"note: {bundle_dir} is signed by {info.signer} but no trusted key was given: only the "
                         "sha256 manifest was checked (pass --trusted-key KEY.pub or set "
                         f"{TRUSTED_KEYS_ENV} to check the signature)")
        return None
    if info.certificates:   # any trusted CA may have issued the signing certificate: all go to the store
        cas = [k for k in policy.keys if k.is_ca]
        if not cas:
            raise SecurityError(f"signed with a certificate ({info.signer}) and no trusted CA certificate was "
                                "given", file=info.path, fix="pass the issuing CA's certificate with --trusted-key")
        key = TrustedKey(", ".join(k.source for k in cas), b"".join(k.pem for k in cas), "", is_ca=True)
    else:
        candidates = [k for k in policy.keys if not k.is_ca and k.fingerprint == info.key_fingerprint]
        if not candidates:
            trusted = ", ".join(short(k.fingerprint) for k in policy.keys if not k.is_ca) or "none, only CAs"
            raise SecurityError(f"signed by key {short(info.key_fingerprint)}, which is not a trusted key "
                                f"(trusted: {trusted})", file=info.path,
                                fix="pass the signer's public key with --trusted-key, or re-sign the bundle with "
                                    "a trusted key")
        key = candidates[0]
    hashing, _, verifying = _model_signing()
    _check_plain_files(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="edgemm-sig-") as tmp:
        # Verify exactly the bytes parsed above (a copy in a private folder: the file in the bundle could
        # be swapped between two reads), with the key as model-signing re-encodes it.
        sig_copy, key_copy = Path(tmp) / SIGNATURE_NAME, Path(tmp) / "trusted.pem"
        sig_copy.write_bytes(data)
        key_copy.write_bytes(key.pem)
        config = verifying.Config()
        # Explicit CAs only: model-signing falls back to the system's web roots when given none.
        config = (config.use_certificate_verifier(certificate_chain=[key_copy]) if key.is_ca
                  else config.use_elliptic_key_verifier(public_key=key_copy))
        try:
            config.set_hashing_config(_hashing_config(hashing)).verify(bundle_dir, sig_copy)
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party verifier is a refusal
            if str(exc).startswith("Signature mismatch"):   # the signature holds; the files differ
                raise _files_differ(bundle_dir, info) from exc
            trusted = f"CA {key.source}" if key.is_ca else f"key {short(key.fingerprint)} ({key.source})"
            raise SecurityError(f"does not verify with trusted {trusted}: "
                                f"{first_line(exc, 160) or type(exc).__name__} (the signature was altered, "
                                "or made over other content)", file=info.path,
                                fix="recopy the bundle from its source, or re-sign it") from exc
    info.verified, info.trusted_key = True, key.source
    return info


def describe(bundle_dir: os.PathLike, checked: SignatureInfo | None) -> dict:
    """For `edgemm inspect`: whether the bundle is signed, by which key, and whether that was checked."""
    if checked is not None:
        return checked.to_dict()
    bundle_dir = Path(bundle_dir)
    data = read_signature_bytes(bundle_dir)
    if data is None:
        return {"signed": False}
    info = parse_signature(bundle_dir, data)
    return info.to_dict()


def verify_before_use(bundle_dir: os.PathLike, trusted_keys=None, require_signature: bool | None = None,
                      *, note: bool = True):
    """The signature check, then the manifest with every file's hash, bound to what was signed: what
    `edgemm.runtime.load`, `edgemm inspect` and `edgemm build` do before anything reads a model file.
    Returns (manifest, verified SignatureInfo or None)."""
    from .manifest import load_manifest

    policy = resolve_policy(trusted_keys, require_signature)
    signed = check_bundle(bundle_dir, policy, note=note)
    manifest = load_manifest(bundle_dir, verify=True)
    if signed is not None:
        bind_manifest(bundle_dir, manifest, signed)
    return manifest, signed


def _check_plain_files(bundle_dir: Path) -> None:
    """A signed bundle holds folders and regular files only: a symbolic link (which could point anywhere)
    or a FIFO (which would block the hashing) is refused by name, before anything opens it."""
    for folder, dirs, files in os.walk(bundle_dir):
        for name in dirs + files:
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                rel = path.relative_to(bundle_dir).as_posix()
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file (a FIFO, socket or device)"
                raise SecurityError(f"{rel!r} is {kind}; a signed bundle holds plain files only", file=path,
                                    fix="remove it, or recopy the bundle from its signed source")


def _files_differ(bundle_dir: Path, info: SignatureInfo) -> SecurityError:
    """Which file breaks the signature: changed, added or removed since signing (hashed again here, on
    the failure path only, for a message that names it)."""
    present = {}
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if rel == SIGNATURE_NAME or (path.is_dir() and not path.is_symlink()):
            continue
        present[rel] = path
    fix = "recopy the bundle from its signed source, or rebuild and re-sign it"
    for rel, path in present.items():
        if rel not in info.digests:
            return SecurityError(f"unexpected file {rel!r}: not covered by the signature", file=bundle_dir,
                                 field=rel, fix="remove it, or " + fix)
        try:
            changed = path.is_symlink() or sha256_file(path) != info.digests[rel]
        except OSError:
            changed = True
        if changed:
            return SecurityError(f"{rel!r} differs from the signed bundle (modified after signing)", file=path,
                                 fix=fix)
    missing = sorted(set(info.digests) - set(present))
    if missing:
        return SecurityError(f"signed file {missing[0]!r} is missing", file=bundle_dir, field=missing[0], fix=fix)
    return SecurityError("the files changed while the signature was checked", file=bundle_dir, fix=fix)


def bind_manifest(bundle_dir: os.PathLike, manifest, info: SignatureInfo) -> None:
    """The manifest the runtime parsed must be the signed one, and its files the signed files: so the
    hashes the backend's bytes are checked against (the manifest's) are the signed hashes."""
    bundle_dir = Path(bundle_dir)
    source = bundle_dir / MANIFEST_NAME
    fix = "recopy the bundle from its signed source, or re-sign it"
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot be read again ({exc.strerror or exc})", file=source, fix=fix) from exc
    if hashlib.sha256(text).hexdigest() != info.digests.get(MANIFEST_NAME):
        raise SecurityError("is not the signed manifest (changed while loading)", file=source, fix=fix)
    try:
        same = json.loads(text) == manifest.to_dict()
    except (ValueError, RecursionError):
        same = False
    if not same:
        raise SecurityError("is not the signed manifest (changed while loading)", file=source, fix=fix)
    for rel, digest in manifest.files.items():
        if info.digests.get(PurePosixPath(rel).as_posix()) != digest:
            raise SecurityError(f"lists {rel!r} with a sha256 that was not signed", file=source,
                                field=f"files.{rel}", fix=fix)


# -- signing -------------------------------------------------------------------------------------------

def load_private_key(key_path: os.PathLike, password: bytes | None = None):
    """The signing key, with one-line errors for the usual mistakes (public key, wrong curve, locked)."""
    serialization, ec = _crypto()
    key_path = Path(key_path)
    try:
        data = key_path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the signing key ({exc.strerror or exc})", file=key_path, field="--key",
                         fix="pass a PEM private key, e.g. from `edgemm sign --generate-key DIR`") from exc
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as exc:  # encrypted without a password, or a password for a plain key
        raise InputError("is encrypted and no password was given" if password is None else
                         "is not encrypted, but a password was given", file=key_path, field="--key",
                         fix=f"set {KEY_PASSWORD_ENV} (or type it when asked)" if password is None else
                         f"unset {KEY_PASSWORD_ENV}") from exc
    except ValueError as exc:
        public = b"PUBLIC KEY" in data
        raise InputError("is a public key; signing needs the private key" if public else
                         f"is not a PEM private key, or the password is wrong ({first_line(exc, 80)})",
                         file=key_path, field="--key",
                         fix="pass the private key (edgemm-signing.key), keep the .pub for --trusted-key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _CURVES:
        raise InputError("is not an elliptic-curve P-256/P-384/P-521 private key (what model-signing signs with)",
                         file=key_path, field="--key", fix="generate a key pair with `edgemm sign --generate-key DIR`")
    return key


def fingerprint_of(public_key) -> str:
    serialization, _ = _crypto()
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def sign_bundle(bundle_dir: os.PathLike, key_path: os.PathLike, *, password: bytes | None = None,
                force: bool = False, certificate: os.PathLike | None = None, chain=()) -> SignatureInfo:
    """Write bundle.sig over every file of ``bundle_dir`` (which must pass its own hash check first:
    signing a tampered bundle would bless it). Replaces an existing signature only with ``force``.
    With ``certificate`` (the key's X.509 certificate, PEM) and its ``chain`` of intermediates, the
    signature carries them and verifies against the CA that issued them."""
    from .manifest import load_manifest

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify=True)
    existing = read_signature_bytes(bundle_dir)
    if existing is not None and not force:
        try:
            who = f"is already signed ({parse_signature(bundle_dir, existing).signer})"
        except SecurityError:
            who = "already holds an unreadable signature"
        raise InputError(who, file=bundle_dir / SIGNATURE_NAME, field="--force",
                         fix="pass --force to replace the signature")
    private = load_private_key(key_path, password)
    hashing, ms_signing, _ = _model_signing()
    with tempfile.TemporaryDirectory(prefix="edgemm-sig-") as tmp:
        key_copy, sig_tmp = Path(tmp) / "signing.key", Path(tmp) / SIGNATURE_NAME
        serialization, _ = _crypto()
        # model-signing reads the key from a path; an unencrypted copy in a private (0700) folder, removed
        # at once, spares it the password handling.
        fd = os.open(key_copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        config = ms_signing.Config()
        if certificate is None:
            config = config.use_elliptic_key_signer(private_key=key_copy)
        else:
            config = _certificate_signer(config, key_copy, Path(certificate), [Path(c) for c in chain])
        config.set_hashing_config(_hashing_config(hashing)).sign(bundle_dir, sig_tmp)
        data = sig_tmp.read_bytes()
    info = parse_signature(bundle_dir, data)
    # What was hashed for the signature must be what the manifest lists (a file changed in between is
    # caught here, not on the device).
    try:
        bind_manifest(bundle_dir, manifest, info)
    except SecurityError as exc:
        raise BundleError(f"changed while it was being signed: {exc.detail}", file=bundle_dir,
                          fix="sign it again when nothing else writes to it") from exc
    write_bytes_atomic(bundle_dir / SIGNATURE_NAME, data)
    return info


def _certificate_signer(config, key_copy: Path, certificate: Path, chain: list[Path]):
    for path, flag in [(certificate, "--cert"), *((c, "--cert-chain") for c in chain)]:
        try:
            ok = path.is_file() and b"-----BEGIN CERTIFICATE-----" in path.read_bytes()
        except OSError:
            ok = False
        if not ok:
            raise InputError("is not a readable PEM certificate", file=path, field=flag,
                             fix="pass the signing key's X.509 certificate (and its intermediates) in PEM form")
    # model-signing 1.1.1 cannot sign with an empty chain (it parses b"" as PEM and fails): with no
    # intermediates, the signing certificate itself stands in as the chain (a duplicate the verifier ignores).
    try:
        return config.use_certificate_signer(private_key=key_copy, signing_certificate=certificate,
                                             certificate_chain=chain or [certificate])
    except ValueError as exc:   # the certificate is not the key's, or does not parse
        raise InputError(first_line(exc, 200), file=certificate, field="--cert",
                         fix="pass the certificate issued for --key's public key") from exc


def generate_key_pair(folder: os.PathLike, name: str = "edgemm-signing") -> tuple[Path, Path, str]:
    """A new ECDSA P-256 key pair: ``<name>.key`` (PKCS#8 PEM, mode 0600) and ``<name>.pub``. Never
    overwrites a key. Returns (private path, public path, fingerprint)."""
    serialization, ec = _crypto()
    folder = Path(folder)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    for p in (private_path, public_path):
        if os.path.lexists(p):
            raise InputError("already exists; edgemm never overwrites a key", file=p, field="--generate-key",
                             fix="choose another folder, or remove the old key pair yourself")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder ({exc.strerror or exc})", file=folder, field="--generate-key",
                         fix="choose a writable folder") from exc
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    written = []
    try:
        for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
            written.append(path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise InputError(f"cannot write the key pair ({exc.strerror or exc})", file=folder, field="--generate-key",
                         fix="choose a writable folder") from exc
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return private_path, public_path, hashlib.sha256(public_pem).hexdigest()
