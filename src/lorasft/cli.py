"""The `lorasft` command: one thin function per subcommand."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from importlib.resources import files
from pathlib import Path

from lorasft.config import Config, ConfigError, load_config
from lorasft.console import say
from lorasft.data.formats import DataError
from lorasft.data.templates import TemplateError
from lorasft.export import GGUF_TYPES, METHODS, PRUNING, QUANTIZE
from lorasft.model.host_memory import release_freed_memory
from lorasft.model.load import ModelError
from lorasft.model.precision import DTYPE_NAMES
from lorasft.serve import DEFAULT_MAX_QUEUE, ENGINES

USER_ERRORS = (ConfigError, DataError, ModelError, TemplateError, FileNotFoundError)


def _config(path: str | None, overrides: list[str]) -> Config:
    """`lorasft train a=b` with no file: the first word is an override, not a path. With no file
    at all, the built-in demo config runs."""
    if path and "=" in path and not Path(path).exists():
        overrides, path = [path, *overrides], None
    if path is None:
        path = str(files("lorasft") / "assets" / "demo.yaml")
        say(f"no config file: running the built-in demo ({path})")
    return load_config(path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from lorasft.train.pipeline import train

    train(_config(args.config, args.overrides))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from lorasft import config_reference

    print(config_reference.markdown() if args.markdown else config_reference.text(args.section))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lorasft.eval.finish import evaluate_run

    long = _long_settings(args) if args.long else None
    out = evaluate_run(args.run_dir, args.data, args.num_samples, long, args.dtype)
    print(f"written: {out}")
    return 0


def _long_settings(args: argparse.Namespace) -> dict:
    """The --long flags given, to apply over the run's own eval.long_* settings."""
    check_long_settings(args)
    names = {"lengths": "lengths", "stride": "stride", "long_data": "data", "protocol": "protocol",
             "scored": "scored", "max_windows": "max_windows", "trials": "trials", "depths": "depths", "passkey_lengths": "passkey_lengths"}  # fmt: skip
    return {
        key: getattr(args, flag) for flag, key in names.items() if getattr(args, flag) is not None
    }


def check_long_settings(args: argparse.Namespace) -> None:
    """Bad --long arguments are user errors with a message, not tracebacks from deep inside."""
    for flag in ("lengths", "passkey_lengths"):
        if getattr(args, flag) and min(getattr(args, flag)) < 2:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: every length "
                              "must be at least 2 tokens")  # fmt: skip
    if args.stride is not None and (
        args.stride < 1 or (args.lengths and args.stride > min(args.lengths))
    ):
        raise ConfigError(f"--stride {args.stride}: must be between 1 and the shortest length")
    if args.depths and not all(0.0 <= d <= 1.0 for d in args.depths):
        raise ConfigError(f"--depths {args.depths}: depths are fractions from 0 to 1")
    for name in ("trials", "max_windows", "scored"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(
                f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1"
            )


def _long_args(e: argparse.ArgumentParser) -> None:
    g = e.add_argument_group("evaluation by length (--long)")
    g.add_argument("--long", action="store_true",
                   help="also perplexity by length, passkey retrieval and the attention check")  # fmt: skip
    g.add_argument("--long-data", nargs="+", metavar="FILE",
                   help="long documents: text files or JSONL with 'text' (default: a shipped text)")  # fmt: skip
    g.add_argument("--lengths", nargs="+", type=int,
                   help="context lengths (default: half the model's window, doubling, up to the target)")  # fmt: skip
    g.add_argument("--protocol", choices=["same_tokens", "sliding"],
                   help="same_tokens (default): the same final tokens scored with each length of "
                        "context; sliding: sliding windows of each length")  # fmt: skip
    g.add_argument(
        "--scored", type=int, help="same_tokens: tokens scored per end point (default 512)"
    )
    g.add_argument(
        "--stride", type=int, help="sliding: window stride (default: half of each length)"
    )
    g.add_argument("--max-windows", type=int,
                   help="end points (same_tokens) or windows per length (sliding); default: the "
                        "run's eval.long_windows")  # fmt: skip
    g.add_argument("--trials", type=int, help="passkey trials per length x depth (default 2)")
    g.add_argument("--passkey-lengths", nargs="+", type=int,
                   help="passkey lengths (default: the perplexity lengths)")  # fmt: skip
    g.add_argument(
        "--depths", nargs="+", type=float, help="passkey depths, 0-1 (default 0 .25 .5 .75 1)"
    )


def cmd_data_check(args: argparse.Namespace) -> int:
    from lorasft.data.check import check, render_report
    from lorasft.model.load import model_folder
    from lorasft.train.setup import tokenizer_for

    target = Path(args.target)
    if target.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(target, args.overrides)
    else:
        # load_config resolves it as a config's path (a hub: id and folder:split stay as given)
        cfg = load_config(None, [f"data.train_file={args.target}", *args.overrides])
    tok = tokenizer_for(cfg, model_folder(cfg.model))
    report = check(cfg.data, tok)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else render_report(report))
    return 0 if report["ok"] and report["records"] else 1


