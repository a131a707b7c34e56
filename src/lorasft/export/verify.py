"""`lorasft verify`: does every shipped form of a run answer like the adapter on its base?

The reference is the run itself (base + adapter, the run's tokenizer and stop ids). Each other
target (a merged folder, a GGUF file, a live OpenAI-compatible server) is used the way a user
would use it: its own tokenizer renders the prompt and its own generation config says where to
stop. Differences in template, BOS or EOS therefore show up as differing prompts or tokens.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasft.data.templates import adds_bos, prompt_messages, with_system
from lorasft.data.tokenize import stop_ids
from lorasft.eval.generate import encode_prompt
from lorasft.model.load import ModelError


@dataclass
class Target:
    name: str
    tok: object
    eos: list[int]
    model: object = None  # None for a server
    url: str | None = None
    api_key: str | None = None
    server_model: str | None = None


@dataclass
class Row:
    prompt: int
    target: str
    prompt_ok: bool
    tokens_ok: bool
    logit_diff: float | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.prompt_ok and self.tokens_ok


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # tokenizer / special-token disagreements

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.rows)


def prompt_set(cfg, limit: int) -> list[list[dict]]:
    """The run's eval conversations (its training records if it had none) without their answers."""
    from lorasft.data.prepare import load_split

    cfg = cfg.last_stage()  # a staged run ends on its last stage's data
    train, evals, _ = load_split(cfg.data)
    chats = [ex for ex in (evals or train) if not ex.is_text and ex.messages]
    if not chats:
        raise ModelError("verify: the run's data has no chat records to build prompts from")
    return [
        with_system(prompt_messages(ex.messages), cfg.data.system_prompt) for ex in chats[:limit]
    ]


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
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
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
    out = t.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=max_new_tokens, eos_token_id=t.eos or None,
                           pad_token_id=t.tok.pad_token_id, temperature=None, top_k=None,
                           top_p=None)  # fmt: skip
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
    ids = encode_prompt(messages, t.tok)
    out = greedy(t, ids, max_new_tokens)
    diff = None
    if t.model.config.vocab_size == ref.model.config.vocab_size:
        diff = (ref_logits - prompt_logits(t.model, ref_ids)).abs().max().item()
    detail = _describe(ref.tok, ref_ids, ids, "prompt") or _describe(
        ref.tok, ref_out, out, "output"
    )
    return Row(i, t.name, ids == ref_ids, out == ref_out, diff, detail)


def compare_server(ref: Target, t: Target, messages: list[dict], ref_out: list[int], i: int,
                   max_new_tokens: int) -> Row:  # fmt: skip
    want = ref.tok.decode(ref_out, skip_special_tokens=True).strip()
    got = ask_server(t, messages, max_new_tokens).strip()
    detail = "" if got == want else f"text: expected {want[:60]!r}, got {got[:60]!r}"
    return Row(i, t.name, True, got == want, None, detail)


def verify(
    ref: Target, targets: list[Target], prompts: list[list[dict]], max_new_tokens: int
) -> Report:
    """Compare every target with the reference on every prompt."""
    report = Report()
    for t in targets:
        if t.model is not None:  # a server's tokenizer is not visible; its answers are compared
            report.problems += special_problems(ref, t)
    for i, messages in enumerate(prompts):
        ref_ids = encode_prompt(messages, ref.tok)
        ref_out = greedy(ref, ref_ids, max_new_tokens)
        ref_logits = (
            prompt_logits(ref.model, ref_ids) if any(t.model is not None for t in targets) else None
        )
        report.rows.append(
            Row(i, ref.name, True, True, None, f"{len(ref_ids)} prompt + {len(ref_out)} new")
        )
        for t in targets:
            if t.model is None:
                report.rows.append(compare_server(ref, t, messages, ref_out, i, max_new_tokens))
            else:
                report.rows.append(
                    compare_model(ref, t, messages, ref_ids, ref_out, ref_logits, i, max_new_tokens)
                )
    return report


def load_reference(run_dir: str | Path):
    """`(cfg, reference target)`: the adapter on its base, with the run's tokenizer and stop ids."""
    from lorasft.model.adapter import load_run

    cfg, tok, model = load_run(run_dir)
    return cfg, Target("adapter", tok, stop_ids(tok), model)


def render(report: Report, prompts: list[list[dict]]) -> str:
    lines = [
        f"{'prompt':>6}  {'target':<8} {'prompt ids':<10} {'tokens':<7} {'max|dlogit|':>11}  note"
    ]
    for r in report.rows:
        diff = "" if r.logit_diff is None else f"{r.logit_diff:.2e}"
        lines.append(f"{r.prompt:>6}  {r.target:<8} {'same' if r.prompt_ok else 'DIFFER':<10} "
                     f"{'same' if r.tokens_ok else 'DIFFER':<7} {diff:>11}  {r.detail}")  # fmt: skip
    lines += [f"problem: {p}" for p in report.problems]
    bad = next((r for r in report.rows if not r.ok), None)
    if bad is not None:
        user = prompts[bad.prompt][-1]["content"]
        lines.append(
            f"first mismatch: prompt {bad.prompt} ({user[:80]!r}) on {bad.target}: {bad.detail}"
        )
    agree = sum(r.ok for r in report.rows if r.target != "adapter")
    total = sum(1 for r in report.rows if r.target != "adapter")
    lines.append(f"{'OK' if report.ok else 'MISMATCH'}: {agree}/{total} prompt-target pairs agree")
    return "\n".join(lines)


def check_run(run_dir: str | Path, merged: str | None = None, gguf: str | None = None,
              url: str | None = None, api_key: str | None = None, server_model: str | None = None,
              max_new_tokens: int = 32, num_prompts: int = 8) -> Report:  # fmt: skip
    """Load every target given, compare it with the run, print the table; the report says ok."""
    cfg, ref = load_reference(run_dir)
    targets = [load_merged(merged)] if merged else []
    targets += [load_gguf(gguf)] if gguf else []
    if url:
        name = server_model or Path(run_dir).resolve().name
        targets.append(Target("server", None, [], url=url, api_key=api_key, server_model=name))
    if not targets:
        raise ModelError(
            "verify: nothing to compare; give --merged DIR, --gguf FILE and/or --url URL"
        )
    prompts = prompt_set(cfg, num_prompts)
    report = verify(ref, targets, prompts, max_new_tokens)
    print(render(report, prompts))
    return report
