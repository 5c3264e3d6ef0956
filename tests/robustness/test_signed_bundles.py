"""Signed bundles (issue #14): `edgemm sign`, `edgemm.runtime.load(trusted_keys=...)`, --require-signature.

Every hostile case asserts the refusal happens before any backend sees a byte: ONNX Runtime's
InferenceSession (and, for `edgemm build`, TensorRT's builder) is replaced by a trap that records a call.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemm.errors import DependencyError, InputError, SecurityError
from tests.robustness.helpers import cli_env, error_lines, tree_snapshot

pytest.importorskip("model_signing", reason="signed bundles need the edgemm[sign] extra")

SIG = "bundle.sig"


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """Two key pairs: the publisher's and someone else's."""
    from edgemm.runtime.signature import generate_key_pair

    folder = tmp_path_factory.mktemp("keys")
    mine = generate_key_pair(folder / "mine")
    other = generate_key_pair(folder / "other")
    return {"key": mine[0], "pub": mine[1], "fingerprint": mine[2],
            "other_key": other[0], "other_pub": other[1], "other_fingerprint": other[2]}


@pytest.fixture(scope="session")
def signed_source(tiny_bundle, keys, tmp_path_factory):
    from edgemm.runtime.signature import sign_bundle

    bundle = tmp_path_factory.mktemp("signed") / "tiny-signed"
    shutil.copytree(tiny_bundle, bundle)
    sign_bundle(bundle, keys["key"])
    return bundle


@pytest.fixture
def signed(signed_source, tmp_path):
    """A private copy of a signed tiny bundle, to tamper with."""
    dest = tmp_path / "bundle"
    shutil.copytree(signed_source, dest)
    return dest


@pytest.fixture
def backend_calls(monkeypatch):
    """ONNX Runtime's session constructor, trapped: a list of the calls that reached it."""
    import onnxruntime

    calls = []
    real = onnxruntime.InferenceSession

    def trap(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", trap)
    return calls


def _feeds():
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((2, 3, 16, 16)).astype(np.float32),
            "input_ids": rng.integers(0, 50, (2, 8)).astype(np.int64)}


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset % len(data)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _refused(bundle, backend_calls, match, **kwargs) -> SecurityError:
    import edgemm.runtime as rt

    with pytest.raises(SecurityError) as info:
        rt.load(bundle, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "(fix: " in message, message
    assert match in message, message
    assert backend_calls == [], "the backend was reached"
    return info.value


# -- signing and loading -------------------------------------------------------------------------------

def test_signed_bundle_loads_with_its_key_and_runs_as_the_unsigned_one(signed, tiny_bundle, keys, backend_calls):
    import edgemm.runtime as rt

    names = sorted(p.name for p in signed.iterdir())
    assert SIG in names and "model.onnx" in names and "report.json" in names
    for trusted in ([keys["pub"]], [str(keys["pub"])], [keys["pub"].read_bytes()], [keys["other_pub"], keys["pub"]]):
        b = rt.load(signed, trusted_keys=trusted, require_signature=True)
        assert b.signature is not None and b.signature.verified
        assert b.signature.key_fingerprint == keys["fingerprint"]
    plain = rt.load(tiny_bundle)
    assert plain.signature is None
    for name, value in rt.load(signed, trusted_keys=[keys["pub"]]).run(_feeds()).items():
        np.testing.assert_array_equal(value, plain.run(_feeds())[name])


def test_the_signature_lists_every_file_but_itself_with_the_manifests_hashes(signed):
    from edgemm.runtime.manifest import read_manifest, sha256_file

    doc = json.loads((signed / SIG).read_text())
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    signed_files = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    on_disk = {p.name for p in signed.iterdir() if p.name != SIG}
    assert set(signed_files) == on_disk
    assert signed_files["manifest.json"] == sha256_file(signed / "manifest.json")
    for rel, digest in read_manifest(signed)["files"].items():
        assert signed_files[rel] == digest
    assert statement["predicate"]["serialization"]["ignore_paths"] == [SIG]


def test_model_signing_itself_verifies_an_edgemm_signature(signed, keys):
    """The format is the ecosystem's: model-signing's own verifier accepts it."""
    from model_signing import hashing, verifying

    config = hashing.Config().set_ignored_paths(paths=[SIG], ignore_git_paths=False)
    verifying.Config().use_elliptic_key_verifier(public_key=keys["pub"]).set_hashing_config(config).verify(
        signed, signed / SIG)


def test_signed_bundle_without_trusted_keys_loads_with_a_note(signed, caplog, backend_calls, monkeypatch):
    import edgemm.runtime as rt

    monkeypatch.delenv("EDGEMM_TRUSTED_KEYS", raising=False)
    with caplog.at_level(logging.WARNING, logger="edgemm"):
        b = rt.load(signed)
    assert b.signature is None
    assert any("is signed by key sha256:" in r.getMessage() and "only the sha256 manifest was checked"
               in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match="no trusted public key"):   # required, but nothing to check with
        rt.load(signed, require_signature=True)


# -- hostile: tampering with any file, adding, removing -----------------------------------------------

@pytest.mark.parametrize("name", ["model.onnx", "manifest.json", "report.json", "report.md"])
def test_one_flipped_byte_in_any_file_is_refused(signed, keys, backend_calls, name):
    _flip(signed / name)
    _refused(signed, backend_calls, f"'{name}' differs from the signed bundle", trusted_keys=[keys["pub"]])


@pytest.mark.parametrize("offset", [0, 40, 200, -300, -120, -2])
def test_one_flipped_byte_in_the_signature_is_refused(signed, keys, backend_calls, offset):
    _flip(signed / SIG, offset)
    _refused(signed, backend_calls, SIG, trusted_keys=[keys["pub"]])


def _edit_signature(bundle: Path, edit) -> None:
    doc = json.loads((bundle / SIG).read_text())
    envelope = doc["dsseEnvelope"]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    edit(doc, statement)
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (bundle / SIG).write_text(json.dumps(doc))


def _first_digest_to(value):
    def edit(doc, statement):
        statement["predicate"]["resources"][0]["digest"] = value
    return edit


def _flip_signature_value(doc, statement):
    sig = base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"])
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes([sig[0] ^ 1]) + sig[1:]).decode()


