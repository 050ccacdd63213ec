"""The `qvl` helper commands and flags: sample-data, tiny-checkpoint, -v (fast, no Ray)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipelines.cli import EXIT_CONFIG, EXIT_OK, _load_extra_commands, build_parser, main as qvl


def one_error(err: str, *patterns: str) -> str:
    """The single `error:` line of stderr, without a traceback, containing every pattern."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for p in patterns:
        assert p in errors[0], (p, errors[0])
    return errors[0]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------- sample-data


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    """Ctrl-C in any command: one error line (no traceback), exit 130, no staging folder left."""
    import signal as _signal

    import operators.sample_media as sample_media

    def interrupted_write(stage):
        (stage / "half.txt").write_text("half")
        os.kill(os.getpid(), _signal.SIGINT)  # Python's default handler: KeyboardInterrupt here

    monkeypatch.setattr(sample_media, "write_sample_media", interrupted_write)
    assert qvl(["sample-data", str(tmp_path / "out")]) == 130
    one_error(capsys.readouterr().err, "error: interrupted by SIGINT")
    assert not (tmp_path / "out").exists()


def test_sample_data_into_new_and_empty_folders(tmp_path, capsys):
    assert qvl(["sample-data", str(tmp_path / "new" / "nested")]) == EXIT_OK
    (tmp_path / "empty").mkdir()
    assert qvl(["sample-data", str(tmp_path / "empty")]) == EXIT_OK
    a, b = files_under(tmp_path / "new" / "nested"), files_under(tmp_path / "empty")
    assert "readme.txt" in a and "videos/clip.mp4" in a and a.keys() == b.keys()
    # No staging folder is left behind.
    assert sorted(os.listdir(tmp_path / "empty")) == sorted({k.split("/")[0] for k in b})
    assert capsys.readouterr().err == ""


def test_sample_data_never_overwrites_a_users_file(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "readme.txt").write_text("my own notes")
    (out / "keep.bin").write_bytes(b"\x00mine")
    code = qvl(["sample-data", str(out)])
    assert code == EXIT_CONFIG
    one_error(capsys.readouterr().err, f"{out / 'readme.txt'} already exists", "--force")
    # Nothing was written at all, and the user's files are untouched.
    assert files_under(out) == {"readme.txt": b"my own notes", "keep.bin": b"\x00mine"}
    assert sorted(os.listdir(out)) == ["keep.bin", "readme.txt"]


def test_sample_data_twice_needs_force(tmp_path, capsys):
    out = tmp_path / "data"
    assert qvl(["sample-data", str(out)]) == EXIT_OK
    first = files_under(out)
    (out / "extra.txt").write_text("unrelated")
    assert qvl(["sample-data", str(out)]) == EXIT_CONFIG
    one_error(capsys.readouterr().err, "already exists")
    (out / "readme.txt").write_text("changed")
    assert qvl(["sample-data", str(out), "--force"]) == EXIT_OK
    after = files_under(out)
    assert after.pop("extra.txt") == b"unrelated"  # --force overwrites, it does not clear
    assert after == first


def test_sample_data_file_where_a_folder_goes_is_a_clash(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "images").write_text("a file, not a folder")
    assert qvl(["sample-data", str(out)]) == EXIT_CONFIG
    one_error(capsys.readouterr().err, f"{out / 'images'} already exists")
    assert files_under(out) == {"images": b"a file, not a folder"}


