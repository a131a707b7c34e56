"""`lorasft verify --url` against the real `lorasft serve`: the served answers match the run's."""

from lorasft.cli import main
from tests.serve.conftest import API_KEY


def verify(run, live, served_as: str) -> int:
    return main(["verify", str(run), "--url", live.url, "--api-key", API_KEY,
                 "--server-model", served_as, "--num-prompts", "3", "--max-new-tokens", "8"])  # fmt: skip


def test_verify_passes_against_the_live_server(live, adapter_runs, capsys):
    assert verify(adapter_runs[1], live, "b") == 0
    assert "OK" in capsys.readouterr().out


def test_verify_fails_when_the_server_serves_another_adapter(live, adapter_runs, capsys):
    assert verify(adapter_runs[1], live, "a") == 1  # run b checked against adapter a
    assert "MISMATCH" in capsys.readouterr().out
