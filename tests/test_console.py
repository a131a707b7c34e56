"""`say`: lorasft's one way to tell the user something."""

from lorasft.console import say


def test_say_writes_to_stderr_from_the_first_process_only(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    say("one process")
    monkeypatch.setenv("RANK", "0")
    say("rank 0")
    monkeypatch.setenv("RANK", "1")
    say("rank 1")
    said = capsys.readouterr()
    assert said.out == "" and said.err == "[lorasft] one process\n[lorasft] rank 0\n"
