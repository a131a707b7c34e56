"""`lorasft data check`: what the data is, what is wrong with it, and what the loss will see."""

from __future__ import annotations

from typing import Any

from lorasft.config import DataSection
from lorasft.data.formats import Example, ignored_line, load_files
from lorasft.data.prepare import add_system_prompt, data_files, encode, histogram
from lorasft.data.templates import control_tokens, message_texts, spells_control
from lorasft.data.tokenize import IGNORE, Encoded


def show_mask(enc: Encoded, tok) -> str:
    """The sequence as text, with every run of loss tokens wrapped in [[ ]]."""
    parts, run, trained = [], [], None
    for tid, lab in zip(enc.input_ids, enc.labels):
        t = lab != IGNORE
        if trained is not None and t != trained:
            parts.append((trained, run))
            run = []
        run.append(tid)
        trained = t
    if run:
        parts.append((trained, run))
    text = ""
    for t, ids in parts:
        piece = tok.decode(ids, skip_special_tokens=False)
        text += f"[[{piece}]]" if t else piece
    return text


def control_text(examples: list[Example], tok) -> list[str]:
    """'file:line: field spells <|im_end|>' for each record whose text spells one of the
    tokenizer's control tokens (training reads it as text, never as the token)."""
    found, tokens = [], control_tokens(tok)
    for ex in examples:
        msgs = ex.messages
        texts = [("text", ex.text)] if ex.is_text else [
            (f"{msgs[i]['role']}.{k}", msgs[i][k]) for i, k in message_texts(msgs)]  # fmt: skip
        hit = next(((name, t) for name, v in texts if (t := spells_control(v, tokens))), None)
        if hit:
            found.append(f"{ex.source}: {hit[0]} spells {hit[1]}")
    return found


def check(cfg: DataSection, tok) -> dict[str, Any]:
    """Everything `data check` prints, as a dict; `ok` is False when there are bad records."""
    train_paths, eval_paths = data_files(cfg)
    res = load_files(train_paths + eval_paths, cfg.format, "skip", cfg.dedup,
                     cfg.allow_download)  # fmt: skip
    # what training sees: the configured system prompt included
    enc, stats = encode(add_system_prompt(res.examples, cfg), tok, cfg)
    prompt_lens = [e.response_start for e in enc if e.response_start]
    resp_lens = [len(e) - e.response_start for e in enc if e.response_start]
    tokens = sum(len(e) for e in enc)
    supervised = sum(e.n_supervised for e in enc)
    return {
        "files": [
            {
                "path": f.path,
                "format": f.format,
                "records": f.records,
                "bom": f.bom,
                "crlf_records": f.crlf_records,
            }
            for f in res.files
        ],
        "ignored_files": res.ignored,
        "records": len(res.examples),
        "bad_records": [str(b) for b in res.bad],
        "duplicates": res.duplicates,
        "control_text": control_text(res.examples, tok),
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "would_drop": len(stats.dropped_too_long),
        "would_truncate": stats.truncated,
        "long_text": stats.text,
        "sequence_lengths": histogram([len(e) for e in enc]),
        "prompt_lengths": histogram(prompt_lens),
        "response_lengths": histogram(resp_lens),
        "tokens": tokens,
        "supervised_share": round(supervised / tokens, 4) if tokens else 0.0,
        "example": show_mask(enc[0], tok) if enc else None,
        "ok": not res.bad,
    }


def render_report(r: dict[str, Any]) -> str:
    lines = [f"{f['path']}: {f['format']}, {f['records']} usable records"
             + (", UTF-8 BOM stripped" if f["bom"] else "")
             + (f", CRLF normalised in {f['crlf_records']}" if f["crlf_records"] else "")
             for f in r["files"]]  # fmt: skip
    if note := ignored_line(r["ignored_files"]):
        lines.append(note)
    lines.append(f"bad records: {len(r['bad_records'])}")
    lines += [f"  {b}" for b in r["bad_records"][:50]]
    lines.append(f"duplicates dropped: {r['duplicates']}")
    lines.append(f"records whose text spells a control token (read as text, not as the token): "
                 f"{len(r['control_text'])}")  # fmt: skip
    lines += [f"  {c}" for c in r["control_text"][:50]]
    lines.append(f"max_length {r['max_length']} ({r['truncation']}): {r['would_drop']} would be "
                 f"dropped, {r['would_truncate']} prompt-truncated")  # fmt: skip
    if r["long_text"]:
        t = r["long_text"]
        lines.append(f"raw text: {t['documents']} documents, {t['tokens']} tokens joined with EOS "
                     f"into {t['windows']} windows (tail dropped: {t['tail_dropped_tokens']} tokens)")  # fmt: skip
    for key in ("sequence_lengths", "prompt_lengths", "response_lengths"):
        lines.append(
            f"{key.replace('_', ' ')} (tokens): "
            + ", ".join(f"{k}: {v}" for k, v in r[key].items())
        )
    lines.append(f"tokens {r['tokens']}, share in the loss {r['supervised_share']:.1%}")
    if r["example"] is not None:
        lines += ["example (loss tokens in [[ ]]):", r["example"]]
    return "\n".join(lines)