@pytest.mark.parametrize("command", [["sample-data"], ["tiny-checkpoint", "--kind", "embedding"]])
def test_output_folder_that_is_a_file_is_one_error(command, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert qvl([command[0], str(afile), *command[1:]]) == EXIT_CONFIG
    one_error(capsys.readouterr().err, f"{afile}: exists and is not a folder")
    assert afile.read_text() == "x"


@pytest.mark.parametrize("make", ["under-a-file", "proc"])
def test_sample_data_unwritable_path_is_one_error(make, tmp_path, capsys):
    if make == "proc":
        if not sys.platform.startswith("linux") or not Path("/proc").is_dir():
            pytest.skip("needs /proc")
        out = "/proc/nope"
    else:
        (tmp_path / "afile").write_text("x")
        out = str(tmp_path / "afile" / "sub")
    assert qvl(["sample-data", out]) == EXIT_CONFIG
    one_error(capsys.readouterr().err, f"sample-data: {out}: cannot write (")


def test_sample_data_unwritable_folder_is_one_error(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert qvl(["sample-data", str(out)]) == EXIT_CONFIG
    finally:
        out.chmod(0o700)
    one_error(capsys.readouterr().err, f"{out}: cannot write (Permission denied)")


# ------------------------------------------------------------------ tiny-checkpoint


def test_tiny_checkpoint_never_overwrites_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    assert qvl(["tiny-checkpoint", str(out), "--kind", "embedding", "--seed", "1"]) == EXIT_OK
    before = files_under(out)
    assert "config.json" in before and "model.safetensors" in before
    capsys.readouterr()
    assert qvl(["tiny-checkpoint", str(out), "--kind", "embedding", "--seed", "2"]) == EXIT_CONFIG
    one_error(capsys.readouterr().err, "already exists", "--force")
    assert files_under(out) == before
    assert qvl(["tiny-checkpoint", str(out), "--kind", "embedding", "--seed", "2", "--force"]) == EXIT_OK
    after = files_under(out)
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]


def test_tiny_checkpoint_clash_found_after_build_is_named(tmp_path, capsys):
    # A file the fast check does not know (only config.json / model.safetensors): found after the build.
    out = tmp_path / "ck"
    out.mkdir()
    (out / "tokenizer.json").write_text("mine")
    assert qvl(["tiny-checkpoint", str(out), "--kind", "reranker"]) == EXIT_CONFIG
    one_error(capsys.readouterr().err, f"{out / 'tokenizer.json'} already exists")
    assert sorted(os.listdir(out)) == ["tokenizer.json"]


# ---------------------------------------------------------------------------- -v


@pytest.mark.parametrize("argv, verbose", [
    (["ingest", "c.yaml"], False),
    (["-v", "ingest", "c.yaml"], True),
    (["ingest", "c.yaml", "-v"], True),
    (["ingest", "--verbose", "c.yaml", "--prune"], True),
    (["-v", "ingest", "c.yaml", "-v"], True),
    (["sample-data", "-v"], True),
    (["tiny-checkpoint", "d", "--kind", "embedding", "-v"], True),
    (["query", "c.yaml", "--text", "x", "-v"], True),
    (["query", "c.yaml", "--text", "x"], False),
])
def test_verbose_before_or_after_the_subcommand(argv, verbose):
    _load_extra_commands()
    args = build_parser().parse_args(argv)
    assert args.verbose is verbose


def test_verbose_after_the_subcommand_runs_the_command(tmp_path, capsys):
    assert qvl(["ingest", str(tmp_path / "missing.yaml"), "-v"]) == EXIT_CONFIG
    one_error(capsys.readouterr().err, "missing.yaml: file not found")


# --------------------------------------------------------------------- ingest flags


def test_plan_limit_without_plan_is_an_error_not_a_run(tmp_path, capsys):
    """`--plan-limit` alone used to be ignored: the preview the user asked for became a real ingestion."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "note.txt").write_text("a note")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"source: {{uri: {tmp_path / 'src'}}}\nembedder: {{model: {tmp_path / 'no-model'}}}\n"
                   f"qdrant: {{path: {tmp_path / 'qdrant'}, collection: media}}\n"
                   f"output: {{dir: {tmp_path / 'runs'}}}\n")
    assert qvl(["ingest", str(cfg), "--plan-limit", "3"]) == EXIT_CONFIG
    one_error(capsys.readouterr().err, "--plan-limit needs --plan")
    assert not (tmp_path / "qdrant").exists() and not (tmp_path / "runs").exists()
    assert "default 10" in build_parser()._subparsers._group_actions[0].choices["ingest"].format_help()


def test_a_hub_warning_is_printed_once():
    """huggingface_hub's own handler and the CLI's both wrote each hub warning (every retry of an
    unreachable hub, twice); the CLI's handler alone writes it now."""
    import subprocess

    code = ("import logging; from pipelines.cli import configure_logging; configure_logging(False); "
            "from transformers import AutoConfig; "  # what imports the hub's logging in a real run
            "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stderr
    assert err.count("Retrying in 1s") == 1, err
    assert "WARNING huggingface_hub.utils._http: Retrying in 1s [Retry 1/5]." in err


def test_help_lists_the_exit_codes():
    """`qvl --help` says what each exit code means (before, only the README did)."""
    from pipelines.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert text.startswith("usage: qvl") and "qvl: the command line" in text
    assert "Exit codes: 0 success; 1 " in text and "2 configuration or preflight error" in text
    assert "130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM" in text
