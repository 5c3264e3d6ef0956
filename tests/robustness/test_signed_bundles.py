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
from tests.robustness.test_hostile_bundles import portable_bundle, stub_tensorrt  # noqa: F401 - fixtures

pytest.importorskip("model_signing", reason="signed bundles need the edgemm[sign] extra")

SIG = "bundle.sig"


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """Two key pairs: the publisher's and someone else's."""
    from edgemm.runtime.signing import generate_key_pair

    folder = tmp_path_factory.mktemp("keys")
    mine = generate_key_pair(folder / "mine")
    other = generate_key_pair(folder / "other")
    return {"key": mine[0], "pub": mine[1], "fingerprint": mine[2],
            "other_key": other[0], "other_pub": other[1], "other_fingerprint": other[2]}


@pytest.fixture(scope="session")
def signed_source(tiny_bundle, keys, tmp_path_factory):
    from edgemm.runtime.signing import sign_bundle

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


def test_require_signature_false_accepts_unsigned_but_never_a_bad_signature(signed, tiny_bundle, keys,
                                                                            backend_calls):
    import edgemm.runtime as rt

    assert rt.load(tiny_bundle, trusted_keys=[keys["pub"]], require_signature=False).signature is None
    backend_calls.clear()
    _flip(signed / "report.md")
    _refused(signed, backend_calls, "'report.md' differs", trusted_keys=[keys["pub"]], require_signature=False)


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
    manifest = read_manifest(signed).to_dict()
    manifest["files"]["model.onnx"] = sha256_file(signed / "model.onnx")
    write_json_atomic(signed / "manifest.json", manifest)
    _refused(signed, backend_calls, "differs from the signed bundle", trusted_keys=[keys["pub"]])


@pytest.mark.parametrize("extra", ["extra.bin", ".gitignore", "sub/weights.bin", "report.html"])
def test_an_added_file_is_refused(signed, keys, backend_calls, extra):
    (signed / extra).parent.mkdir(exist_ok=True)
    (signed / extra).write_bytes(b"planted")
    _refused(signed, backend_calls, f"unexpected file {extra!r}", trusted_keys=[keys["pub"]])


@pytest.mark.parametrize("kind", ["link", "fifo", "link to a folder"])
def test_a_link_or_fifo_added_to_the_bundle_is_refused_by_name(signed, keys, backend_calls, tmp_path, kind):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"outside the bundle")
    if kind == "link":
        (signed / "weights.bin").symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(signed / "weights.bin")   # hashing it would block forever
    else:
        (signed / "weights.bin").symlink_to(tmp_path, target_is_directory=True)
    _refused(signed, backend_calls, "'weights.bin' is ", trusted_keys=[keys["pub"]])


@pytest.mark.parametrize("name", ["report.md", "report.json", "model.onnx"])
def test_a_removed_file_is_refused(signed, keys, backend_calls, name):
    (signed / name).unlink()
    _refused(signed, backend_calls, f"signed file {name!r} is missing", trusted_keys=[keys["pub"]])


def test_a_signature_by_another_key_is_refused(signed, keys, backend_calls):
    _refused(signed, backend_calls, "which is not a trusted key", trusted_keys=[keys["other_pub"]])


def test_a_bundle_re_signed_by_an_attacker_is_refused(signed, keys, backend_calls):
    from edgemm.runtime.signing import sign_bundle

    sign_bundle(signed, keys["other_key"], force=True)
    err = _refused(signed, backend_calls, "which is not a trusted key", trusted_keys=[keys["pub"]])
    assert keys["other_fingerprint"][:16] in str(err)


def test_another_keys_signature_claiming_the_trusted_fingerprint_is_refused(signed, keys, backend_calls):
    from edgemm.runtime.signing import sign_bundle

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
        doc = real(path, verify=verify).to_dict()
        doc["files"] = dict(doc["files"], **{"model.onnx": "0" * 64})
        return manifest_module.Manifest.from_dict(doc)

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


