"""`lorasft verify --url` against the real `lorasft serve`: the served answers match the run's."""

from lorasft.cli import main
from tests.serve.conftest import API_KEY


def test_verify_passes_against_the_live_server(live, adapter_runs, capsys):
    _a, b = adapter_runs
    args = ["verify", str(b), "--url", live.url, "--api-key", API_KEY, "--server-model", "b",
            "--num-prompts", "3", "--max-new-tokens", "8"]  # fmt: skip
    assert main(args) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_fails_when_the_server_serves_another_adapter(live, adapter_runs, capsys):
    _a, b = adapter_runs
    args = ["verify", str(b), "--url", live.url, "--api-key", API_KEY, "--server-model", "a",
            "--num-prompts", "3", "--max-new-tokens", "8"]  # fmt: skip
    assert main(args) == 1
    assert "MISMATCH" in capsys.readouterr().out