def _gen_settings(args: argparse.Namespace, cfg: Config):
    from dataclasses import replace

    from lorasft.model.generation import GenSettings

    gen = GenSettings.from_config(cfg.eval).with_temperature(args.temperature)
    return replace(gen, max_new_tokens=args.max_new_tokens or gen.max_new_tokens)


def cmd_generate(args: argparse.Namespace) -> int:
    from lorasft.eval.generate import generate
    from lorasft.model.reopen import open_run

    run = open_run(args.run_dir, args.dtype)
    messages = run.spec.conversation([{"role": "user", "content": args.prompt}], args.system)
    gen = _gen_settings(args, run.cfg)
    print(generate(run.model, run.tok, [messages], gen, base=args.base)[0])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lorasft.eval.generate import stream
    from lorasft.model.reopen import open_run

    run = open_run(args.run_dir, args.dtype)
    gen = _gen_settings(args, run.cfg)
    history: list[dict] = []
    print("lorasft chat: empty line or Ctrl-D to quit, /reset to clear the history")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        reply = ""
        for piece in stream(run.model, run.tok, run.spec.conversation(history, args.system), gen):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply.strip()})
    return 0


def _adapter_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=RUN_DIR, e.g. tuned=runs/demo")
    return name, path


def cmd_plan(args: argparse.Namespace) -> int:
    from lorasft.model.load import config_folder, model_folder, read_config
    from lorasft.model.plan import describe_plan
    from lorasft.model.precision import resolve_precision
    from lorasft.train.pipeline import settings_for_answers

    cfg, _ = settings_for_answers(_config(args.config, args.overrides))  # the LoRA training runs
    path = config_folder(cfg.model.path) or model_folder(cfg.model)
    config = read_config(path, cfg.model.trust_remote_code)
    precision = resolve_precision(cfg.train.precision)
    for line in describe_plan(config, cfg, precision, args.lengths, timed=not args.memory_only):
        print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lorasft.serve.app import create_app, serve
    from lorasft.serve.engine_choice import EngineOptions, open_engine

    opts = EngineOptions(args.engine, args.slots, args.max_queue, args.gguf_type,
                         args.llama_server, args.threads)  # fmt: skip
    engine = open_engine(args.base, args.adapter, args.dtype, opts)
    try:
        key = _api_key(args)
        app = create_app(engine, key, args.max_tokens_cap, args.max_request_bytes)
        say(f"serving {', '.join(engine.served)} on http://{args.host}:{args.port}/v1 "
            f"with {engine.name} ({engine.slots} at once, {engine.max_queue} queued)"
            f"{'; API key required' if key else ''}")  # fmt: skip
        serve(app, args.host, args.port)
    finally:
        engine.close()
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("LORASFT_API_KEY") or None


