"""The console scripts: each exists in pyproject, ``--help`` starts with vforge's own help, tab completion works."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"vforge-train": "vforge.train", "vforge-predict": "vforge.predict", "vforge-export": "vforge.export",
           "vforge-automl": "vforge.automl"}


def run(monkeypatch, capsys, main, *args: str, comp_line: str | None = None) -> str:
    """Call an entry point's ``main`` in this process as its console script with ``args``; return what it printed."""
    monkeypatch.setattr(sys, "argv", [f"vforge-{main.__module__.split('.')[-1]}", *args])
    if comp_line is not None:
        monkeypatch.setenv("COMP_LINE", comp_line)
    capsys.readouterr()
    try:
        main()
    except SystemExit as e:  # --help exits 0
        assert not e.code, capsys.readouterr().err
    return capsys.readouterr().out


def test_console_scripts_point_at_the_entry_points():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {name: target.split(":")[0] for name, target in scripts.items()} == SCRIPTS
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_help_names_every_entry_point_before_hydras_help(monkeypatch, capsys):
    from vforge.train import main

    text = run(monkeypatch, capsys, main, "--help")
    assert text.startswith("vforge: ")
    head = text[: text.index("== Configuration groups ==")]
    for name in SCRIPTS:
        assert name in head, f"{name} missing from the help's header"
    assert "model: densenet, ft_transformer" in text  # Hydra's own part: the config groups, then the config
    assert "eval \"$(vforge-train -sc install=bash)\"" in head  # the template's $$ came out as one $


def test_shell_completion_query_as_a_console_script_sees_it(monkeypatch, capsys):
    from vforge import automl, train

    # Hydra's completion protocol: the shell passes the line in COMP_LINE and asks `<app> -sc query=bash`.
    # As `python -m vforge.train` the line fails to parse ('-m vforge.train' reads as an override): hence the scripts.
    choices = run(monkeypatch, capsys, train.main, "-sc", "query=bash", comp_line="vforge-train model=ft_")
    assert choices.split() == ["model=ft_transformer", "model=ft_transformer_plr"]
    # vforge-automl completes in the AutoML config, where the sweeper has a minutes budget
    choices = run(monkeypatch, capsys, automl.main, "-sc", "query=bash", comp_line="vforge-automl hydra.sweeper.min")
    assert choices.split() == ["hydra.sweeper.minutes="]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("vforge-train") is None or shutil.which("bash") is None,
                    reason="needs the console scripts installed (pip install -e .) and bash")
def test_bash_completion_installs_and_completes():
    script = """eval "$(vforge-train -sc install=bash)"
COMP_LINE="vforge-train trainer=fa"; COMP_WORDS=(vforge-train trainer=fa); COMP_CWORD=1; COMP_POINT=${#COMP_LINE}
hydra_bash_completion; echo "${COMPREPLY[*]}"
"""
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["trainer=fast"], out.stderr