def test_loading_without_trusted_keys_imports_no_signing_packages(signed):
    """model-signing and its dependencies are heavy: a device that checks no signature never imports them."""
    import subprocess

    code = ("import sys, edgemm.runtime as rt\n"
            f"rt.load({str(signed)!r})\n"
            "print('LOADED', [m for m in ('model_signing', 'sigstore', 'cryptography', 'torch') if m in sys.modules])\n")
    env = {k: v for k, v in cli_env().items() if k != "EDGEMM_TRUSTED_KEYS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout


def test_sign_refuses_a_tampered_bundle_and_an_existing_signature(tiny_bundle, keys, tmp_path):
    from edgemm.errors import BundleError
    from edgemm.runtime.signing import sign_bundle

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


# -- the CLI: edgemm sign, and --trusted-key / --require-signature on run, verify, bench, inspect, build -----

# The CLI in a subprocess with ONNX Runtime's session constructor replaced by a trap that leaves a file.
TRAPPED_CLI = ("import os, onnxruntime\n"
               "def _trap(*args, **kwargs):\n"
               "    open(os.environ['EDGEMM_TEST_BACKEND_TRAP'], 'w').close()\n"
               "    raise SystemExit('the backend was reached')\n"
               "onnxruntime.InferenceSession = _trap\n"
               "from edgemm.cli.main import entry\n"
               "entry()\n")


def _cli(args, *, cwd, tmp_path, trap=False, env=None):
    import subprocess

    run_env = cli_env(tmp_path / "tmpdir")
    (tmp_path / "tmpdir").mkdir(exist_ok=True)
    run_env.pop("EDGEMM_TRUSTED_KEYS", None)
    run_env["EDGEMM_TEST_BACKEND_TRAP"] = str(tmp_path / "backend-reached")
    run_env.update(env or {})
    code = TRAPPED_CLI if trap else "from edgemm.cli.main import entry; entry()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=run_env,
                          capture_output=True, text=True, timeout=300)


def _leftovers(tmpdir: Path) -> list[str]:
    """What edgemm left in TMPDIR (its signature check works in a private temporary folder). `.ses` is
    onnxruntime's own: importing it writes that file into TMPDIR."""
    return sorted(p.name for p in tmpdir.iterdir() if p.name != ".ses")