@pytest.mark.parametrize("edit", [_first_digest_to("0" * 64), _flip_signature_value], ids=["payload", "sig"])
def test_an_edited_signed_statement_or_signature_value_is_refused(signed, keys, backend_calls, edit):
    """Well-formed JSON, wrong content: the cryptographic check, not the parser, refuses it."""
    _edit_signature(signed, edit)
    _refused(signed, backend_calls, "does not verify with trusted key", trusted_keys=[keys["pub"]])


def test_model_and_manifest_replaced_consistently_are_refused(signed, keys, backend_calls, tmp_path):
    """The attack a sha256 manifest cannot see: whoever can write the bundle rewrites both."""
    from edgemm.runtime.manifest import read_manifest, sha256_file, write_json_atomic

    import onnx
    from onnx import helper

    model = onnx.load(str(signed / "model.onnx"))
    model.graph.node.append(helper.make_node("Identity", ["logits"], ["logits_copy"]))
    onnx.save(model, str(signed / "model.onnx"))
    manifest = read_manifest(signed)
    manifest["files"]["model.onnx"] = sha256_file(signed / "model.onnx")
    write_json_atomic(signed / "manifest.json", manifest)
    _refused(signed, backend_calls, "differs from the signed bundle", trusted_keys=[keys["pub"]])


@pytest.mark.parametrize("extra", ["extra.bin", ".gitignore", "sub/weights.bin", "report.html"])
def test_an_added_file_is_refused(signed, keys, backend_calls, extra):
    (signed / extra).parent.mkdir(exist_ok=True)
    (signed / extra).write_bytes(b"planted")
    _refused(signed, backend_calls, f"unexpected file {extra!r}", trusted_keys=[keys["pub"]])


@pytest.mark.parametrize("name", ["report.md", "report.json", "model.onnx"])
def test_a_removed_file_is_refused(signed, keys, backend_calls, name):
    (signed / name).unlink()
    _refused(signed, backend_calls, f"signed file {name!r} is missing", trusted_keys=[keys["pub"]])


def test_a_signature_by_another_key_is_refused(signed, keys, backend_calls):
    _refused(signed, backend_calls, "which is not a trusted key", trusted_keys=[keys["other_pub"]])


def test_a_bundle_re_signed_by_an_attacker_is_refused(signed, keys, backend_calls):
    from edgemm.runtime.signature import sign_bundle

    sign_bundle(signed, keys["other_key"], force=True)
    err = _refused(signed, backend_calls, "which is not a trusted key", trusted_keys=[keys["pub"]])
    assert keys["other_fingerprint"][:16] in str(err)


def test_another_keys_signature_claiming_the_trusted_fingerprint_is_refused(signed, keys, backend_calls):
    from edgemm.runtime.signature import sign_bundle

    sign_bundle(signed, keys["other_key"], force=True)
    doc = json.loads((signed / SIG).read_text())
    doc["verificationMaterial"]["publicKey"]["hint"] = keys["fingerprint"]
    (signed / SIG).write_text(json.dumps(doc))
    _refused(signed, backend_calls, "does not verify with trusted key", trusted_keys=[keys["pub"]])


