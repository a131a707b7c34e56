"""`lorasft plan`: the memory estimate is exact on a config small enough to work out by hand,
and ordered the way it must be."""

import pytest
from transformers import LlamaConfig

from lorasft.cli import main
from lorasft.config import load_config
from lorasft.model.context import length_ladder
from lorasft.model.plan import memory_table
from tests.conftest import write_jsonl


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)  # fmt: skip


def test_estimate_exact_by_hand():
    cfg = load_config(
        None, ["lora.r=2", "lora.target_modules=[q_proj,v_proj]", "train.batch_size=1"]
    )
    (row,) = memory_table(tiny_config(), cfg, [16], "fp32")
    # base: embed 800 + lm_head 800 + final norm 8 + layer (q,k,v,o 4*64 + mlp 3*128 + 2 norms 16) = 2264
    assert row.weights == 2264 * 4
    assert row.trainable == 2 * (2 * (8 + 8)) * 16  # q_proj and v_proj: r*(in+out) each
    layer = 16 * 8 * 34 * 4 / 2  # sdpa stores no scores: s*b*h*34 * p/2
    # the default chunked loss (16 positions < one chunk): fp32 logits 4, log-softmax 4, gradient 4
    logits = 16 * 100 * 12
    assert row.activations == layer + logits
    # checkpointing: the layers' inputs, then the loss's chunk or one recomputed layer, not both
    # (the chunk's gradients are taken before the backward pass)
    assert row.activations_checkpointed == 16 * 8 * 4 + max(layer, logits) == 16 * 8 * 4 + logits
    # eager attention stores the a*s*s scores: s*b*h*(34 + 5as/h) * p/2 = 13824
    (eager,) = memory_table(tiny_config(), load_config(None, [
        "lora.r=2", "lora.target_modules=[q_proj,v_proj]", "train.batch_size=1",
        "model.attn_implementation=eager"]), [16], "fp32")  # fmt: skip
    assert eager.activations == 16 * 8 * (34 + 5 * 2 * 16 / 8) * 4 / 2 + logits
    # bf16 in chunks: logits and gradient 2 + 2, their fp32 copies 4 + 4, log-softmax 4: 16
    (half,) = memory_table(tiny_config(), cfg, [16], "bf16")
    assert half.activations == 16 * 8 * 34 * 2 / 2 + 16 * 100 * 16
    # all at once (the loss before chunks): logits 2, fp32 copy and log-softmax, two fp32 gradients
    off = load_config(None, ["lora.r=2", "lora.target_modules=[q_proj,v_proj]",
                             "train.batch_size=1", "train.loss_chunk_tokens=0"])  # fmt: skip
    (whole,) = memory_table(tiny_config(), off, [16], "bf16")
    assert whole.activations == 16 * 8 * 34 * 2 / 2 + 16 * 100 * 18
    # whole logits live on into the backward pass, beside the recomputed layer
    assert whole.activations_checkpointed == 16 * 8 * 2 + 16 * 8 * 34 * 2 / 2 + 16 * 100 * 18


def test_step_time_by_hand():
    """2 FLOPs per weight per token forward and again for input gradients, the forward once more
    (head excluded) under checkpointing; attention 2*s*span*h per layer forward, backward 2.5x."""
    from lorasft.model.plan import Rates, matmul_parameters, step_seconds

    config = tiny_config()
    weights = matmul_parameters(config)
    assert weights == 4 * 64 + 3 * 128 + 800  # q,k,v,o + mlp + lm_head (no embedding lookup)
    rates = Rates(matmul=1e6, attention=1e5)
    got = step_seconds(config, 16, 1, 16, True, rates)
    linear = 16 * (4 * weights + 2 * (weights - 800))
    attention = 1 * 2 * 16 * 16 * 8 * (2 + 2.5)
    assert got["matmul_s"] == linear / 1e6 and got["attention_s"] == attention / 1e5
    s2 = step_seconds(config, 16, 1, 4, True, rates)  # groups of 4: a quarter of the pairs
    assert s2["attention_s"] == attention / 4 / 1e5 and s2["matmul_s"] == got["matmul_s"]


def test_estimate_is_ordered():
    cfg = load_config(None, ["context.target_length=512", "context.trainable=[embed,norm]"])
    lengths = length_ladder(64, 512)
    assert lengths == [32, 64, 128, 256, 512]
    big = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    rows = memory_table(big, cfg, lengths)
    peaks = [r.peak for r in rows]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    assert all(r.activations_checkpointed < r.activations for r in rows)
    plain = memory_table(big, load_config(None, []), [64])[0]
    assert rows[1].trainable > plain.trainable  # embeddings and norms train too


