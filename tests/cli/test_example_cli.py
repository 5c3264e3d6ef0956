"""`edgemm example -o`: one-line errors for a path that cannot be its folder, and no silent overwrite of an
earlier example without --force."""

import logging

import pytest

from edgemm.cli import example as example_cli
from edgemm.cli.main import main


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() in-process configures logging (levels, warnings capture) for the CLI: undo it afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("edgemm")
    levels, handlers = (root.level, ours.level), list(root.handlers)
    yield
    logging.captureWarnings(False)
    root.setLevel(levels[0])
    ours.setLevel(levels[1])
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)


@pytest.fixture
def stub_write(monkeypatch):
    """Skip the real (seconds-long) model export: write placeholder example files instead."""
    calls = []

    def write_example(name, out, calib_size=None):
        calls.append(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for key, f in zip(("torchscript", "exported_program", "calib", "eval"), example_cli.EXAMPLE_FILES):
            (out / f).write_text(f"new {f}")
            paths[key] = out / f
        return paths

    monkeypatch.setattr("edgemm.zoo.write_example", write_example)
    return calls


def test_output_that_is_a_file_is_a_one_line_input_error(cli, tmp_path):
    target = tmp_path / "eval.npz"
    target.write_bytes(b"data")
    res = cli("example", "dual-encoder", "-o", target)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(target) in lines[0] and "-o" in lines[0] and "fix:" in lines[0]
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr
    assert target.read_bytes() == b"data"


def test_output_under_a_file_is_a_one_line_input_error(stub_write, tmp_path, capsys):
    target = tmp_path / "eval.npz"
    target.write_bytes(b"data")
    assert main(["example", "dual-encoder", "-o", str(target / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "-o" in err and "fix:" in err and len(err.strip().splitlines()) == 1
    assert stub_write == []


def test_existing_example_is_not_overwritten_without_force(stub_write, tmp_path, capsys):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "model.pt").write_text("old")
    (out / "notes.txt").write_text("mine")
    assert main(["example", "dual-encoder", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out}: -o: already exists" in err
    assert "pass --force to replace it, or choose another -o" in err
    assert (out / "model.pt").read_text() == "old" and stub_write == []

    assert main(["example", "dual-encoder", "-o", str(out), "--force"]) == 0
    assert (out / "model.pt").read_text() == "new model.pt"
    assert (out / "notes.txt").read_text() == "mine"            # not an example file: left alone
    assert (out / "edgemm-example.json").is_file()


def test_existing_empty_folder_is_written_without_force(stub_write, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["example", "dual-encoder", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(example_cli.EXAMPLE_FILES)


def test_force_does_not_replace_a_folder_named_like_an_example_file(stub_write, tmp_path, capsys):
    out = tmp_path / "ex"
    (out / "model.pt").mkdir(parents=True)
    assert main(["example", "dual-encoder", "-o", str(out), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err and stub_write == []


def test_example_twice_into_the_same_folder_rewrites_it(cli, tmp_path):
    """Re-running the quick start, or asking for more calibration samples, rewrites an earlier example."""
    out = tmp_path / "ex"
    assert cli("example", "dual-encoder", "-o", out).returncode == 0
    res = cli("example", "dual-encoder", "-o", out, "--calib-size", "7")
    assert res.returncode == 0, res.stderr
    import numpy as np
    with np.load(out / "calib.npz") as calib:
        assert calib["image"].shape[0] == 7


@pytest.mark.parametrize("flag", [[], ["--verbose"]])
def test_internal_error_hint_only_without_verbose(monkeypatch, tmp_path, capsys, flag):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("edgemm.zoo.write_example", boom)
    assert main([*flag, "example", "dual-encoder", "-o", str(tmp_path / "ex")]) == 3
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    if flag:
        assert "Traceback" in err and last == "internal error: RuntimeError: boom"
    else:
        assert "Traceback" not in err
        assert last == "internal error: RuntimeError: boom (rerun with --verbose for the traceback)"


@pytest.mark.parametrize("argv, start", [
    (["bench"], "error: BUNDLES: Missing argument 'BUNDLES...'."),
    (["compile", "--nope"], "error: No such option '--nope'."),
    (["example", "dual-encoder", "--calib-size", "0"], "error: --calib-size: Invalid value for '--calib-size'"),
])
def test_usage_errors_are_one_line(capsys, argv, start):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(start) and "(fix: see `edgemm " in err