def test_a_signature_leaving_files_unsigned_is_refused(signed, keys, backend_calls):
    """Signed with the trusted key by model-signing directly, but with a path left out of the signature."""
    from model_signing import hashing, signing

    (signed / "payload.bin").write_bytes(b"rides along unsigned")
    config = hashing.Config().set_ignored_paths(paths=[SIG, "payload.bin"], ignore_git_paths=False)
    signing.Config().use_elliptic_key_signer(private_key=keys["key"]).set_hashing_config(config).sign(
        signed, signed / SIG)
    _refused(signed, backend_calls, "leaves files unsigned", trusted_keys=[keys["pub"]])


@pytest.mark.parametrize("how", ["unsigned", "link", "folder", "empty", "not json"])
def test_an_unsigned_or_unreadable_signature_is_refused_when_required(signed, keys, backend_calls, tmp_path, how):
    sig = signed / SIG
    sig.unlink()
    if how == "link":
        (tmp_path / "elsewhere.sig").write_bytes((tmp_path.parent / "x").as_posix().encode())
        sig.symlink_to(tmp_path / "elsewhere.sig")
    elif how == "folder":
        sig.mkdir()
    elif how == "empty":
        sig.write_bytes(b"")
    elif how == "not json":
        sig.write_bytes(b"\x00\xffnot a signature")
    match = {"unsigned": "not signed and a signature is required", "link": "not a regular file",
             "folder": "not a regular file", "empty": "not a model-signing signature",
             "not json": "not a model-signing signature"}[how]
    _refused(signed, backend_calls, match, trusted_keys=[keys["pub"]])
    _refused(signed, backend_calls, match, trusted_keys=[keys["pub"]], require_signature=True)


def test_trusted_keys_from_the_environment_require_a_signature(signed, tiny_bundle, keys, backend_calls, monkeypatch):
    import edgemm.runtime as rt

    monkeypatch.setenv("EDGEMM_TRUSTED_KEYS", str(keys["pub"]))
    assert rt.load(signed).signature.verified
    backend_calls.clear()
    _refused(tiny_bundle, backend_calls, "not signed and a signature is required")
    monkeypatch.setenv("EDGEMM_TRUSTED_KEYS", os.pathsep.join([str(keys["other_pub"])]))
    _refused(signed, backend_calls, "which is not a trusted key")


def test_a_manifest_swapped_after_the_signature_check_is_refused(signed, keys, backend_calls, monkeypatch):
    """The manifest the runtime uses must be the signed one, even if it changes between two reads."""
    import edgemm.runtime as rt
    from edgemm.runtime import manifest as manifest_module

    real = manifest_module.load_manifest

    def swapped(path, *, verify=True):
        m = real(path, verify=verify)
        m["files"] = dict(m["files"], **{"model.onnx": "0" * 64})
        return m

    monkeypatch.setattr(rt, "load_manifest", swapped)
    _refused(signed, backend_calls, "is not the signed manifest", trusted_keys=[keys["pub"]])


# -- keys and the optional extra -----------------------------------------------------------------------

def test_bad_trusted_keys_are_one_line_input_errors(signed, keys, tmp_path, backend_calls):
    import edgemm.runtime as rt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = tmp_path / "ed25519.pub"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello")
    for key, match in ((keys["key"], "is a private key"), (ed, "not an elliptic-curve"),
                       (garbage, "not a PEM public key"), (tmp_path / "missing.pub", "cannot read the trusted key"),
                       (b"not pem", "not a PEM public key")):
        with pytest.raises(InputError) as info:
            rt.load(signed, trusted_keys=[key])
        assert match in str(info.value) and "(fix: " in str(info.value)
    assert backend_calls == []


def test_a_signature_check_without_model_signing_is_refused_not_skipped(signed, keys, monkeypatch, backend_calls):
    import edgemm.runtime as rt

    for name in [m for m in sys.modules if m == "model_signing" or m.startswith("model_signing.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "model_signing", None)   # import fails, as without the extra
    with pytest.raises(DependencyError, match=r"edgemm\[sign\]"):
        rt.load(signed, trusted_keys=[keys["pub"]])
    assert backend_calls == []


def test_sign_refuses_a_tampered_bundle_and_an_existing_signature(tiny_bundle, keys, tmp_path):
    from edgemm.errors import BundleError
    from edgemm.runtime.signature import sign_bundle

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    _flip(bundle / "model.onnx")
    with pytest.raises(BundleError, match="does not match its sha256"):
        sign_bundle(bundle, keys["key"])
    assert not (bundle / SIG).exists()
    shutil.rmtree(bundle)
    shutil.copytree(tiny_bundle, bundle)
    sign_bundle(bundle, keys["key"])
    before = tree_snapshot(bundle)
    with pytest.raises(InputError, match="already signed"):
        sign_bundle(bundle, keys["other_key"])
    with pytest.raises(InputError, match="is a public key"):
        sign_bundle(bundle, keys["pub"], force=True)
    assert tree_snapshot(bundle) == before
