"""`lorasft plan`: the memory estimate is exact on a config small enough to work out by hand,
and ordered the way it must be."""

from transformers import LlamaConfig

from lorasft.cli import main
from lorasft.config import load_config
from lorasft.model.context import length_ladder
from lorasft.model.plan import memory_table


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
    layer = 16 * 8 * (34 + 5 * 2 * 16 / 8) * 4 / 2  # s*b*h*(34 + 5as/h) * p/2 = 13824
    logits = 2 * 16 * 100 * 4
    assert row.activations == layer + logits
    assert row.activations_checkpointed == 16 * 8 * 4 + layer + logits


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
    assert [int(r[0]) for r in rows] == [128, 256, 512, 1024]


def test_micro_batch_is_the_largest_divisor_that_fits():
    import pytest
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorasft.config import ConfigError
    from lorasft.model.plan import activations, choose_micro_batch

    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_config()),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    fixed = 2264 * 4 + 64 * 16  # frozen fp32 weights (by hand above) + LoRA with AdamW state

    def peak(m):
        return fixed + activations(tiny_config(), 16, m, 4, False)

    cfg = load_config(None, ["train.batch_size=8"])
    assert choose_micro_batch(model, cfg, 16, "fp32", peak(4) - 1) == (2, peak(2))
    assert choose_micro_batch(model, cfg, 16, "fp32", peak(8)) == (8, peak(8))
    cfg6 = load_config(None, ["train.batch_size=6"])
    assert choose_micro_batch(model, cfg6, 16, "fp32", peak(3)) == (3, peak(3))
    with pytest.raises(ConfigError, match="even a micro-batch of 1.*gradient_checkpointing=true"):
        choose_micro_batch(model, cfg, 16, "fp32", peak(1) - 1)
