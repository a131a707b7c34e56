"""`lorasft verify`: does every shipped form of a run answer like the adapter on its base?

The reference is the run itself (base + adapter, the run's tokenizer and stop ids). Each other
target (a merged folder, a GGUF file, a live OpenAI-compatible server) is used the way a user
would use it: its own tokenizer renders the prompt and its own generation config says where to
stop. Differences in template, BOS or EOS therefore show up as differing prompts or tokens.
"""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasft.data.templates import adds_bos, build_prompt, prompt_messages
from lorasft.data.tokenize import prompt_ids
from lorasft.export.llamacpp_verify import LlamaCpp
from lorasft.model.context import base_window
from lorasft.model.generation import GenSettings
from lorasft.model.load import ModelError

# How far a target's own rounding may move a logit, by the type of its weights: below this plus
# one step of the run's logit dtype, the run's top two are too close for a different pick to be a
# defect. Float types: bounds above the margins measured at every differing pick (tiny test
# models: f16 3e-5; demo fp32 run: 1.3e-4 for f32/f16; docs/shipping.md) and below what a
# different model gives (tests/export/test_llamacpp.py).
ROUNDING = {"F32": 1e-3, "F16": 0.05, "BF16": 0.1}
# A quantized file's rounding is a share of each block's largest weight (a step of 1/254 of it
# at 8 bits, 1/32 at 5, 1/16 at 4), so what it moves a logit by grows with the logits
# themselves: these bounds are shares of the run's largest |logit| at the position, above the
# largest change of the run's margin measured on the demo in llama.cpp (bench/shipping/gguf_types.py,
# 335 answer positions, docs/shipping.md: Q8_0 4.7%, Q6_K 6.8%, Q5_K_M 27.4%, Q4_K_M 12.0%,
# Q4_0 26.1%). A k-quant file is a mix (Q4_K_M keeps some tensors at Q6_K; rows not a multiple
# of 256, as SmolLM2-135M's 576, fall back to 32-blocks), so its bound is measured, not derived.
ROUNDING_SHARE = {"Q8_0": 0.05, "Q6_K": 0.08, "Q5_K_M": 0.30, "Q4_K_M": 0.15, "Q4_0": 0.30}


def rounding(kind: str, logits: torch.Tensor) -> float:
    """How far a target of this weight type may move the run's margins at a position whose
    logits (the run's) are `logits`; 0 for a type not known."""
    if kind in ROUNDING_SHARE:
        return ROUNDING_SHARE[kind] * logits.abs().max().item()
    return ROUNDING.get(kind, 0.0)


def describe_rounding(kind: str) -> str:
    """`rounding`'s bound for this type, in words."""
    if kind in ROUNDING_SHARE:
        return f"{ROUNDING_SHARE[kind]:.0%} of the run's largest logit"
    return f"{ROUNDING.get(kind, 0.0)}"


# What a QLoRA run's own quantized base adds, its targets being merged into the dequantized
# weights: nf4 / fp4 layers compute with exactly those dequantized values (bitsandbytes
# dequantizes, then multiplies), so nothing beyond the target's rounding (measured on the tiny
# models: 1.5e-7 fp32, 3e-3 bf16, as an unquantized run). LLM.int8 also rounds each activation
# row to 8 bits (absmax / 127) before multiplying, which the merged weights do not: rounding of
# the order of Q8_0's on both operands (measured 4.5e-3 fp32, 5.5e-3 bf16 on the tiny models;
# 0.25, the absolute bound Q8_0 files had before theirs became a share).
QUANTIZED_ROUNDING = {"none": 0.0, "nf4": 0.0, "fp4": 0.0, "int8": 0.25}

REFERENCE = "adapter"
"""The target name of the run itself, which every other target is compared with."""
VERDICTS = ("same", "near_tie", "differ")
"""A compared prompt's outcome: the same tokens; parted where the run's own margin is within the
target's rounding (passes); or a failure."""


@dataclass
class Target:
    name: str
    tok: object
    eos: list[int]
    model: object = None  # None for a server
    url: str | None = None
    api_key: str | None = None
    server_model: str | None = None
    weights: str = "F32"  # a server's weight type, as its /health says (its rounding: ROUNDING)
    quantization: str = "none"  # the reference's: a QLoRA run's base (QUANTIZED_ROUNDING)


