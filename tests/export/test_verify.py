"""`lorasft verify`: passes when merged and GGUF forms agree, fails naming the prompt when not."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from lorasft.cli import main


@pytest.fixture(scope="module")
def shipped(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("shipped")
    assert main(["merge", str(tiny_run), "--out", str(d / "merged")]) == 0
    assert main(["export", str(tiny_run), "--out", str(d / "m.gguf")]) == 0
    return d


def test_verify_passes_on_a_good_export(tiny_run, shipped, capsys):
    args = ["verify", str(tiny_run), "--merged", str(shipped / "merged"), "--gguf",
            str(shipped / "m.gguf"), "--num-prompts", "3", "--max-new-tokens", "6"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "OK: 6/6 prompt-target pairs agree" in out
    assert out.count(" merged   same       same") == 3 and "DIFFER" not in out


def test_verify_fails_on_a_changed_template(tiny_run, shipped, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shipped / "merged", broken)
    tpl = broken / "chat_template.jinja"
    tpl.write_text(tpl.read_text().replace("<|im_start|>assistant", "<|im_start|>bot"))
    assert main(["verify", str(tiny_run), "--merged", str(broken), "--num-prompts", "2",
                 "--max-new-tokens", "4"]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert "problem: merged: chat_template differs" in out
    assert "first mismatch: prompt 0 (" in out and "on merged: prompt token" in out
    assert "MISMATCH: 0/2" in out


class _Stub(BaseHTTPRequestHandler):
    seen: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append((self.path, self.headers.get("Authorization"), body))
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "not it"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


def test_verify_against_a_server(tiny_run, capsys):
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        rc = main(["verify", str(tiny_run), "--url", url, "--api-key", "k", "--server-model", "tuned",
                   "--num-prompts", "1", "--max-new-tokens", "4"])  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 1
    path, auth, body = _Stub.seen[0]
    assert (path, auth, body["model"], body["temperature"], body["max_tokens"]) == (
        "/v1/chat/completions",
        "Bearer k",
        "tuned",
        0,
        4,
    )
    assert body["messages"][-1]["role"] == "user"
    out = capsys.readouterr().out
    assert "engine unknown, weights F32" in out  # not lorasft serve: no /health to read
    assert "on server: output token 0: the run chose" in out and "got 'not it'" in out
    assert main(["verify", str(tiny_run), "--url", url, "--num-prompts", "1"]) == 2  # now closed
    assert "cannot connect" in capsys.readouterr().err


def test_verify_reads_a_gguf_written_into_the_run_folder(tiny_run, capsys):
    """transformers takes a folder with adapter_config.json for an adapter; verify must not."""
    inside = tiny_run / "inside.gguf"
    try:
        assert main(["export", str(tiny_run), "--out", str(inside)]) == 0
        assert main(["verify", str(tiny_run), "--gguf", str(inside), "--num-prompts", "2",
                     "--max-new-tokens", "4"]) == 0  # fmt: skip
        assert "OK: 2/2 prompt-target pairs agree" in capsys.readouterr().out
    finally:
        inside.unlink(missing_ok=True)


def test_each_compared_prompt_counts_once_by_its_verdict():
    """Report.tally (the summary line, and the benches' tables): the reference's rows left out; a
    prompt that tokenized differently is a failure even where the tokens then agree."""
    from lorasft.export.verify import REFERENCE, Report, Row, render

    report = Report([Row(0, REFERENCE, True, True), Row(0, "merged", True, True),
                     Row(1, "merged", True, False, near_tie=True), Row(2, "merged", True, False),
                     Row(0, "gguf", False, True), Row(1, "gguf", True, True)])  # fmt: skip
    assert report.tally() == {"merged": {"same": 1, "near_tie": 1, "differ": 1},
                              "gguf": {"same": 1, "near_tie": 0, "differ": 1}}  # fmt: skip
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    assert "MISMATCH: 3/5 prompt-target pairs agree (1 at a near tie)" in render(report, prompts)
