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


def test_step_bar_follows_updates_on_a_terminal_and_is_silent_in_a_log() -> None:
    from embedkit.study.display import step_bar

    log = io.StringIO()
    with step_bar(Console(file=log, force_terminal=False), "finetune lora") as update:
        update(1, 10)
    assert log.getvalue() == ""
    tty = io.StringIO()
    with step_bar(Console(file=tty, force_terminal=True, width=100), "finetune lora") as update:
        for done in range(1, 11):
            update(done, 10)
    assert "10/10" in tty.getvalue()