@dataclass
class Row:
    prompt: int
    target: str
    prompt_ok: bool
    tokens_ok: bool
    logit_diff: float | None = None
    detail: str = ""
    near_tie: bool = False  # tokens differ where the run's own top two logits are closer than
    # the target's rounding (ROUNDING): reported, not a failure

    @property
    def ok(self) -> bool:
        return self.prompt_ok and (self.tokens_ok or self.near_tie)

    @property
    def verdict(self) -> str:
        """One of VERDICTS."""
        return "differ" if not self.ok else "same" if self.tokens_ok else "near_tie"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # tokenizer / special-token disagreements

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.rows)

    def tally(self) -> dict[str, dict[str, int]]:
        """Each compared target's prompts by verdict (the run itself, the reference, left out)."""
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            if r.target != REFERENCE:
                out.setdefault(r.target, dict.fromkeys(VERDICTS, 0))[r.verdict] += 1
        return out


def prompt_set(spec, limit: int, required: bool = True) -> list[list[dict]]:
    """The run's eval conversations (its training records if it had none) without their answers,
    as the run sees them (its system prompt included). A run on raw text has none: an error
    unless not `required` (verify --long checks such a run on its long text alone)."""
    from lorasft.data.prepare import load_split

    train, evals, _ = load_split(spec.cfg.data)  # a staged run's last stage
    chats = [ex for ex in (evals or train) if not ex.is_text and ex.messages]
    if not chats and not required:
        return []
    if not chats:
        raise ModelError("verify: the run's data has no chat records to build prompts from")
    return [spec.conversation(prompt_messages(ex.messages)) for ex in chats[:limit]]


def long_prompts(tok, length: int) -> list[str]:
    """A passkey text of about `length` tokens (raw text, no chat template): past the original
    window it checks that a runtime applies the run's RoPE scaling."""
    from lorasft.data.passkey import build_prompt as passkey_prompt

    return [passkey_prompt(tok, length, 0.5, 52817).text]


def check_prompt_ids(prompt, tok) -> list[int]:
    """A chat prompt through the template; a raw text as the long-context evaluation reads it."""
    if isinstance(prompt, str):
        bos = [tok.bos_token_id] if adds_bos(tok) else []
        return bos + tok(prompt, add_special_tokens=False).input_ids
    return prompt_ids(prompt, tok)


def prompt_text(prompt, tok) -> str:
    return prompt if isinstance(prompt, str) else build_prompt(prompt, tok)


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return sorted(value) if isinstance(value, list) else [value]


def load_merged(folder: str | Path) -> Target:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"--merged {folder}: no config.json; give the folder `lorasft merge` wrote"
        )
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return Target("merged", tok, _eos_list(model.generation_config.eos_token_id), model)


def load_gguf(path: str | Path) -> Target:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--gguf {path}: no such file")
    # transformers reads a folder holding adapter_config.json (a run folder, where `export` may
    # have written the file) as a PEFT adapter; give it a folder with the file alone.
    with tempfile.TemporaryDirectory() as alone:
        (Path(alone) / path.name).symlink_to(path.resolve())
        tok = AutoTokenizer.from_pretrained(alone, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            alone, gguf_file=path.name, dtype=torch.float32
        )
    return Target("gguf", tok, _eos_list(model.generation_config.eos_token_id), model.eval())


def special_problems(ref: Target, t: Target) -> list[str]:
    """BOS, EOS and template disagreements between a target's tokenizer and the run's."""
    out = []
    checks = (("bos_token_id", ref.tok.bos_token_id, t.tok.bos_token_id),
              ("adds BOS to text", adds_bos(ref.tok), adds_bos(t.tok)),
              ("eos_token_id", ref.tok.eos_token_id, t.tok.eos_token_id))  # fmt: skip
    for what, want, got in checks:
        if want != got:
            out.append(f"{t.name}: {what} is {got!r}, the run has {want!r}")
    if t.model is not None and not set(t.eos) & set(ref.eos):
        out.append(
            f"{t.name}: generation stops at ids {t.eos}, none of the run's stop ids {ref.eos}"
        )
    if (t.tok.chat_template or "") != (ref.tok.chat_template or ""):
        out.append(f"{t.name}: chat_template differs from the template the run trained with")
    return out


@torch.no_grad()
def greedy(t: Target, ids: list[int], max_new_tokens: int) -> list[int]:
    """New token ids, one prompt at a time (no padding, so nothing but the weights can differ)."""
    x = torch.tensor([ids], device=t.model.device)
    kwargs = GenSettings.greedy(max_new_tokens).kwargs(t.tok, eos=t.eos)
    out = t.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
    return out[0, len(ids) :].tolist()


@torch.no_grad()
def prompt_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu()


