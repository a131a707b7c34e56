"""Batched greedy generation answers exactly as one-at-a-time generation, in fp32 and in bf16.

Batching changes the kernels and the order of sums, so in bf16 a step whose two best logits are
nearly tied can go the other way in a batch; `generate` generates such rows again alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorasft.data.prepare import demo_files
from lorasft.data.tokenize import prompt_ids
from lorasft.eval import generate as gen_mod
from lorasft.eval.generate import generate
from lorasft.model.generation import GenSettings


def _conversations(n: int) -> list[list[dict]]:
    records = [json.loads(line) for line in Path(demo_files()[0]).read_text().splitlines()]
    return [[{"role": "user", "content": f"{r['instruction']}\n{r['input']}"}] for r in records[:n]]


def _model(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_greedy_equals_one_at_a_time(tiny_llama_dir, tiny_tokenizer, dtype):
    model, convs = _model(tiny_llama_dir, dtype), _conversations(32)
    alone = generate(model, tiny_tokenizer, convs, GenSettings(max_new_tokens=24, batch_size=1))
    stats: dict = {}
    batched = generate(model, tiny_tokenizer, convs, GenSettings(max_new_tokens=24, batch_size=8),
                       stats=stats)  # fmt: skip
    assert batched == alone
    assert len(set(alone)) > 4  # different prompts, different answers: a real comparison
    # A random tiny model's two best logits come within the near-tie bound somewhere in 24 steps
    # of most rows, so many are redone alone; a real model's mostly are not (bench/speed/eval_speed.py).
    assert len(stats["margins"]) == len(convs)


def _scores(model, tok, prompts: list[list[int]], gen: GenSettings) -> torch.Tensor:
    """Each step's scores of a left-padded batch, generated as `generate` generates it."""
    ids, mask = gen_mod.left_padded(prompts, tok.pad_token_id)
    with gen_mod._padding_free_attention(model, gen):
        out = model.generate(input_ids=ids, attention_mask=mask, output_scores=True,
                             return_dict_in_generate=True, min_new_tokens=gen.max_new_tokens,
                             **gen.kwargs(tok))  # fmt: skip
    return torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padded_row_computes_as_it_does_without_padding(tiny_model_dir, tiny_tokenizer, dtype):
    """In an exact greedy batch a row's padding takes no part in its attention: its scores at
    every step equal, bit for bit, the same prompt's in a batch of as many rows without padding
    (a pair of copies: the matmuls' kernels depend on the number of rows). With plain SDPA the
    padded row's sums run over its padding too and round differently (checked on this machine
    by turning the row-wise attention off)."""
    model = _model(tiny_model_dir, dtype)  # Llama, GPT-2 and OPT
    convs = _conversations(16)
    prompts = sorted((prompt_ids(c, tiny_tokenizer) for c in convs), key=len)
    short, long = prompts[0], prompts[-1]
    assert len(long) - len(short) >= 10  # real padding
    gen = GenSettings(max_new_tokens=12)
    batch = _scores(model, tiny_tokenizer, [short, long], gen)
    assert torch.equal(batch[0], _scores(model, tiny_tokenizer, [short, short], gen)[0])
    assert torch.equal(batch[1], _scores(model, tiny_tokenizer, [long, long], gen)[0])
    assert model.config._attn_implementation == "sdpa"  # as it was


def test_row_wise_attention_only_where_it_reproduces_the_model(tiny_llama_dir):
    model = _model(tiny_llama_dir, torch.float32)
    assert gen_mod._full_causal_sdpa(model)
    model.config.sliding_window = 16  # a window also hides a row's first keys
    assert not gen_mod._full_causal_sdpa(model)
    model.config.sliding_window, model.config._attn_implementation = None, "eager"
    assert not gen_mod._full_causal_sdpa(model)


def test_row_wise_attention_takes_only_left_padding_for_padding():
    t, f = True, False
    mask = torch.tensor([[f, f, t, t], [t, t, t, t], [f, f, f, f]]).view(3, 1, 1, 4)
    assert gen_mod._own_keys(mask, 3, 4) == [(2, 2), (0, 4), (4, 0)]
    assert gen_mod._own_keys(None, 2, 4) == [(0, 4), (0, 4)]
    additive = torch.where(mask, 0.0, float("-inf"))
    assert gen_mod._own_keys(additive, 3, 4) == [(2, 2), (0, 4), (4, 0)]
    static = torch.tensor([[f, t, t, f]]).view(1, 1, 1, 4)  # a static cache's empty last slot
    assert gen_mod._own_keys(static, 1, 4) is None