def _count(least: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return n

    return parse


_positive, _non_negative = _count(1), _count(0)


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=list(DTYPE_NAMES),
                   help="open the base in this dtype instead of the one the run trained in")  # fmt: skip


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server for a base model and its adapters")
    s.add_argument("--base", help="base model: default, a HF folder or a .gguf (default: the "
                   "first adapter run's base, else the default model)")  # fmt: skip
    s.add_argument("--adapter", action="append", type=_adapter_arg, default=[],
                   metavar="NAME=RUN_DIR", help="a finished run served as model NAME (repeatable)")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or env LORASFT_API_KEY)")
    s.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens accepted")
    s.add_argument("--max-request-bytes", type=int, default=1_000_000, help="largest request body")
    s.add_argument("--engine", choices=ENGINES, default="auto",
                   help="what generates: llama.cpp (llama-server, batching; default on a CPU where "
                   "it is installed), vllm (GPU), transformers (one at a time, exactly as training "
                   "evaluated; the fallback)")  # fmt: skip
    s.add_argument("--slots", type=_positive, default=8,
                   help="requests generated at once by llama.cpp / vLLM (llama-server --parallel)")  # fmt: skip
    s.add_argument("--max-queue", type=_non_negative, default=DEFAULT_MAX_QUEUE,
                   help="requests waiting for a slot; past that the answer is 503 + Retry-After")  # fmt: skip
    s.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                   help="llama.cpp: the type of the base GGUF lorasft writes (adapters stay F32; "
                   f"{', '.join(QUANTIZE)} through llama-quantize)")  # fmt: skip
    s.add_argument("--llama-server", metavar="PATH",
                   help="llama.cpp: this llama-server binary (default: the venv's, then PATH)")  # fmt: skip
    s.add_argument("--threads", type=_positive, help="llama.cpp: CPU threads (default: its own)")
    _dtype_arg(s)
    s.set_defaults(fn=cmd_serve)


