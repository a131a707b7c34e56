"""Without a terminal (a log file, CI), training prints plain progress lines, no bar redraws."""

import re
import subprocess
import sys

from lorasft.train.progress import clock
from tests.conftest import QUICK, tiny_args


def test_a_log_file_gets_plain_lines(tiny_llama_dir, tmp_path):
    argv = tiny_args(tiny_llama_dir, tmp_path / "run", *QUICK, "train.logging_steps=2",
                     "train.eval_strategy=steps", "train.eval_steps=2")  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "lorasft", *argv], capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout + proc.stderr  # no progress-bar redraws anywhere
    train = re.findall(r"^\[lorasft\] step (\d+)/4 loss [\d.]+ lr [\d.e+-]+ \| (\d+) tok/s \| "
                       r"\d+m\d\ds elapsed, ETA \d+m\d\ds$", proc.stdout, re.MULTILINE)  # fmt: skip
    assert [int(s) for s, _ in train] == [1, 2, 4] and all(int(v) > 0 for _, v in train)
    evals = re.findall(r"^\[lorasft\] step (\d+)/4 eval loss [\d.]+$", proc.stdout, re.MULTILINE)
    assert evals == ["2", "4"]
    assert "{'loss'" not in proc.stdout  # the Trainer's raw dicts are replaced, not doubled


def test_clock():
    assert (clock(0), clock(61.4), clock(3725)) == ("0m00s", "1m01s", "1h02m05s")