@pytest.mark.parametrize(("dtype", "nudge"), [(torch.bfloat16, 2**-7), (torch.float32, 1e-6)])
def test_a_near_tie_that_batching_flips_is_decided_as_alone(
    tiny_llama_dir, tiny_tokenizer, dtype, nudge
):
    """Batching is made to round one way: two output rows are equal (their logits tie, and alone
    the lower id wins), and in a batch the higher one is nudged up by less than the near-tie
    bound. Plain batching (eval.exact_greedy=false) then answers differently; by default
    `generate` sees that the batch's decoding does not compute as alone, and answers as alone.
    (Exact batches read each prompt alone: the tie is on a token chosen after the first.)"""
    model, convs = _model(tiny_llama_dir, dtype), _conversations(16)
    prompts = [prompt_ids(c, tiny_tokenizer) for c in convs]
    gen = GenSettings(max_new_tokens=8)
    chosen = [
        t
        for p in prompts
        for t in gen_mod._generate_batch(model, tiny_tokenizer, [p], gen)[0].ids[1:]
    ]
    top = max(set(chosen), key=chosen.count)  # the token the answers choose most
    head = model.get_output_embeddings()
    other = top + 1 if top + 1 < head.weight.shape[0] else top - 1
    a, b = min(top, other), max(top, other)
    with torch.no_grad():
        head.weight[other] = head.weight[top]

    def batched_rounding(module, args, out):
        if out.shape[0] > 1:
            out = out.clone()
            out[..., b] = out[..., a] + out[..., a].abs() * nudge
        return out

    head.register_forward_hook(batched_rounding)
    alone = generate(model, tiny_tokenizer, convs, GenSettings(max_new_tokens=8, batch_size=1))
    stats, unstats = {}, {}
    unchecked = generate(model, tiny_tokenizer, convs,
                         GenSettings(max_new_tokens=8, batch_size=8, exact=False), stats=unstats)  # fmt: skip
    checked = generate(model, tiny_tokenizer, convs, GenSettings(max_new_tokens=8, batch_size=8),
                       stats=stats)  # fmt: skip
    assert sum(x != y for x, y in zip(unchecked, alone)) >= 2
    assert checked == alone
    assert stats["redone_alone"] >= 2 and unstats["redone_alone"] == 0  # exact=False: as batched
    assert stats["batches"] == 2 and stats["batches_as_alone"] == 0


def test_margins_are_gaps_in_units_of_the_dtype_eps_times_the_size():
    m = gen_mod._Margins(torch.bfloat16)  # eps 2**-7
    scores = torch.tensor(
        [[20.0, 20.0, 1.0], [20.0, 19.875, 1.0], [20.0, 19.0, 1.0], [0.5, 0.49, 0.0]]
    )
    assert torch.equal(m(None, scores), scores)  # scores pass through unchanged
    units = m.steps[0].tolist()
    # a tie; one bf16 grid step (0.125) and 1.0 apart at size 20; 0.01 apart at a size below 1
    # (counted as 1)
    assert units == pytest.approx(
        [0.0, 0.125 / (20 * 2**-7), 1.0 / (20 * 2**-7), 0.01 / 2**-7], rel=1e-4
    )
    assert [u < gen_mod.NEAR_TIE_EPS for u in units] == [True, True, False, True]


def test_answer_steps_end_at_the_first_stop_token():
    assert gen_mod._answer_steps([5, 6, 2, 2, 2], [2]) == 3
    assert gen_mod._answer_steps([5, 6, 7], [2]) == 3
    assert gen_mod._answer_steps([5, 6, 7], None) == 3


def test_a_row_redone_alone_keeps_its_batched_text_only_if_it_agrees(
    tiny_llama_dir, tiny_tokenizer
):
    """Alone, a near-tie row stops as soon as it agrees with its batched answer through the last
    near tie (the batched text stands); where it parts, the alone answer is taken whole."""
    model = _model(tiny_llama_dir, torch.float32)
    gen = GenSettings(max_new_tokens=8)
    prompts = [prompt_ids(c, tiny_tokenizer) for c in _conversations(2)]
    batched = gen_mod._generate_batch(model, tiny_tokenizer, prompts, gen)[0]
    alone = gen_mod._generate_batch(model, tiny_tokenizer, prompts[:1], gen)[0]
    assert (
        batched.ids == alone.ids
        and len(batched.ids) >= 3
        and len(batched.margins) == len(batched.ids)
    )
    agreeing = gen_mod._Answer("kept", batched.ids, batched.margins)
    assert gen_mod._alone(model, tiny_tokenizer, prompts[0], gen, agreeing, last=2) == "kept"
    other = (batched.ids[2] + 1) % len(tiny_tokenizer)
    parting = gen_mod._Answer("not kept", [*batched.ids[:2], other], batched.margins[:3])
    assert gen_mod._alone(model, tiny_tokenizer, prompts[0], gen, parting, last=2) == alone.text


def test_agreed_stops_once_the_prefix_is_matched():
    stop = gen_mod._Agreed(start=2, prefix=[7, 8])
    assert not stop(torch.tensor([[1, 2, 7]]), None).item()
    assert stop(torch.tensor([[1, 2, 7, 8]]), None).item()
    assert not stop(torch.tensor([[1, 2, 7, 9, 8]]), None).item()


