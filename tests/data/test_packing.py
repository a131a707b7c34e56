import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasft.cli import main
from lorasft.data.collate import PadCollator
from lorasft.data.packing import (
    PackedCollator,
    PackingError,
    best_fit_decreasing,
    check_packing,
    pack,
)
from lorasft.data.tokenize import IGNORE, Encoded
from lorasft.model.loss import LossSettings, causal_lm_loss
from lorasft.model.precision import PRECISION_DTYPES
from tests.conftest import BF16_U, PRECISIONS


def test_best_fit_decreasing():
    # 7 and 3 share a bin of 10; 6 takes the 4 in; 5 alone.
    assert best_fit_decreasing([3, 7, 6, 5, 4], 10) == [[1, 0], [2, 4], [3]]
    assert all(
        sum([3, 7, 6, 5, 4][i] for i in b) <= 10 for b in best_fit_decreasing([3, 7, 6, 5, 4], 10)
    )


def test_rows_restart_positions_and_mask_each_first_label():
    rows = pack([Encoded([1, 2, 3], [-100, 2, 3]), Encoded([4, 5], [4, 5])], max_length=8)
    assert len(rows) == 1
    assert rows[0].input_ids == [1, 2, 3, 4, 5]
    assert rows[0].position_ids == [0, 1, 2, 0, 1]
    assert rows[0].labels == [IGNORE, 2, 3, IGNORE, 5]


RECORDS = [
    Encoded([5, 6, 7, 8, 9, 10], [-100, -100, -100, 8, 9, 10]),
    Encoded([11, 12, 13], [11, 12, 13]),
    Encoded([14, 15, 16, 17], [-100, -100, 16, 17]),
    Encoded([18, 19], [-100, 19]),
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_loss_equals_unpacked(kind, precision, tmp_path, tiny_tokenizer_dir):
    from tests.conftest import build_model

    dtype = PRECISION_DTYPES[precision]
    model = AutoModelForCausalLM.from_pretrained(
        build_model(kind, tmp_path / kind, tiny_tokenizer_dir), dtype=dtype
    )
    model.eval()
    # Unpacked, a record's first label is never a target (nothing precedes it).
    unpacked = PadCollator(pad_token_id=0)([vars(e) for e in RECORDS])
    rows = pack(RECORDS, max_length=10)
    assert len(rows) == 2
    packed = PackedCollator(pad_token_id=0)([vars(r) for r in rows])
    with torch.no_grad():
        a, _ = causal_lm_loss(model, unpacked, None)
        b, _ = causal_lm_loss(model, packed, None)
        _, out = causal_lm_loss(model, unpacked, None, LossSettings(kernel="off"))  # its logits
    # Packing changes only the shapes the same per-token sums run in: in bf16 a logit may round
    # one step (2u relative) differently, and a log-softmax moves by at most twice the largest
    # logit change: 4u of the largest logit. (Measured: no difference at all, in both dtypes.)
    tol = 1e-5 if precision == "fp32" else 4 * BF16_U * out.logits.float().abs().max().item()
    assert abs(a.item() - b.item()) < tol
    # Without position ids the records would see each other and the loss would change.
    leak = {k: v for k, v in packed.items() if k != "position_ids"}
    with torch.no_grad():
        c, _ = causal_lm_loss(model, leak, None)
    assert abs(c.item() - a.item()) > max(1e-4, tol)


def test_flattened_batch_for_flash_attention():
    rows = pack(RECORDS, max_length=10)
    batch = PackedCollator(pad_token_id=0, flatten=True)([vars(r) for r in rows])
    assert batch["input_ids"].shape == (1, 15)  # every token, no padding
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 6, 10, 13, 15]
    assert batch["cu_seq_lens_k"].dtype == torch.int32 and batch["max_length_q"] == 6
    labels = batch["labels"][0].tolist()
    assert [labels[i] for i in (0, 6, 10, 13)] == [IGNORE] * 4  # each record's first label
    # Eval rows (one record each, no position_ids, first label a target) are segments too.
    evals = PackedCollator(pad_token_id=0, flatten=True)([vars(RECORDS[1]), vars(RECORDS[3])])
    assert evals["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 19]]
    assert evals["cu_seq_lens_q"].tolist() == [0, 3, 5]


def test_flattened_loss_equals_unpacked(tiny_llama_dir):
    """The same row with SDPA: transformers builds the block-diagonal mask from the positions
    (flash takes the cu_seq_lens instead), so the loss equals the unpacked one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    unpacked = PadCollator(pad_token_id=0)([vars(e) for e in RECORDS])
    flat = PackedCollator(pad_token_id=0, flatten=True)([vars(r) for r in pack(RECORDS, 10)])
    with torch.no_grad():
        a, _ = causal_lm_loss(model, unpacked, None)
        b, _ = causal_lm_loss(model, flat, None)
    assert abs(a.item() - b.item()) < 1e-5


def test_unsupported_architecture_is_a_clear_error():
    check_packing("llama")
    with pytest.raises(
        PackingError, match="not supported for model type 'opt'.*data.packing=false"
    ):
        check_packing("opt")


def test_training_with_packing(tiny_llama_dir, tmp_path, capsys):
    import re

    from tests.conftest import tiny_args

    run = tmp_path / "run"
    argv = tiny_args(tiny_llama_dir, run, "data.packing=true", "eval.num_samples=1",
                     "eval.compare_base=false", "data.max_length=256")  # fmt: skip
    assert main(argv) == 0
    r = json.loads((run / "results.json").read_text())
    assert r["train"]["global_step"] == 4 and r["eval"]["tuned"]["perplexity"]["loss"] > 0
    # Packing was used: 240 sequences went into far fewer rows of at most 256 tokens.
    m = re.search(r"packing: (\d+) sequences into (\d+) rows of <= 256", capsys.readouterr().err)
    assert m and int(m[1]) == r["data"]["train"]["sequences"] == 240
    rows = int(m[2])
    assert r["data"]["train"]["tokens"] / 256 <= rows < 240 / 2
