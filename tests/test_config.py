import json
from pathlib import Path

import pytest

from lorasft.config import ConfigError, for_answers, load_config


def test_defaults_run_the_demo():
    cfg = load_config()
    assert cfg.model.path == "default" and cfg.data.train_file is None
    assert cfg.model.trust_remote_code is False and cfg.data.train_on_prompt is False


def test_overrides_are_typed_yaml_values():
    cfg = load_config(
        None,
        [
            "train.learning_rate=1e-4",
            "lora.target_modules=[q_proj,k_proj]",
            "eval.num_samples=0",
            "train.save_total_limit=null",
            "resume=auto",
        ],
    )
    assert cfg.train.learning_rate == 1e-4 and cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.eval.num_samples == 0 and cfg.train.save_total_limit is None
    assert cfg.train.resume == "auto"


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rte: 0.001\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'train.learning_rte'; did you mean 'learning_rate'\?"
    ):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rank'"):
        load_config(None, ["lora.rank=8"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        load_config(None, ["trian.epochs=1"])


def test_bad_type_and_range_name_key_value_and_rule():
    with pytest.raises(ConfigError, match=r"lora.r=0: Input should be greater than or equal to 1"):
        load_config(None, ["lora.r=0"])
    with pytest.raises(
        ConfigError, match=r"train.batch_size='eight': Input should be a valid integer"
    ):
        load_config(None, ["train.batch_size=eight"])
    with pytest.raises(ConfigError, match=r"data.truncation='cut'.*'drop' or 'truncate_prompt'"):
        load_config(None, ["data.truncation=cut"])


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config(None, ["train.epochs"])


def test_relative_paths_are_relative_to_the_yaml(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train_file: d.jsonl\n")
    assert load_config(p).data.train_file == str(tmp_path / "d.jsonl")


def test_yaml_no_is_a_string_not_false(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "train:\n  eval_strategy: no\n  early_stopping_patience: null\n  gradient_checkpointing: true\n"
    )
    cfg = load_config(p, ["train.load_best_model_at_end=false"])
    assert cfg.train.eval_strategy == "no" and cfg.train.gradient_checkpointing is True
    assert cfg.train.load_best_model_at_end is False
    assert (
        load_config(
            None, ["train.eval_strategy=no", "train.early_stopping_patience=null"]
        ).train.eval_strategy
        == "no"
    )


@pytest.mark.parametrize("name", ["my_data.yaml", "fsdp.yaml", "deepspeed.yaml"])
def test_example_configs_load(name):
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "examples"
    cfg = load_config(examples / name)
    if name == "deepspeed.yaml":
        assert Path(cfg.train.deepspeed).is_file()
    if name == "fsdp.yaml":
        assert cfg.train.fsdp == "full_shard auto_wrap"
    if name == "my_data.yaml":  # the example follows today's measured defaults
        assert cfg.lora == load_config(None).lora and cfg.train == load_config(None).train


def test_save_steps_must_fall_on_evaluations_to_load_the_best():
    with pytest.raises(
        ConfigError, match=r"train.save_steps=50 must be a multiple of train.eval_steps=20"
    ):
        load_config(None, ["train.save_steps=50"])
    with pytest.raises(ConfigError, match="must be a multiple"):
        load_config(None, ["train.save_steps=40", "train.eval_strategy=epoch"])
    assert load_config(None, ["train.save_steps=40"]).train.save_steps == 40
    assert (
        load_config(
            None, ["train.save_steps=50", "train.load_best_model_at_end=false"]
        ).train.save_steps
        == 50
    )


def test_last_stage_is_what_eval_reads(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "stages:\n  - {name: a, data: {max_length: 64}}\n  - {name: b, data: {max_length: 128}, train: {max_steps: 3}}\n"
    )
    cfg = load_config(p)
    last = cfg.last_stage()
    assert last.data.max_length == 128 and last.train.max_steps == 3 and last.stages == []
    plain = load_config(None)
    assert plain.last_stage() is plain


def test_memory_budget_is_positive_or_auto():
    assert load_config(None, ["train.memory_budget_gib=auto"]).train.memory_budget_gib == "auto"
    assert load_config(None, ["train.memory_budget_gib=1.5"]).train.memory_budget_gib == 1.5
    with pytest.raises(ConfigError, match="train.memory_budget_gib.*greater than 0"):
        load_config(None, ["train.memory_budget_gib=0"])


def test_stages_with_sharding_are_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stages:\n  - {name: a}\n  - {name: b, train: {deepspeed: ds.json}}\n")
    with pytest.raises(ConfigError, match="train.deepspeed with `stages` is not supported.*DDP"):
        load_config(f)
    f.write_text("train: {fsdp: full_shard}\nstages:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match="train.fsdp with `stages` is not supported"):
        load_config(f)


def _bench_module(name: str):
    import importlib
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "bench" / "defaults")
    sys.path.insert(0, bench)  # bench scripts import their neighbours
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)


def test_defaults_are_the_recipe_the_sweep_chose():
    """lorasft's LoRA and training defaults are the recipe bench/defaults/recipe_sweep.py chose, the one the
    study's sweep table marks (bench/defaults/README.md): its settings, applied over the defaults, change nothing; on
    answers mostly in Chinese characters the defaults become the recipe chosen for those."""
    sweep = _bench_module("recipe_sweep")
    assert sweep.CHOSEN in sweep.RECIPES and sweep.CHOSEN_HAN in sweep.RECIPES
    assert load_config(None, sweep.RECIPES[sweep.CHOSEN]) == load_config(None)
    others = [r for name, r in sweep.RECIPES.items() if name != sweep.CHOSEN]
    assert all(load_config(None, r) != load_config(None) for r in others)
    han, done = for_answers(load_config(None), 0.9)
    assert han == load_config(None, sweep.RECIPES[sweep.CHOSEN_HAN])
    assert done == {"han_share": 0.9, "applied": {
        "lora.target_modules": "all-linear", "lora.r": 16, "lora.alpha": 32.0,
        "data.augment.neftune_noise_alpha": 5.0}}  # fmt: skip
    study = Path(__file__).resolve().parents[1] / "bench" / "defaults" / "README.md"
    table = study.read_text(encoding="utf-8")
    assert f"| `{sweep.CHOSEN}` (chosen) |" in table
    assert f"| `{sweep.CHOSEN_HAN}` (chosen for Chinese answers) |" in table


def test_answer_language_rule_fills_only_what_the_user_left_unset():
    """`lora.by_answer_language`: answers mostly (over half) in Chinese characters change the
    settings not given in the YAML or overrides; an explicit value, even the default's, stays."""
    cfg = load_config(None, ["lora.r=8", "data.augment.neftune_noise_alpha=null"])
    han, done = for_answers(cfg, 0.51)
    assert (han.lora.r, han.lora.alpha, han.lora.target_modules) == (8, 32.0, "all-linear")
    assert han.data.augment.neftune_noise_alpha is None
    assert done["applied"] == {"lora.target_modules": "all-linear", "lora.alpha": 32.0}
    assert cfg.lora.target_modules == "attention"  # the config given is not changed
    for share in (0.5, 0.0, None):  # not over half, or no answers (raw text): nothing changes
        assert for_answers(cfg, share) == (cfg, {"han_share": share, "applied": {}})
    off = load_config(None, ["lora.by_answer_language=false"])
    assert for_answers(off, 1.0) == (off, {"han_share": 1.0, "applied": {}})


def test_han_share_counts_answer_characters_only():
    """Only the assistant turns count, whitespace does not; CJK punctuation and Latin letters are
    not Han; no assistant turn (raw text) gives None."""
    from lorasft.data.formats import Example
    from lorasft.data.prepare import answer_han_share

    def chat(user, *answers):
        turns = [m for a in answers for m in ({"role": "user", "content": user},
                                              {"role": "assistant", "content": a})]  # fmt: skip
        return Example("f:1", turns)

    assert answer_han_share([chat("把这个翻译成英文", "Hello, world")]) == 0.0
    # 6 Han of 10 characters: 阿富汗 and 中国 (5), 𠀀 (Extension B, 1); "，" and "ABC" are not
    assert answer_han_share([chat("x", "阿富汗 ，", "中国 ABC𠀀")]) == pytest.approx(0.6)
    assert answer_han_share([Example("f:1", text="纯文本训练")]) is None


def test_sweep_names_the_recipe_the_defaults_run_on_a_tasks_answers():
    sweep = _bench_module("recipe_sweep")
    zh = [
        {
            "instruction": "把这个国家的正式全称改写为简称",
            "input": "阿富汗伊斯兰共和国",
            "output": "阿富汗",
        }
    ]
    en = [{"instruction": "把这个国家的代码写出来", "input": "阿富汗", "output": "AFG"}]
    assert sweep.defaults_recipe(zh) == sweep.CHOSEN_HAN
    assert sweep.defaults_recipe(en) == sweep.CHOSEN


def test_sweep_seed_default_is_lorasfts_and_cells_are_seed_means(capsys):
    """A sweep run named without a seed used lorasft's default train.seed; with several seeds a
    cell is their mean, and shares and the worst share are taken of the means."""
    sweep = _bench_module("recipe_sweep")
    assert load_config(None, [f"train.seed={sweep.DEFAULT_SEED}"]) == load_config(None)

    def row(recipe, task, tuned, seed):
        return {"task": task, "recipe": recipe, "seed": seed, "metric": "exact_match", "n": 10,
                "tuned": tuned, "base": 0.0, "train_s": 60.0}  # fmt: skip

    sweep.report([row("a", "t1", 10.0, 1), row("a", "t1", 30.0, 2), row("a", "t2", 50.0, 1),
                  row("b", "t1", 25.0, 1), row("b", "t2", 40.0, 1)])  # fmt: skip
    lines = {ln.split(" | ")[0]: ln for ln in capsys.readouterr().out.splitlines() if "`" in ln}
    # t1: a's mean 20 against b's 25 (the best); t2: a's 50 is the best, b has 80% of it
    assert lines["| `a`"].startswith("| `a` | 20.0 (80%; 10.0/30.0) | 50.0 (100%) | 80% | 90% |")
    assert lines["| `b`"].startswith("| `b` | 25.0 (100%) | 40.0 (80%) | 80% | 90% |")
    assert lines["| `a`"].endswith("| 2 |")  # minutes: 60 s per seed's mean, on two tasks


def test_saved_sweep_rows_are_reported_by_task_recipe_and_seed(tmp_path, capsys):
    """`recipe_sweep.py --rows`: the table of saved rows, only those of the tasks, recipes and
    seeds named; a row kept without its training time (transcribed) leaves that column open."""
    sweep = _bench_module("recipe_sweep")

    def row(recipe, task, tuned, seed, train_s=60.0):
        return {"task": task, "recipe": recipe, "seed": seed, "metric": "exact_match", "n": 10,
                "tuned": tuned, "base": None, "precision": "bf16", "train_s": train_s}  # fmt: skip

    (tmp_path / "a.json").write_text(json.dumps([row("a", "t1", 10.0, 1), row("a", "t1", 90.0, 2),
                                                 row("b", "t1", 20.0, 1, None)]))  # fmt: skip
    (tmp_path / "b.json").write_text(json.dumps([row("a", "t2", 50.0, 1)]))
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    rows = sweep.saved_rows(files, None, None, [1])
    assert sorted((r["recipe"], r["task"]) for r in rows) == [("a", "t1"), ("a", "t2"), ("b", "t1")]
    assert sweep.saved_rows(files, ["t2"], None, None) == [row("a", "t2", 50.0, 1)]
    assert sweep.saved_rows(files, None, ["b"], None) == [row("b", "t1", 20.0, 1, None)]
    sweep.report(sweep.saved_rows(files, ["t1"], None, [1]))
    out = capsys.readouterr().out
    assert "precision of the runs: bf16" in out
    assert "| base model | - | | | |" in out
    assert "| `a` | 10.0 (50%) | 50% | 50% | 1 |" in out  # seed 2's 90.0 left out
    assert "| `b` | 20.0 (100%) | 100% | 100% | - |" in out


def test_sweep_spread_counts_the_seeds_a_share_would_need(capsys):
    """Where the chosen recipe trails a task's best: the seeds' spread and the seeds each recipe
    would need for its share to have a standard error of 2.5 points."""
    sweep = _bench_module("recipe_sweep")

    def row(recipe, tuned, seed):
        return {"task": "t", "recipe": recipe, "seed": seed, "metric": "exact_match", "n": 10,
                "tuned": tuned, "base": 0.0, "train_s": 1.0}  # fmt: skip

    sweep.report([row(sweep.CHOSEN, 8.0, 1), row(sweep.CHOSEN, 12.0, 2),
                  row("b", 18.0, 1), row("b", 22.0, 2)])  # fmt: skip
    # share 10/20; sd 2.83 each: (8 + 0.5^2 * 8) / (20 * 0.025)^2 = 40 seeds
    out = capsys.readouterr().out
    assert f"| t | `{sweep.CHOSEN}` | `b` | 50.0% | 2.8 (2) | 2.8 (2) | 40 |" in out
    # the defaults' row: on each task the recipe they run there (here CHOSEN, 50% of the best)
    assert f"| **lorasft's defaults** (by answer language) | `{sweep.CHOSEN}`: 10.0 (50%; " in out
    sweep.report([row(sweep.CHOSEN, 30.0, 1), row(sweep.CHOSEN, 32.0, 2), row("b", 20.0, 1)])
    assert "seeds each" not in capsys.readouterr().out  # the chosen is the best: nothing to say
    sweep.report([row("b", 31.0, 1), row("b", 31.0, 2), row(sweep.CHOSEN, 30.0, 1),
                  row(sweep.CHOSEN, 32.0, 2)])  # fmt: skip
    assert "seeds each" not in capsys.readouterr().out  # tied with the best: nothing either


def test_sweep_rows_of_a_second_invocation_are_added_not_written_over(tmp_path):
    """Two sweeps into the same --out: the file keeps the first one's rows, and a run done again
    (same task, recipe and seed) replaces its earlier row."""
    sweep = _bench_module("recipe_sweep")
    path = tmp_path / "sweep.json"

    def row(task, seed, tuned):
        return {"task": task, "recipe": "r", "seed": seed, "tuned": tuned}

    sweep.save_rows(path, [row("a", 1, 10.0), row("a", 2, 20.0)])
    sweep.save_rows(path, [row("b", 1, 30.0), row("a", 2, 25.0)])
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert sorted((r["task"], r["seed"], r["tuned"]) for r in rows) == [
        ("a", 1, 10.0), ("a", 2, 25.0), ("b", 1, 30.0)]  # fmt: skip


def test_checkpoint_curve_reads_every_evaluation_and_picks_as_trainer(tmp_path):
    """bench/defaults/checkpoint_curve.py: the validation loss and metric of every evaluation come from
    the last checkpoint's trainer state (not an earlier checkpoint's, which holds fewer); each rule
    picks the first of equals, as Trainer (which moves its best only on a strict improvement)."""
    curve = _bench_module("checkpoint_curve")

    def state(evals):
        logs = [{"step": s, "loss": 1.0} for s, _, _ in evals]  # training logs: no eval_loss
        logs += [{"step": s, "eval_loss": v, "eval_exact_match": m} for s, v, m in evals]
        return json.dumps({"log_history": logs})

    evals = [(10, 2.0, 5.0), (20, 1.5, 15.0), (30, 1.4, 10.0), (40, 1.4, 15.0)]
    for step in (20, 40, 9):  # checkpoint-9 sorts after checkpoint-40 as text, not as a step
        ck = tmp_path / "checkpoints" / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        ck.joinpath("trainer_state.json").write_text(
            state([e for e in evals if e[0] <= step]), encoding="utf-8"
        )
    rows = curve.curve(tmp_path, "exact_match")
    assert [(r["step"], r["val_loss"], r["val"]) for r in rows] == evals
    by_loss, by_metric = curve.picks(rows)
    assert by_loss["step"] == 30 and by_metric["step"] == 20  # ties: 30 before 40, 20 before 40