def test_sampling_and_single_rows_are_not_watched(tiny_llama_dir, tiny_tokenizer):
    model = _model(tiny_llama_dir, torch.bfloat16)
    prompts = [[1, 2, 3], [4, 5]]
    (one,) = gen_mod._generate_batch(
        model, tiny_tokenizer, prompts[:1], GenSettings(max_new_tokens=3)
    )
    assert one.margins == [] and one.last_near_tie(2.0) is None and len(one.ids) >= 1
    torch.manual_seed(0)
    sample = GenSettings(max_new_tokens=3, do_sample=True, temperature=1.0)
    answers = gen_mod._generate_batch(model, tiny_tokenizer, prompts, sample)
    assert [a.margins for a in answers] == [[], []]


def _lora(model):
    """A LoRA adapter as PEFT opens one on this base: fp32 on a bf16 base (autocast), its B
    made non-zero so that it changes the answers."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert {p.dtype for n, p in peft.named_parameters() if "lora_" in n} == {torch.float32}
    return peft.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_batches_read_each_prompt_alone_and_decode_together(
    tiny_llama_dir, tiny_tokenizer, dtype
):
    """With an adapter (fp32 on a bf16 base), base and tuned: each exact batch's prompts are read
    alone, its answers equal one-at-a-time ones, and the batches are counted; where the batch's
    first decoding step computed each row as alone, no row is generated again."""
    model, convs = _lora(_model(tiny_llama_dir, dtype)), _conversations(20)
    for base in (False, True):
        alone = generate(model, tiny_tokenizer, convs, GenSettings(max_new_tokens=16, batch_size=1),
                         base=base)  # fmt: skip
        stats: dict = {}
        batched = generate(model, tiny_tokenizer, convs,
                           GenSettings(max_new_tokens=16, batch_size=8), base=base, stats=stats)  # fmt: skip
        assert batched == alone and len(set(alone)) > 4
        assert stats["batches"] == 3  # 8 + 8 + 4 rows
        if stats["batches_as_alone"] == 3:
            assert stats["redone_alone"] == 0
    assert not any(m._forward_hooks for m in model.modules())  # the probes' hooks are gone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_whose_layers_all_run_row_by_row_decodes_as_alone(
    tiny_llama_dir, tiny_tokenizer, dtype
):
    """Every linear layer made to compute row by row (the shapes one row alone computes): the
    check of the first decoding step finds each row as alone in every module, so no row is
    generated again, and the answers equal one-at-a-time ones. Then one layer nudged in
    batches only: the check finds it, and the near-tie check answers as alone. Then a norm
    nudged in one middle row of a batch only (a kernel that takes rows in blocks): the check of
    every row finds it too."""
    model, convs = _model(tiny_llama_dir, dtype), _conversations(16)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(gen_mod._rows_one_at_a_time)
    alone = generate(model, tiny_tokenizer, convs, GenSettings(max_new_tokens=12, batch_size=1))
    stats: dict = {}
    batched = generate(model, tiny_tokenizer, convs, GenSettings(max_new_tokens=12, batch_size=8),
                       stats=stats)  # fmt: skip
    assert batched == alone and len(set(alone)) > 4
    assert stats["batches_as_alone"] == stats["batches"] == 2 and stats["redone_alone"] == 0

    def nudge(module, args, out):  # a kernel that rounds a batch's rows otherwise, by an ulp
        return out * (1 + torch.finfo(out.dtype).eps) if out.shape[0] > 1 else out

    def nudge_row(module, args, out):  # only the batch's fourth row, by an ulp
        if out.shape[0] > 1:
            out = out.clone()
            out[3] = out[3] * (1 + torch.finfo(out.dtype).eps)
        return out

    for layer, hook in ((model.model.layers[0].mlp.down_proj, nudge),
                        (model.model.layers[1].post_attention_layernorm, nudge_row)):  # fmt: skip
        handle = layer.register_forward_hook(hook)
        alone = generate(model, tiny_tokenizer, convs, GenSettings(max_new_tokens=12, batch_size=1))
        stats = {}
        batched = generate(model, tiny_tokenizer, convs,
                           GenSettings(max_new_tokens=12, batch_size=8), stats=stats)  # fmt: skip
        assert batched == alone
        assert stats["batches_as_alone"] == 0 and stats["batches"] == 2
        handle.remove()


def test_adapter_layers_of_another_dtype_run_row_by_row_for_the_time_being(
    tiny_llama_dir,
):
    model = _lora(_model(tiny_llama_dir, torch.bfloat16))
    lora = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" in n]
    x = torch.randn(5, 1, lora[0].in_features)
    with gen_mod._adapter_rows_alone(model):
        assert all(len(m._forward_hooks) == 1 for m in lora)
        assert not any(m._forward_hooks for n, m in model.named_modules() if "base_layer" in n)
        out = lora[0](x)
    rows = torch.cat([torch.nn.functional.linear(x[i], lora[0].weight) for i in range(5)])
    assert torch.equal(out.view(5, -1), rows)
    assert not any(m._forward_hooks for m in lora)
    same = _lora(_model(tiny_llama_dir, torch.float32))  # fp32 on fp32: left alone
    with gen_mod._adapter_rows_alone(same):
        assert not any(m._forward_hooks for m in same.modules())