def cmd_merge(args: argparse.Namespace) -> int:
    from lorasft.export.merge import merge, new_folder, write_combined_adapter

    runs = [args.run_dir, *args.also]
    for flag, path in (("--out", args.out), ("--adapter-out", args.adapter_out)):
        if path:
            new_folder(path, flag)  # both checked before either is written
    if args.density is not None and args.method not in PRUNING:
        raise ConfigError(f"--density is for the pruning methods ({', '.join(PRUNING)}), not "
                          f"--method {args.method}")  # fmt: skip
    if args.adapter_out:
        out = write_combined_adapter(runs, args.adapter_out, args.weights, args.method,
                                     args.density)  # fmt: skip
        print(f"combined adapter written: {out} (a run folder: eval, serve and export open it)")
    if args.out:
        out = merge(runs, args.out, args.dtype, args.weights, args.method, args.density)
        print(f"merged model written: {out}")
    if not (args.out or args.adapter_out):
        raise ConfigError("lorasft merge: give --out (a merged model folder), --adapter-out (a "
                          "combined adapter), or both")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "ollama":
        from lorasft.export.ollama import export_ollama

        out = export_ollama([args.run_dir, *args.also], args.out, args.type, args.weights)
        print(f"Ollama folder written: {out} (ollama create NAME -f {out / 'Modelfile'})")
        return 0
    from lorasft.export.gguf import export_gguf

    out = export_gguf([args.run_dir, *args.also], args.out, args.type, args.weights)
    print(f"GGUF written: {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from lorasft.export.verify import check_run

    report = check_run(args.run_dir, args.merged, args.gguf, args.url, args.api_key,
                       args.server_model, args.max_new_tokens, args.num_prompts,
                       args.llama_cpp, args.long)  # fmt: skip
    return 0 if report.ok else 1


def _add_export_parsers(sub) -> None:
    m = sub.add_parser("merge", help="merge the adapter into its base: a plain Hugging Face folder")
    x = sub.add_parser("export", help="export the merged model as GGUF (llama architecture)")
    for q in (m, x):
        q.add_argument("run_dir")
        q.add_argument(
            "--out",
            required=q is x,
            help="output folder (merge, export --format ollama) or .gguf file (export)",
        )
        q.add_argument(
            "--also", nargs="*", default=[], help="more runs of the same base, merged in order"
        )
        q.add_argument(
            "--weights", nargs="*", type=float, help="one weight per run (default 1.0 each)"
        )
    m.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    m.add_argument("--method", default="linear", choices=list(METHODS),
                   help="how several runs' adapters combine: linear (the weighted sum of their "
                   "deltas) or one of PEFT's add_weighted_adapter methods")  # fmt: skip
    m.add_argument("--density", type=float,
                   help="the pruning methods (ties*, dare_*, magnitude_prune*): the share of "
                   "entries kept")  # fmt: skip
    m.add_argument("--adapter-out",
                   help="write the combined adapter as a run folder (methods other than linear)")  # fmt: skip
    m.set_defaults(fn=cmd_merge)
    x.add_argument("--format", default="gguf", choices=["gguf", "ollama"],
                   help="gguf: one .gguf file; ollama: a folder with model.gguf and a Modelfile "
                   "(the run's chat template, stop tokens and system prompt)")  # fmt: skip
    x.add_argument("--type", default="f32", choices=GGUF_TYPES,
                   help=f"the GGUF's weights; {', '.join(QUANTIZE)} are made by llama.cpp's "
                   "llama-quantize (`make llama-server` builds it) from an f32 file")  # fmt: skip
    x.set_defaults(fn=cmd_export)
    v = sub.add_parser("verify", help="check merged / GGUF / served forms answer like the run")
    v.add_argument("run_dir")
    v.add_argument("--merged", help="folder written by `lorasft merge`")
    v.add_argument("--gguf", help="file written by `lorasft export`, read back by transformers")
    v.add_argument("--llama-cpp", nargs="+", metavar="GGUF",
                   help="GGUF files run in llama.cpp itself (pip install -e '.[llamacpp]')")  # fmt: skip
    v.add_argument("--url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    v.add_argument("--api-key", help="bearer key for --url")
    v.add_argument(
        "--server-model", help="`model` field sent to --url (default: the run folder name)"
    )
    v.add_argument("--max-new-tokens", type=int, default=32)
    v.add_argument("--num-prompts", type=int, default=8, help="eval records to compare on")
    v.add_argument("--long", type=int, metavar="TOKENS",
                   help="also a text of this many tokens through --llama-cpp (past the original "
                        "window it checks the run's RoPE scaling in llama.cpp)")  # fmt: skip
    v.set_defaults(fn=cmd_verify)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorasft", description="LoRA instruction fine-tuning: train, check, evaluate, ship."
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="fine-tune (no config: the built-in demo on the default model)"
    )
    t.add_argument("config", nargs="?", help="YAML file (one experiment)")
    t.add_argument("overrides", nargs="*",
                   help="section.key=value (every key: `lorasft config`), or resume=auto")  # fmt: skip
    t.set_defaults(fn=cmd_train)
    k = sub.add_parser("config", help="every config key: type, default, what it does")
    k.add_argument("section", nargs="?", help="one section (model, data, lora, train, ...)")
    k.add_argument("--markdown", action="store_true", help="as docs/configuration.md")
    k.set_defaults(fn=cmd_config)
    e = sub.add_parser("eval", help="evaluate a finished run")
    e.add_argument("run_dir")
    e.add_argument("--data", help="JSON/JSONL file to evaluate on instead of the run's eval split")
    e.add_argument("--num-samples", type=int, help="eval records to generate on")
    _dtype_arg(e)
    _long_args(e)
    e.set_defaults(fn=cmd_eval)
    d = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    c = d.add_parser("check", help="formats, bad records, lengths and what the loss sees")
    c.add_argument("target", help="a config YAML, a data file or a folder of them")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(fn=cmd_data_check)
    for name, fn, helptext in (("generate", cmd_generate, "one answer from a run"),
                               ("chat", cmd_chat, "interactive, streaming chat with a run")):  # fmt: skip
        g = sub.add_parser(name, help=helptext)
        g.add_argument("run_dir")
        if name == "generate":
            g.add_argument("--prompt", required=True)
            g.add_argument("--base", action="store_true", help="with the adapter disabled")
        g.add_argument("--system", help="system message (default: the run's data.system_prompt)")
        _dtype_arg(g)
        g.add_argument("--max-new-tokens", type=int)
        g.add_argument(
            "--temperature", type=float, help="0 = greedy (default: the run's eval settings)"
        )
        g.set_defaults(fn=fn)
    _serve_parser(sub)
    _add_export_parsers(sub)
    _add_report_parsers(sub)
    pl = sub.add_parser(
        "plan", help="window, context method and peak memory per length, before training"
    )
    pl.add_argument("config", nargs="?", help="YAML file")
    pl.add_argument("overrides", nargs="*", help="section.key=value")
    pl.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="sequence lengths to plan (default: half the window, then doublings to "
                         "the context target)")  # fmt: skip
    pl.add_argument("--memory-only", action="store_true",
                    help="no seconds per step (they come from this machine's measured rates: "
                         "for planning another machine, such as a GPU, only the memory applies)")  # fmt: skip
    pl.set_defaults(fn=cmd_plan)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    from lorasft.report.html import write_compare, write_report

    try:
        if len(args.run_dirs) == 1:
            out = write_report(args.run_dirs[0], args.out)
        else:
            out = write_compare(args.run_dirs, args.out or "compare.html")
    except FileNotFoundError as e:
        raise ModelError(str(e)) from e
    print(f"report: {Path(out).resolve()}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from lorasft.report.runs import render_runs, runs_table

    try:
        rows, keys = runs_table(args.dir)
    except FileNotFoundError as e:
        raise ModelError(str(e)) from e
    print(render_runs(rows, keys) if rows else f"no runs in {args.dir}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from lorasft.serve.app import serve
    from lorasft.serve.engine_choice import EngineOptions
    from lorasft.serve.ui import create_ui

    if not Path(args.dir).is_dir():
        raise ModelError(f"{args.dir}: no such folder (runs go to output.dir, default runs/)")
    key = _api_key(args)
    app = create_ui(args.dir, EngineOptions(engine=args.engine), key)
    where = f"http://{args.host}:{args.port}/" + (f"?key={key}" if key else "")
    say(f"dashboard for {Path(args.dir).resolve()} on {where}")
    serve(app, args.host, args.port)
    return 0


def _add_report_parsers(sub) -> None:
    r = sub.add_parser("report", help="report.html of a run, or compare.html of several")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", help="default: RUN_DIR/report.html, or compare.html for several runs")
    r.set_defaults(fn=cmd_report)
    n = sub.add_parser("runs", help="a table of the runs in a folder and where each stands")
    n.add_argument("dir", nargs="?", default="runs")
    n.set_defaults(fn=cmd_runs)
    u = sub.add_parser("ui", help="local dashboard: runs (live), reports, comparison, chat")
    u.add_argument("dir", nargs="?", default="runs")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--api-key", help="require this key (or env LORASFT_API_KEY)")
    u.add_argument("--engine", choices=ENGINES, default="auto", help="chat engine, as for serve")
    u.set_defaults(fn=cmd_ui)


def no_bars_off_terminal() -> None:
    """Loading and conversion bars (transformers') redraw with carriage returns: none in a log
    file. (Imports only transformers' logging, not the Trainer: every command passes here.)"""
    if not sys.stderr.isatty():
        from transformers.utils import logging

        logging.disable_progress_bar()


def quiet_library_notices() -> None:
    """Warnings one library raises about another's use of it, which no user can act on (PEFT
    reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model)."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_library_notices()
    no_bars_off_terminal()
    release_freed_memory()
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