def ask_server(t: Target, messages: list[dict], max_tokens: int) -> str:
    """One chat completion at temperature 0 from an OpenAI-compatible server."""
    body = {
        "model": t.server_model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    headers = {"Content-Type": "application/json"}
    if t.api_key:
        headers["Authorization"] = f"Bearer {t.api_key}"
    req = urllib.request.Request(f"{t.url.rstrip('/')}/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers=headers)  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise ModelError(f"--url {t.url}: HTTP {e.code}: {e.read()[:300]!r}") from e
    except urllib.error.URLError as e:
        raise ModelError(
            f"--url {t.url}: cannot connect ({e.reason}); is `lorasft serve` running?"
        ) from e
    except TimeoutError as e:
        raise ModelError(f"--url {t.url}: no answer within 120 s") from e
    return data["choices"][0]["message"]["content"] or ""


def server_engine(url: str) -> tuple[str, str]:
    """What generates behind `url` and its weight type, from lorasft serve's /health (another
    server: unknown, taken as F32)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10) as resp:
            health = json.loads(resp.read())
    except (urllib.error.URLError, TimeoutError, ValueError):
        return "unknown", "F32"
    weights = "F32" if health.get("engine") == "transformers" else health.get("weights", "F32")
    return health.get("engine", "unknown"), str(weights).upper()


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _describe(tok, want: list[int], got: list[int], what: str) -> str:
    i = _first_diff(want, got)
    if i is None:
        return ""
    show = lambda ids: f"{ids[i]} {tok.decode([ids[i]])!r}" if i < len(ids) else "<end>"
    return f"{what} token {i}: expected {show(want)}, got {show(got)}"


def compare_model(ref: Target, t: Target, messages: list[dict], ref_ids: list[int],
                  ref_out: list[int], ref_logits, i: int, max_new_tokens: int) -> Row:  # fmt: skip
    ids = check_prompt_ids(messages, t.tok)
    out = greedy(t, ids, max_new_tokens)
    diff = None
    if t.model.config.vocab_size == ref.model.config.vocab_size:
        diff = (ref_logits - prompt_logits(t.model, ref_ids)).abs().max().item()
    detail = _describe(ref.tok, ref_ids, ids, "prompt")
    if detail or out == ref_out:
        return Row(i, t.name, ids == ref_ids, out == ref_out, diff, detail)
    kind = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(t.model.dtype, "F32")
    detail, tie = weigh_divergence(ref, ref_ids, ref_out, out, kind)
    return Row(i, t.name, True, False, diff, detail, near_tie=tie)


def weigh_divergence(ref: Target, ref_ids: list[int], ref_out: list[int], out: list[int],
                     kind: str, cache: str | None = None) -> tuple[str, bool]:  # fmt: skip
    """The first differing output token, the run's margin for its own token there, and whether
    that is a near tie: a margin within what the target's rounding (weights of type `kind`, and
    a K/V cache of type `cache` if that rounds more) moves logits plus one step of the run's own
    logit dtype, so the run itself cannot rank the two apart."""
    detail = _describe(ref.tok, ref_out, out, "output")
    j = _first_diff(ref_out, out)
    if j is None or j >= len(ref_out) or j >= len(out):  # one stopped where the other went on
        return detail, False
    ours, resolution = last_logits(ref.model, ref_ids + ref_out[:j])
    gap = (ours[ref_out[j]] - ours[out[j]]).item()  # >= 0: the run preferred its own token
    bound = max(rounding(kind, ours), rounding(cache, ours) if cache else 0.0)
    tie = gap <= bound + QUANTIZED_ROUNDING[ref.quantization] + resolution
    return f"{detail}; run's margin {gap:.3g}{' (near tie)' if tie else ''}", tie


@torch.no_grad()
def last_logits(model, ids: list[int]) -> tuple[torch.Tensor, float]:
    """The next-token logits and their resolution: one step of the dtype the model computes them
    in (a bf16 run cannot tell apart logits closer than that)."""
    logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]
    step = torch.finfo(logits.dtype).eps * logits.abs().max().item()
    return logits.float().cpu(), step


def compare_llamacpp(ref: Target, lc, messages: list[dict], ref_ids: list[int],
                     ref_out: list[int], i: int, max_new_tokens: int) -> Row:  # fmt: skip
    """The run's prompt text through llama.cpp's tokenizer, then llama.cpp's greedy tokens; at
    the first differing token, the margin in llama.cpp's logits and in the run's."""
    name = f"llama.cpp:{lc.type.lower()}"
    ids = lc.encode(prompt_text(messages, ref.tok))
    out, rows = lc.greedy(ids, max_new_tokens)
    detail = _describe(ref.tok, ref_ids, ids, "prompt")
    if detail or out == ref_out:
        return Row(i, name, ids == ref_ids, out == ref_out, None, detail)
    # llama.cpp keeps K and V in f16 (its default cache type): an f32 file rounds as f16 there
    # (measured on the demo: margins move by up to 0.027 in an f32 file; bench/shipping/gguf_types.py)
    detail, tie = weigh_divergence(ref, ref_ids, ref_out, out, lc.type, cache="F16")
    j = _first_diff(ref_out, out)
    if j < len(rows) and j < len(ref_out):
        detail += f"; llama.cpp's margin {float(rows[j][out[j]] - rows[j][ref_out[j]]):.3g}"
    return Row(i, name, True, False, None, detail, near_tie=tie)


def compare_server(ref: Target, t: Target, messages: list[dict], ref_ids: list[int],
                   ref_out: list[int], i: int, max_new_tokens: int) -> Row:  # fmt: skip
    """A server shows text, not tokens: the first of the run's tokens that the served text does
    not continue is where they part, weighed by the run's margin there between its own token and
    its runner-up (a near tie when within the server's rounding, by its weight type)."""
    want = ref.tok.decode(ref_out, skip_special_tokens=True).strip()
    got = ask_server(t, messages, max_new_tokens).strip()
    if got == want:
        return Row(i, t.name, True, True)
    j = parting_token(ref, ref_out, got)
    ours, resolution = last_logits(ref.model, ref_ids + ref_out[:j])
    others = ours.clone()
    others[ref_out[j]] = float("-inf")
    runner = int(others.argmax())
    gap = (ours[ref_out[j]] - ours[runner]).item()  # 0 at an exact tie, which greedy broke
    tie = gap <= rounding(t.weights, ours) + QUANTIZED_ROUNDING[ref.quantization] + resolution
    detail = (f"output token {j}: the run chose {ref_out[j]} {ref.tok.decode([ref_out[j]])!r} over "
              f"{runner} {ref.tok.decode([runner])!r} by {gap:.3g}{' (near tie)' if tie else ''}; "
              f"text: expected {want[:40]!r}, got {got[:40]!r}")  # fmt: skip
    return Row(i, t.name, True, False, None, detail, near_tie=tie)


def parting_token(ref: Target, ref_out: list[int], got: str) -> int:
    """Index of the first of the run's tokens whose text the served text does not continue.
    A token ending inside a character decodes to U+FFFD until the next completes it, so such
    prefixes are not judged; a run that stopped where the server went on parts at its stop."""
    agreed = 0
    for k in range(len(ref_out)):
        text = ref.tok.decode(ref_out[: k + 1], skip_special_tokens=True).strip()
        if text.endswith("\ufffd"):
            continue
        if not got.startswith(text):
            return agreed
        agreed = k + 1
    return min(agreed, len(ref_out) - 1)


def verify(ref: Target, targets: list[Target], prompts: list[list[dict]], max_new_tokens: int,
           runtimes: tuple = ()) -> Report:  # fmt: skip
    """Compare every target (and every llama.cpp runtime) with the reference on every prompt."""
    report = Report()
    for t in targets:
        if t.model is not None:  # a server's tokenizer is not visible; its answers are compared
            report.problems += special_problems(ref, t)
    for lc in runtimes:
        report.problems += llamacpp_problems(ref, lc)
    for i, messages in enumerate(prompts):
        ref_ids = check_prompt_ids(messages, ref.tok)
        ref_out = greedy(ref, ref_ids, max_new_tokens)
        # raw long texts go to llama.cpp only: merged/GGUF/server targets are checked on chats
        chat_targets = [] if isinstance(messages, str) else targets
        ref_logits = (
            prompt_logits(ref.model, ref_ids)
            if any(t.model is not None for t in chat_targets)
            else None
        )
        report.rows.append(
            Row(i, ref.name, True, True, None, f"{len(ref_ids)} prompt + {len(ref_out)} new")
        )
        for t in chat_targets:
            if t.model is None:
                report.rows.append(
                    compare_server(ref, t, messages, ref_ids, ref_out, i, max_new_tokens)
                )
            else:
                report.rows.append(
                    compare_model(ref, t, messages, ref_ids, ref_out, ref_logits, i, max_new_tokens)
                )
        for lc in runtimes:
            report.rows.append(
                compare_llamacpp(ref, lc, messages, ref_ids, ref_out, i, max_new_tokens)
            )
    return report


def llamacpp_problems(ref: Target, lc) -> list[str]:
    """What llama.cpp reads from the file against what the run trained with."""
    name, out = f"llama.cpp:{lc.type.lower()}", []
    if lc.add_bos != adds_bos(ref.tok):
        out.append(f"{name}: adds BOS is {lc.add_bos}, the run has {adds_bos(ref.tok)}")
    if not set(lc.stops) & set(ref.eos):
        out.append(f"{name}: stops at ids {lc.stops}, none of the run's stop ids {ref.eos}")
    if lc.chat_template != (ref.tok.chat_template or ""):
        out.append(f"{name}: chat_template differs from the template the run trained with")
    return out


def load_reference(run_dir: str | Path):
    """`(spec, reference target)`: the adapter on its base as it trained, with the run's
    tokenizer and stop ids."""
    from lorasft.model.reopen import open_run

    run = open_run(run_dir)
    return run.spec, Target(REFERENCE, run.tok, run.spec.stops, run.model,
                            quantization=run.spec.quantization)  # fmt: skip


def render(report: Report, prompts: list[list[dict]]) -> str:
    lines = [
        f"{'prompt':>6}  {'target':<8} {'prompt ids':<10} {'tokens':<7} {'max|dlogit|':>11}  note"
    ]
    for r in report.rows:
        diff = "" if r.logit_diff is None else f"{r.logit_diff:.2e}"
        tokens = "same" if r.tokens_ok else ("tie" if r.near_tie else "DIFFER")
        lines.append(f"{r.prompt:>6}  {r.target:<8} {'same' if r.prompt_ok else 'DIFFER':<10} "
                     f"{tokens:<7} {diff:>11}  {r.detail}")  # fmt: skip
    lines += [f"problem: {p}" for p in report.problems]
    bad = next((r for r in report.rows if not r.ok), None)
    if bad is not None:
        p = prompts[bad.prompt]
        user = f"long text, {len(p)} characters" if isinstance(p, str) else p[-1]["content"]
        lines.append(
            f"first mismatch: prompt {bad.prompt} ({user[:80]!r}) on {bad.target}: {bad.detail}"
        )
    total = {v: sum(t[v] for t in report.tally().values()) for v in VERDICTS}
    ties = total["near_tie"]
    tie_note = f" ({ties} at a near tie)" if ties else ""
    lines.append(f"{'OK' if report.ok else 'MISMATCH'}: {total['same'] + ties}/"
                 f"{sum(total.values())} prompt-target pairs agree{tie_note}")  # fmt: skip
    return "\n".join(lines)


def check_run(run_dir: str | Path, merged: str | None = None, gguf: str | None = None,
              url: str | None = None, api_key: str | None = None, server_model: str | None = None,
              max_new_tokens: int = 32, num_prompts: int = 8,
              llama_cpp: list[str] | None = None, long: int | None = None) -> Report:  # fmt: skip
    """Load every target given, compare it with the run, print the table; the report says ok.
    `long`: also a raw text of that many tokens through llama.cpp (its RoPE scaling checked)."""
    n_ctx = max(2048, (long or 0) + max_new_tokens + 16)
    runtimes = tuple(LlamaCpp(f, n_ctx) for f in llama_cpp or [])  # before loading the run
    spec, ref = load_reference(run_dir)
    targets = [load_merged(merged)] if merged else []
    targets += [load_gguf(gguf)] if gguf else []
    if url:
        name = server_model or Path(run_dir).resolve().name
        engine, weights = server_engine(url)
        print(f"server {url}: engine {engine}, weights {weights} (a near tie is a margin within "
              f"{describe_rounding(weights)} + the run's logit resolution)")  # fmt: skip
        targets.append(Target("server", None, [], url=url, api_key=api_key, server_model=name,
                              weights=weights))  # fmt: skip
    if not targets and not runtimes:
        raise ModelError("verify: nothing to compare; give --merged DIR, --gguf FILE, "
                         "--llama-cpp FILE... and/or --url URL")  # fmt: skip
    prompts = prompt_set(spec, num_prompts, required=not long)
    if long:
        if not runtimes:
            raise ModelError(
                "verify --long: give --llama-cpp FILE (the long text is checked there)"
            )
        window = base_window(spec.base_path, spec.cfg.model.trust_remote_code)
        if long <= window:
            print(f"note: --long {long} is inside the base's {window}-token window: it does not "
                  "reach the positions that only the RoPE scaling covers")  # fmt: skip
        prompts += long_prompts(ref.tok, long)
    report = verify(ref, targets, prompts, max_new_tokens, runtimes)
    print(render(report, prompts))
    return report