def test_cli_generate_key_sign_inspect_and_run(tiny_bundle, tiny, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    res = _cli(["sign", "--generate-key", tmp_path / "keys"], cwd=tmp_path, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    key, pub = tmp_path / "keys" / "edgemm-signing.key", tmp_path / "keys" / "edgemm-signing.pub"
    assert oct(key.stat().st_mode & 0o777) == "0o600" and b"PUBLIC KEY" in pub.read_bytes()
    res = _cli(["sign", bundle, "--key", key], cwd=tmp_path, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (bundle / SIG).is_file() and "key sha256:" in res.stdout
    fingerprint = res.stdout.split("key sha256:")[1].split()[0]

    res = _cli(["inspect", bundle], cwd=tmp_path, tmp_path=tmp_path)
    assert res.returncode == 0 and f"signature: key sha256:{fingerprint}, not checked" in res.stdout, res.stdout
    res = _cli(["inspect", bundle, "--trusted-key", pub, "--json"], cwd=tmp_path, tmp_path=tmp_path)
    sig = json.loads(res.stdout)["signature"]
    assert sig["signed"] and sig["verified"] and sig["key_fingerprint"] == fingerprint
    res = _cli(["inspect", tiny_bundle], cwd=tmp_path, tmp_path=tmp_path)
    assert "signature: none (unsigned" in res.stdout

    before = tree_snapshot(bundle)
    out = tmp_path / "out.npz"
    res = _cli(["run", bundle, "--data", tiny["eval"], "-o", out, "--trusted-key", pub, "--require-signature"],
               cwd=tmp_path, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert out.is_file() and "note:" not in res.stderr
    res = _cli(["run", bundle, "--data", tiny["eval"], "-o", out], cwd=tmp_path, tmp_path=tmp_path)
    assert res.returncode == 0 and "only the sha256 manifest was checked" in res.stderr
    assert _leftovers(tmp_path / "tmpdir") == []
    # verify on a signed bundle keeps its reports (rewriting them would void the signature)
    res = _cli(["verify", bundle, "--reference", tiny["torchscript"], "--data", tiny["eval"], "--iterations", "0",
                "--trusted-key", pub, "--json"], cwd=tmp_path, tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr
    assert any("would void its signature" in n for n in json.loads(res.stdout)["notes"])
    assert tree_snapshot(bundle) == before


def _tamper_model(b, tmp):
    _flip(b / "model.onnx")


def _tamper_report(b, tmp):
    _flip(b / "report.json")


def _add_file(b, tmp):
    (b / "notes.txt").write_text("planted")


def _remove_report_md(b, tmp):
    (b / "report.md").unlink()


def _unsign(b, tmp):
    (b / SIG).unlink()


def _flip_sig(b, tmp):
    _flip(b / SIG, 40)


def _nothing(b, tmp):
    pass


# (command, tamper, key to trust: "pub" / "other_pub" / None, extra flags, env, what the line names)
CLI_CASES = {
    "run-model-byte": ("run", _tamper_model, "pub", [], {}, "'model.onnx' differs from the signed bundle"),
    "run-unsigned": ("run", _unsign, "pub", ["--require-signature"], {}, "not signed and a signature is required"),
    "run-wrong-key": ("run", _nothing, "other_pub", [], {}, "which is not a trusted key"),
    "run-no-key": ("run", _nothing, None, ["--require-signature"], {}, "no trusted public key"),
    "run-env-wrong-key": ("run", _nothing, None, [], {"EDGEMM_TRUSTED_KEYS": "other_pub"}, "not a trusted key"),
    "run-sig-byte": ("run", _flip_sig, "pub", [], {}, SIG),
    "verify-report-byte": ("verify", _tamper_report, "pub", [], {}, "'report.json' differs from the signed"),
    "bench-added-file": ("bench", _add_file, "pub", [], {}, "unexpected file 'notes.txt'"),
    "inspect-removed-file": ("inspect", _remove_report_md, "pub", [], {}, "signed file 'report.md' is missing"),
    "inspect-wrong-key": ("inspect", _nothing, "other_pub", [], {}, "which is not a trusted key"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_hostile_signed_bundles_before_the_backend(signed, tiny, keys, tmp_path, case):
    command, tamper, key, flags, env, match = CLI_CASES[case]
    tamper(signed, tmp_path)
    before = tree_snapshot(signed)
    out = tmp_path / "out.npz"
    args = {"run": ["run", signed, "--data", tiny["eval"], "-o", out],
            "verify": ["verify", signed, "--reference", tiny["torchscript"], "--data", tiny["eval"]],
            "bench": ["bench", signed, "--iterations", "3"],
            "inspect": ["inspect", signed]}[command]
    if key:
        args += ["--trusted-key", keys[key]]
    env = {k: str(keys[v]) for k, v in env.items()}
    res = _cli(args + flags, cwd=tmp_path, tmp_path=tmp_path, trap=True, env=env)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "(fix: " in lines[0], res.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "backend-reached").exists(), "the backend was reached"
    assert not out.exists() and tree_snapshot(signed) == before
    assert _leftovers(tmp_path / "tmpdir") == []


def test_build_checks_the_signature_before_tensorrt(portable_bundle, keys, tmp_path):
    """`edgemm build` hands the ONNX file to TensorRT's builder: a signed portable bundle is checked first,
    and a tampered one never reaches TensorRT (absent here: its error would mean the check was passed)."""
    from edgemm.runtime.signing import sign_bundle

    sign_bundle(portable_bundle, keys["key"])
    res = _cli(["build", portable_bundle, "--trusted-key", keys["pub"]], cwd=tmp_path, tmp_path=tmp_path)
    assert res.returncode == 2 and "TensorRT" in res.stderr, res.stderr   # signature fine: on to TensorRT
    _flip(portable_bundle / "model.onnx")
    before = tree_snapshot(portable_bundle)
    res = _cli(["build", portable_bundle, "--trusted-key", keys["pub"]], cwd=tmp_path, tmp_path=tmp_path)
    lines = error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "'model.onnx' differs from the signed bundle" in lines[0] and "TensorRT" not in lines[0]
    assert tree_snapshot(portable_bundle) == before


def test_build_refuses_a_tampered_signed_bundle_before_the_builder(portable_bundle, stub_tensorrt, keys):
    from edgemm.backends.tensorrt.package import finish_portable_bundle
    from edgemm.runtime.signing import sign_bundle

    sign_bundle(portable_bundle, keys["key"])
    (portable_bundle / "build.sh").write_text("echo swapped\n")
    with pytest.raises(SecurityError, match="'build.sh' differs"):
        finish_portable_bundle(portable_bundle, trusted_keys=[keys["pub"]])
    assert stub_tensorrt == []


# -- certificate-based signing: edgemm sign --cert, a CA certificate as the trusted key --------------------

def _certificate(subject, public_key, issuer_name, issuer_key, *, ca=False, signing=True, days=365):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=signing, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=not signing,
                                            key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                                            decipher_only=False), critical=True))
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(keys, tmp_path_factory):
    """A root CA, an intermediate, and certificates for the publisher's key (direct, via the intermediate,
    and one not allowed to sign); plus another, untrusted root."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edgemm.runtime.signing import load_private_key

    folder = tmp_path_factory.mktemp("pki")
    pem = serialization.Encoding.PEM
    out = {}
    signer = load_private_key(keys["key"])
    roots = {}
    for label in ("root", "other_root"):
        k = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"edgemm test {label}", k.public_key(), None, k, ca=True)
        roots[label] = (cert, k)
        out[label] = folder / f"{label}.pem"
        out[label].write_bytes(cert.public_bytes(pem))
    root, root_key = roots["root"]
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _certificate("edgemm test intermediate", inter_key.public_key(), root.subject, root_key, ca=True)
    certs = {"leaf": _certificate("publisher", signer.public_key(), root.subject, root_key),
             "via_intermediate": _certificate("publisher", signer.public_key(), inter.subject, inter_key),
             "no_signing": _certificate("publisher", signer.public_key(), root.subject, root_key, signing=False),
             "intermediate": inter}
    for label, cert in certs.items():
        out[label] = folder / f"{label}.pem"
        out[label].write_bytes(cert.public_bytes(pem))
    return out


@pytest.fixture
def cert_signed(tiny_bundle, keys, pki, tmp_path):
    from edgemm.runtime.signing import sign_bundle

    bundle = tmp_path / "cert-signed"
    shutil.copytree(tiny_bundle, bundle)
    sign_bundle(bundle, keys["key"], certificate=pki["leaf"])
    return bundle


def test_certificate_signed_bundle_loads_with_its_ca(cert_signed, tiny_bundle, keys, pki, tmp_path, backend_calls):
    import edgemm.runtime as rt
    from edgemm.runtime.signing import sign_bundle

    b = rt.load(cert_signed, trusted_keys=[pki["other_root"], pki["root"]])
    assert b.signature.verified and b.signature.to_dict()["certificate_sha256"]
    via = tmp_path / "via-intermediate"
    shutil.copytree(tiny_bundle, via)
    sign_bundle(via, keys["key"], certificate=pki["via_intermediate"], chain=[pki["intermediate"]])
    assert rt.load(via, trusted_keys=[pki["root"].read_bytes()]).signature.verified


@pytest.mark.parametrize("case", ["other CA", "tampered", "only the key", "no signing usage"])
def test_certificate_signed_bundle_hostile_cases(cert_signed, keys, pki, backend_calls, case):
    from edgemm.runtime.signing import sign_bundle

    trusted = [pki["root"]]
    if case == "other CA":
        trusted, match = [pki["other_root"]], "does not verify with trusted CA"
    elif case == "tampered":
        _flip(cert_signed / "model.onnx")
        match = "'model.onnx' differs from the signed bundle"
    elif case == "only the key":
        trusted, match = [keys["pub"]], "signed with a certificate"
    else:
        sign_bundle(cert_signed, keys["key"], certificate=pki["no_signing"], force=True)
        match = "cannot be used for signing"
    _refused(cert_signed, backend_calls, match, trusted_keys=trusted)


def test_key_signed_bundle_is_not_trusted_through_a_ca(signed, pki, backend_calls):
    _refused(signed, backend_calls, "which is not a trusted key (trusted: none, only CAs)", trusted_keys=[pki["root"]])


def test_sign_refuses_a_certificate_of_another_key(tiny_bundle, keys, pki, tmp_path):
    from edgemm.runtime.signing import sign_bundle

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    for cert, match in ((pki["root"], "does not match"), (keys["pub"], "not a readable PEM certificate")):
        with pytest.raises(InputError, match=match) as info:
            sign_bundle(bundle, keys["key"], certificate=cert)
        assert "--cert" in str(info.value)
    assert not (bundle / SIG).exists()


def test_cli_sign_with_a_certificate_and_run_with_the_ca(tiny_bundle, tiny, keys, pki, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    res = _cli(["sign", bundle, "--key", keys["key"], "--cert", pki["via_intermediate"], "--cert-chain",
                pki["intermediate"]], cwd=tmp_path, tmp_path=tmp_path)
    assert res.returncode == 0 and "certificate sha256:" in res.stdout, res.stderr
    res = _cli(["inspect", bundle, "--trusted-key", pki["root"]], cwd=tmp_path, tmp_path=tmp_path)
    assert res.returncode == 0 and "signature: certificate sha256:" in res.stdout and "verified" in res.stdout
    res = _cli(["run", bundle, "--data", tiny["eval"], "-o", tmp_path / "o.npz", "--trusted-key", pki["other_root"]],
               cwd=tmp_path, tmp_path=tmp_path, trap=True)
    lines = error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1 and "does not verify with trusted CA" in lines[0], res.stderr
    assert not (tmp_path / "backend-reached").exists()
