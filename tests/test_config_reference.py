"""`lorasft config` and docs/configuration.md: one source (config.py's docstrings), no drift."""

from __future__ import annotations

from pathlib import Path

from lorasft import config_reference
from lorasft.cli import main
from lorasft.config import load_config

DOC = Path(__file__).parents[1] / "docs" / "configuration.md"


def test_the_docs_page_is_generated_from_the_code():
    assert DOC.read_text(encoding="utf-8") == config_reference.markdown() + "\n", (
        "docs/configuration.md drifted from src/lorasft/config.py: run "
        "`lorasft config --markdown > docs/configuration.md`"
    )


def test_every_key_is_described_and_taken_by_the_command_line():
    keys = config_reference.keys()
    assert len(keys) > 90 and not [k.name for k in keys if not k.description]
    names = {k.name for k in keys}
    assert {"lora.r", "context.s2_attn", "eval.passkey_lengths", "data.augment.ratio",
            "train.max_grad_norm", "stages[].data"} <= names  # fmt: skip
    defaults = load_config(None, []).model_dump()
    for k in keys:  # each name, given its printed default, is the default config again
        if "[]" not in k.name:
            assert load_config(None, [f"{k.name}={k.default}"]).model_dump() == defaults, k


def test_lorasft_config_prints_a_section_and_names_a_wrong_one(capsys):
    assert main(["config", "lora"]) == 0
    out = capsys.readouterr().out
    assert "  lora.r: int (>= 1) = 8\n      LoRA rank.\n" in out and "train." not in out
    assert main(["config", "lroa"]) == 2
    assert "no config section 'lroa'; did you mean 'lora'?" in capsys.readouterr().err