def test_plan_command_prints_window_method_and_table(tiny_llama_dir, capsys):
    assert main(["plan", f"model.path={tiny_llama_dir}", "context.target_length=1024",
                 "context.method=yarn", "train.precision=fp32"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "model window: 256 tokens" in out and "context: yarn to 1024 tokens, factor 4" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    memory, seconds = rows[:4], rows[4:]
    assert [int(r[0]) for r in memory] == [int(r[0]) for r in seconds] == [128, 256, 512, 1024]
    assert "seconds per step" in out and "GFLOP/s" in out
    full, s2 = [float(r[1]) for r in seconds], [float(r[2]) for r in seconds]
    assert full == sorted(full) and all(b < a for a, b in zip(full, s2))  # groups: fewer pairs
    assert [int(r[3]) for r in seconds] == [32, 64, 128, 256]  # a quarter of each length


def test_plan_counts_the_layers_chinese_answers_train(tiny_llama_dir, tmp_path, capsys):
    """`lorasft plan` plans the LoRA training would run: on answers in Chinese characters
    (lora.by_answer_language) every linear layer at rank 16, so more LoRA weights and state."""
    zh = write_jsonl(tmp_path / "zh.jsonl", [{"instruction": "简称", "input": "中华人民共和国",
                                              "output": "中国"}])  # fmt: skip

    def lora_line(*extra):
        assert main(["plan", f"model.path={tiny_llama_dir}", "train.precision=fp32", *extra]) == 0
        said = capsys.readouterr()
        return said.err, next(ln for ln in said.out.splitlines() if ln.startswith("LoRA rank"))

    told, han = lora_line(f"data.train_file={zh}")
    assert "100% of the training answers' characters are Chinese" in told
    _, listed = lora_line(f"data.train_file={zh}", "lora.target_modules=all-linear", "lora.r=16")
    _, off = lora_line(f"data.train_file={zh}", "lora.by_answer_language=false")
    # tiny Llama: hidden 32, MLP 64, 2 layers; k/v project to 16 (2 kv heads of 8); rank 16
    # over in + out of q, o; k, v; gate, up; down
    per_layer = 16 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 2 + (64 + 32))
    assert han == listed == f"LoRA rank 16 on all-linear: {2 * per_layer:,} trainable parameters"
    assert off.startswith("LoRA rank 8 on attention: ")


def test_micro_batch_is_the_largest_divisor_that_fits():
    import pytest
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorasft.config import DEFAULT_CHUNK_TOKENS, ConfigError
    from lorasft.model.plan import activations, choose_micro_batch

    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_config()),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    fixed = 2264 * 4 + 64 * 16  # frozen fp32 weights (by hand above) + LoRA with AdamW state

    def peak(m):
        return fixed + activations(tiny_config(), 16, m, 4, False, "sdpa", DEFAULT_CHUNK_TOKENS)

    cfg = load_config(None, ["train.batch_size=8"])
    assert choose_micro_batch(model, cfg, 16, "fp32", peak(4) - 1) == (2, peak(2))
    assert choose_micro_batch(model, cfg, 16, "fp32", peak(8)) == (8, peak(8))
    cfg6 = load_config(None, ["train.batch_size=6"])
    assert choose_micro_batch(model, cfg6, 16, "fp32", peak(3)) == (3, peak(3))
    with pytest.raises(ConfigError, match="even a micro-batch of 1.*gradient_checkpointing=true"):
        choose_micro_batch(model, cfg, 16, "fp32", peak(1) - 1)


def test_the_chunked_loss_holds_one_chunk_of_logits():
    """Past loss_chunk_tokens positions the logits term stops growing; off (or 0) it is every
    position's, as before."""
    base = ["lora.r=2", "lora.target_modules=[q_proj,v_proj]", "train.batch_size=1"]
    chunked = load_config(None, [*base, "train.loss_chunk_tokens=4"])
    whole = load_config(None, [*base, "train.fused_loss=off"])
    (c,) = memory_table(tiny_config(), chunked, [16], "fp32")
    (w,) = memory_table(tiny_config(), whole, [16], "fp32")
    assert w.activations - c.activations == 16 * 100 * 16 - 4 * 100 * 12


def test_plan_answers_for_a_folder_with_only_a_config(tmp_path, capsys):
    """No weights, no tokenizer: the model is built on the meta device. The 8B's 4-bit base is
    its linear layers at 4.127 bits plus embeddings and head in fp32."""
    import json
    from pathlib import Path

    llama = Path(__file__).resolve().parents[2] / "examples" / "plan" / "llama-3.1-8b"
    assert sorted(p.name for p in llama.iterdir()) == ["config.json"]
    args = ["plan", f"model.path={llama}", "train.batch_size=1", "train.precision=fp32",
            "train.gradient_checkpointing=true"]  # fmt: skip
    flags = ["--lengths", "8192", "--memory-only"]
    assert main([*args, *flags]) == 0
    plain = capsys.readouterr().out
    assert main([*args, "model.quantization=nf4", *flags]) == 0
    nf4 = capsys.readouterr().out
    weights = lambda out: float(out.strip().splitlines()[-1].split()[1])  # GiB
    cfg = json.loads((llama / "config.json").read_text())
    embed = cfg["vocab_size"] * cfg["hidden_size"]
    assert weights(plain) * 2**30 == pytest.approx(8_030_261_248 * 4, rel=1e-3)
    linear = 8_030_261_248 - 2 * embed - (2 * 32 + 1) * cfg["hidden_size"]
    assert weights(nf4) * 2**30 == pytest.approx(
        linear * 4.127 / 8 + (8_030_261_248 - linear) * 4, rel=1e-3
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert main(["plan", f"model.path={tmp_path / 'bad'}"]) == 2
    assert "config.json: not valid JSON" in capsys.readouterr().err
