"""The live lines the CLI and pipeline runs show while a step works."""

from __future__ import annotations

import io

from rich.console import Console

from embedkit.study.display import working


def test_working_says_what_runs_on_a_log_and_shows_a_spinner_on_a_terminal() -> None:
    log = io.StringIO()
    with working(Console(file=log, force_terminal=False), "probe linear"):
        pass
    assert log.getvalue() == "probe linear ...\n"
    tty = io.StringIO()
    done = []
    with working(Console(file=tty, force_terminal=True, width=80), "finetune lora"):
        done.append(True)
    assert done == [True]
    assert "finetune lora" in tty.getvalue()
