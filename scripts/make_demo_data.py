"""Generate the demo dataset shipped with the package (src/lorasft/assets/).

Task: extract a person's name and city from a short English or Chinese
sentence and answer with one line of JSON: {"name": "...", "city": "..."}.
Deterministic (random.Random(1234)); standard library only.
Regenerate with:  python scripts/make_demo_data.py
The eval split holds out some names and cities entirely, and every eval
record uses at least one of them, so no eval sentence appears in train.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "lorasft" / "assets"
N_TRAIN, N_EVAL = 240, 32  # half English, half Chinese

EN_INSTR = [
    "Extract the person's name and city from the sentence. Answer with JSON only.",
    "Find the name of the person and the city mentioned below. Reply with JSON only.",
    "Return the person's name and the city from this sentence as JSON.",
    "Which person and which city does the sentence mention? Answer in JSON only.",
]
ZH_INSTR = [
    "从句子中提取人名和城市，只用JSON回答。",
    "找出下面句子中的人名和城市，以JSON格式回答。",
    "请提取句中的人名和城市，仅输出JSON。",
    "句子里提到了哪个人和哪个城市？只用JSON回答。",
]
EN_TEMPLATES = [
    "{n} lives in {c}.",
    "Born in {c}, {n} now teaches maths there.",
    "My colleague {n} moved to {c} last spring.",
    "Last week {n} flew home to {c}.",
    "{n} runs a small bakery in {c}.",
    "After years abroad, {n} finally settled in {c}.",
    "{n} grew up in {c} and still visits every summer.",
    "The new librarian in {c} is called {n}.",
    "Our neighbour {n} commutes to {c} by train.",
    "{n} is studying architecture in {c} this year.",
    "In {c}, {n} works as a nurse at the city hospital.",
    "Have you met {n}? They just bought a flat in {c}.",
    "{n} spent the whole winter painting murals in {c}.",
    "According to the letter, {n} now lives in {c}.",
]
ZH_TEMPLATES = [
    "{n}住在{c}。",
    "{n}去年搬到了{c}。",
    "我的同事{n}在{c}开了一家咖啡店。",
    "{n}从小在{c}长大。",
    "听说{n}下个月要去{c}工作。",
    "{n}在{c}的一所中学当老师。",
    "周末{n}坐高铁回了{c}。",
    "{n}大学毕业后留在了{c}。",
    "{c}的新邻居叫{n}。",
    "{n}现在在{c}做程序员。",
    "出生于{c}的{n}很喜欢做饭。",
    "{n}每年夏天都会去{c}看望父母。",
    "我的朋友{n}刚在{c}买了房子。",
    "{n}在{c}经营一家小书店。",
]
EN_NAMES = [
    "Alice",
    "Kenji",
    "Omar",
    "Maria",
    "Liam",
    "Priya",
    "Mateo",
    "Aisha",
    "Lars",
    "Sofia",
    "Chen",
    "Fatima",
    "Diego",
    "Yuki",
    "Ahmed",
    "Elena",
    "Kwame",
    "Ingrid",
    "Ravi",
    "Chloe",
    "Tomasz",
    "Amara",
    "Hiroshi",
    "Leila",
    "Jonas",
    "Nadia",
    "Pedro",
    "Mei",
    "Olga",
    "Samuel",
    "Zainab",
    "Lucas",
    "Anika",
    "Felipe",
    "Hana",
    "Ibrahim",
    "Greta",
    "Tariq",
    "Noor",
    "Emeka",
    "Siobhan",
    "Arjun",
    "Camille",
    "Dmitri",
]
EN_CITIES = [
    "Paris",
    "Tokyo",
    "Cairo",
    "Lisbon",
    "Nairobi",
    "Toronto",
    "Mumbai",
    "Berlin",
    "Sydney",
    "Lima",
    "Oslo",
    "Seoul",
    "Istanbul",
    "Madrid",
    "Buenos Aires",
    "Hanoi",
    "Dublin",
    "Accra",
    "Vienna",
    "Mexico City",
    "Jakarta",
    "Warsaw",
    "Cape Town",
    "Bangkok",
    "Stockholm",
    "Montreal",
    "Lagos",
    "Prague",
    "Santiago",
    "Manila",
    "Athens",
    "Helsinki",
    "Bogotá",
    "São Paulo",
    "Kyoto",
    "Marrakesh",
    "Reykjavik",
    "Tbilisi",
    "Quito",
    "Zagreb",
    "Osaka",
    "Karachi",
]
ZH_NAMES = [
    "李娜",
    "王强",
    "陈静",
    "张伟",
    "刘洋",
    "杨帆",
    "赵敏",
    "黄磊",
    "周杰",
    "吴婷",
    "徐明",
    "孙丽",
    "马超",
    "朱琳",
    "胡斌",
    "郭芳",
    "何勇",
    "高雪",
    "林峰",
    "罗佳",
    "郑浩",
    "梁欣",
    "宋涛",
    "谢雨",
    "韩梅",
    "唐宁",
    "冯军",
    "曹颖",
    "彭程",
    "曾晓东",
    "欧阳俊",
    "诸葛明",
    "司马悦",
    "许嘉怡",
    "邓子涵",
    "萧雅琪",
    "蒋文博",
    "沈若兰",
    "叶思远",
    "潘晓雯",
]
ZH_CITIES = [
    "上海",
    "北京",
    "广州",
    "深圳",
    "成都",
    "杭州",
    "武汉",
    "西安",
    "南京",
    "重庆",
    "天津",
    "苏州",
    "长沙",
    "青岛",
    "厦门",
    "昆明",
    "大连",
    "沈阳",
    "哈尔滨",
    "郑州",
    "济南",
    "合肥",
    "福州",
    "南宁",
    "贵阳",
    "兰州",
    "乌鲁木齐",
    "拉萨",
    "海口",
    "呼和浩特",
    "桂林",
    "洛阳",
]
N_HELD = 6  # last N_HELD names and cities of each pool appear only in eval


def make_record(rng, instrs, templates, name, city):
    return {
        "instruction": rng.choice(instrs),
        "input": rng.choice(templates).format(n=name, c=city),
        "output": json.dumps({"name": name, "city": city}, ensure_ascii=False),
    }


def sample(rng, n, instrs, templates, names, cities, held_names, held_cities):
    """n unique records; if held_* are given, each record uses at least one."""
    records, seen_inputs = [], set()
    while len(records) < n:
        if held_names:
            mode = rng.randrange(3)  # held name, held city, or both
            name = rng.choice(held_names if mode != 1 else names)
            city = rng.choice(held_cities if mode != 0 else cities)
        else:
            name, city = rng.choice(names), rng.choice(cities)
        rec = make_record(rng, instrs, templates, name, city)
        if rec["input"] not in seen_inputs:
            seen_inputs.add(rec["input"])
            records.append(rec)
    return records


def build(rng, n_train, n_eval, instrs, templates, names, cities):
    tr_names, ev_names = names[:-N_HELD], names[-N_HELD:]
    tr_cities, ev_cities = cities[:-N_HELD], cities[-N_HELD:]
    train = sample(rng, n_train, instrs, templates, tr_names, tr_cities, None, None)
    evals = sample(rng, n_eval, instrs, templates, tr_names, tr_cities, ev_names, ev_cities)
    return train, evals


def check(rec):
    out = json.loads(rec["output"])
    assert list(out) == ["name", "city"], rec
    assert out["name"] in rec["input"] and out["city"] in rec["input"], rec


def write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            check(rec)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(1234)
    en_tr, en_ev = build(
        rng, N_TRAIN // 2, N_EVAL // 2, EN_INSTR, EN_TEMPLATES, EN_NAMES, EN_CITIES
    )
    zh_tr, zh_ev = build(
        rng, N_TRAIN // 2, N_EVAL // 2, ZH_INSTR, ZH_TEMPLATES, ZH_NAMES, ZH_CITIES
    )
    train, evals = en_tr + zh_tr, en_ev + zh_ev
    rng.shuffle(train)
    rng.shuffle(evals)
    assert not {r["input"] for r in train} & {r["input"] for r in evals}
    OUT.mkdir(parents=True, exist_ok=True)
    write(OUT / "demo_train.jsonl", train)
    write(OUT / "demo_eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval records to {OUT}")


if __name__ == "__main__":
    main()
