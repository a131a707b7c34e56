"""`lorasft merge --method`: every method of PEFT's add_weighted_adapter writes a model that
loads and answers; cat is exactly lorasft's linear sum, ties is not; a combined adapter written
with --adapter-out opens as a run; combinations PEFT cannot make are errors naming the runs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasft.cli import main
from lorasft.export import METHODS, PRUNING
from lorasft.export.merge import merge_runs
from lorasft.model.load import ModelError
from lorasft.model.reopen import open_run
from tests.conftest import PRECISIONS, QUICK, logit_tolerance, precision_of, tiny_args, write_jsonl

IDS = torch.tensor([[5, 17, 42, 99, 7, 23, 64, 11, 3, 8]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def tol(runs, want: torch.Tensor) -> float:
    """Two computations of the same weights: apart by the runs' precision's rounding at most
    (fp32 1e-4); a difference the test expects is 10 times that or more."""
    return logit_tolerance(precision_of(runs[0]), want)


@pytest.fixture(scope="module", params=PRECISIONS)
def two_runs(request, tiny_llama_dir, tmp_path_factory):
    """Two adapters of the same base trained on two different tasks, in fp32 and in bf16."""
    root = tmp_path_factory.mktemp(f"runs-{request.param}")
    # a learning rate that moves the logits well past bf16's rounding (the differences below)
    precision, lr = f"train.precision={request.param}", "train.learning_rate=1e-2"
    other = write_jsonl(root / "upper.jsonl", [{"instruction": f"Upper-case: word{i} item{i}",
                                                "output": f"WORD{i} ITEM{i}"} for i in range(40)])  # fmt: skip
    runs = [root / "a", root / "b"]
    assert main(tiny_args(tiny_llama_dir, runs[0], *QUICK, "train.max_steps=6", precision, lr)) == 0
    assert main(tiny_args(tiny_llama_dir, runs[1], *QUICK, "train.max_steps=6",
                          f"data.train_file={other}", "data.eval_file=null",
                          "train.seed=7", precision, lr)) == 0  # fmt: skip
    return runs


def test_cat_is_the_linear_sum_and_ties_is_not(two_runs):
    _, linear = merge_runs(two_runs, [0.7, 0.3])
    _, cat = merge_runs(two_runs, [0.7, 0.3], "cat")
    _, ties = merge_runs(two_runs, [0.7, 0.3], "ties", density=0.5)
    want = logits(linear)
    t = tol(two_runs, want)
    assert (logits(cat) - want).abs().max().item() < t  # the same deltas, as one adapter
    assert (logits(ties) - want).abs().max().item() > 10 * t  # half of each delta pruned
    _, a_only = merge_runs(two_runs[:1])
    assert (logits(a_only) - want).abs().max().item() > 10 * t  # b's adapter counts


def test_delta_pruning_at_density_1_is_the_svd_of_the_sum(two_runs, tiny_llama_dir):
    """The *_svd methods prune each adapter's whole delta before the SVD: keeping every entry
    (density 1) leaves the svd method's merged weights, pruning half moves them. Compared on the
    weights (merged in fp32 for either precision's runs): in bf16 the logits move by less than
    ten bf16 roundings for a pruned delta this small."""

    def q_proj(model) -> torch.Tensor:
        return model.model.layers[0].self_attn.q_proj.weight.detach().float()

    _, svd = merge_runs(two_runs, [0.7, 0.3], "svd")
    _, kept = merge_runs(two_runs, [0.7, 0.3], "magnitude_prune_svd", density=1.0)
    _, half = merge_runs(two_runs, [0.7, 0.3], "magnitude_prune_svd", density=0.5)
    delta = (q_proj(svd) - q_proj(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))).norm()
    assert delta > 0
    assert (q_proj(kept) - q_proj(svd)).norm() < 1e-4 * delta
    assert (q_proj(half) - q_proj(svd)).norm() > 0.1 * delta


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_a_model_that_loads_and_answers(two_runs, tmp_path, method):
    out = tmp_path / method
    density = ["--density", "0.5"] if method in PRUNING else []
    assert main(["merge", str(two_runs[0]), "--also", str(two_runs[1]), "--out", str(out),
                 "--method", method, *density]) == 0  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    _, again = merge_runs(two_runs, None, method, 0.5 if density else None)
    want = logits(again)
    assert (logits(model) - want).abs().max().item() < tol(two_runs, want)  # saved as merged
    generated = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == IDS.shape[1] + 4


def test_a_combined_adapter_opens_as_a_run(two_runs, tmp_path):
    out = tmp_path / "combined"
    assert main(["merge", str(two_runs[0]), "--also", str(two_runs[1]), "--adapter-out", str(out),
                 "--method", "ties", "--density", "0.5", "--weights", "0.6", "0.4"]) == 0  # fmt: skip
    opened = open_run(out)
    _, merged = merge_runs(two_runs, [0.6, 0.4], "ties", 0.5)
    want = logits(merged)
    assert (logits(opened.model) - want).abs().max().item() < tol(two_runs, want)
    assert main(["eval", str(out), "--num-samples", "2"]) == 0  # eval opens it as any run


def test_combinations_peft_cannot_make_are_errors(two_runs, tiny_llama_dir, tmp_path):
    with pytest.raises(ModelError, match="--method ties prunes each adapter: give --density"):
        merge_runs(two_runs, None, "ties")
    precision = f"train.precision={precision_of(two_runs[0])}"
    r4 = tmp_path / "r4"
    assert main(tiny_args(tiny_llama_dir, r4, *QUICK, "train.max_steps=1", "lora.r=4",
                          "lora.alpha=8", precision)) == 0  # fmt: skip
    with pytest.raises(ModelError, match=rf"--method ties cannot combine the adapters of .*{r4}"):
        merge_runs([two_runs[0], r4], None, "ties", 0.5)  # PEFT: ranks must match
    _, cat = merge_runs([two_runs[0], r4], None, "cat")  # cat adds the ranks: fine
    _, linear = merge_runs([two_runs[0], r4])
    want = logits(linear)
    assert (logits(cat) - want).abs().max().item() < tol(two_runs, want)
    dora = tmp_path / "dora"
    assert main(tiny_args(tiny_llama_dir, dora, *QUICK, "train.max_steps=1",
                          "lora.use_dora=true", precision)) == 0  # fmt: skip
    with pytest.raises(ModelError, match=rf"{dora} is a DoRA adapter"):
        merge_runs([two_runs[0], dora], None, "cat")
    assert main(["merge", str(two_runs[0])]) == 2  # neither --out nor --adapter-out
    assert main(["merge", str(two_runs[0]), "--also", str(two_runs[1]), "--out",
                 str(tmp_path / "m"), "--method", "cat", "--density", "0.5"]) == 2  # fmt: skip
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["merge", str(two_runs[0]), "--also", str(two_runs[1]), "--adapter-out",
                 str(tmp_path / "a"), "--method", "cat", "--out", str(tmp_path / "full")]) == 2  # fmt: skip
    assert not (tmp_path / "a").exists()  # checked before anything was written
    saved = tmp_path / "saved"  # a module trained in full: the combination would drop it
    assert main(tiny_args(tiny_llama_dir, saved, *QUICK, "train.max_steps=1",
                          "lora.modules_to_save=[lm_head]", precision)) == 0  # fmt: skip
    with pytest.raises(ModelError, match=rf"{saved} trained lm_head in full"):
        merge_runs([two_runs[0], saved], None, "cat")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rslora_adapters_combine_at_their_own_scale(tiny_llama_dir, tmp_path, precision):
    """add_weighted_adapter keeps use_rslora on the combined adapter, whose A and B already hold
    each adapter's scale: left so, the sum would be scaled again by sqrt(r1 + r2)."""
    runs = [tmp_path / "x", tmp_path / "y"]
    for n, run in enumerate(runs):
        assert main(tiny_args(tiny_llama_dir, run, *QUICK, "train.max_steps=2", "lora.use_rslora=true",
                              f"train.seed={n}", f"train.precision={precision}")) == 0  # fmt: skip
    _, linear = merge_runs(runs)
    _, cat = merge_runs(runs, None, "cat")
    want = logits(linear)
    assert (logits(cat) - want).abs().max().item() < tol(runs, want)
