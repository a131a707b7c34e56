"""Small instruction tasks built from real data on this machine, for choosing lorasft's defaults
by measurement (issue 13): Debian's iso-codes (ISO 3166 countries, ISO 639-3 languages, with the
zh_CN translations the package ships) and the IANA time-zone database of Python's zoneinfo.
Nothing here is text written for lorasft; each task has its own train/test split (by a hash of
the record's key, so it is the same wherever the same iso-codes and tzdata versions are
installed: Debian 12's iso-codes 4.15.0 and tzdata 2025b here) and its metric.

    python bench/defaults/recipe_tasks.py OUT_DIR      # writes OUT_DIR/<task>/{train,test}.jsonl, prints counts

Tasks (kind, language, metric):
  country_codes     extraction to JSON, EN                           json_fields
  language_names    inverted name -> natural order, EN               exact_match
  country_short_zh  official name -> short name, ZH                  exact_match
  country_chat      two turns: 2-letter code (EN), then the 3-letter
                    one asked in Chinese                              exact_match (last turn)
  utc_offset        time zone + date -> UTC offset, EN               exact_match
  country_short_en  official name -> short name, EN                  exact_match
  language_code     language name -> ISO 639-1 code, EN              exact_match
  language_name_zh  language name (EN) -> its Chinese name, ZH       exact_match
  country_official_zh  short name -> official name, ZH               exact_match
  names_tw_to_cn    a name's zh_TW form -> its zh_CN form, ZH        exact_match

The sweep chooses on the first four (`SWEPT`); the other six are held out to check the choice
(country_short_en and language_code were added after it, 2026-12-03, to test whether the
trade-off between the Chinese rewriting and the chat task follows the kind of task: a rewriting
whose answer is in the prompt, or codes the base has to know); language_name_zh, added after
those ran, to test whether it follows the answer's language instead; country_official_zh,
added when that one proved too hard for the model, for the same question; names_tw_to_cn, added
when that one's answers proved to be one template).
"""

from __future__ import annotations

import argparse
import gettext
import hashlib
import json
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import TZPATH, ZoneInfo, available_timezones

ISO = Path("/usr/share/iso-codes/json")
LOCALE = "/usr/share/locale"
TEST_SHARE = 0.2


def _is_test(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < TEST_SHARE


def _iso(name: str, key: str) -> tuple[list[dict], gettext.NullTranslations]:
    path = ISO / f"iso_{name}.json"
    if not path.is_file():
        sys.exit(f"{path}: missing; install Debian's iso-codes (apt-get install iso-codes)")
    zh = gettext.translation(f"iso_{name}", localedir=LOCALE, languages=["zh_CN"], fallback=True)
    return json.loads(path.read_text(encoding="utf-8"))[key], zh


def country_codes() -> list[tuple[str, dict]]:
    rows, _ = _iso("3166-1", "3166-1")
    return [(c["name"], {"instruction": "Give the ISO 3166-1 codes of this country as a JSON "
                         "object with the keys alpha_2, alpha_3 and numeric.", "input": c["name"],
                         "output": json.dumps({"alpha_2": c["alpha_2"], "alpha_3": c["alpha_3"],
                                               "numeric": c["numeric"]})})
            for c in rows]  # fmt: skip


def _field_to_field(
    standard: str, instruction: str, source: str, target: str
) -> list[tuple[str, dict]]:
    """One record per entry of an ISO standard that has both fields and where they differ, keyed
    by the entry's alpha_3 code: `source` in, `target` out."""
    rows, _ = _iso(standard, standard)
    return [(c["alpha_3"], {"instruction": instruction, "input": c[source], "output": c[target]})
            for c in rows if source in c and target in c and c[source] != c[target]]  # fmt: skip


def language_names() -> list[tuple[str, dict]]:
    """ISO 639-3's catalogue form ("Arabic, Algerian Saharan") rewritten as the name
    ("Algerian Saharan Arabic"): a format transfer of real names."""
    return _field_to_field("639-3", "Rewrite this catalogue-style language name in its natural "
                           "word order.", "inverted_name", "name")  # fmt: skip


def _country_names_zh() -> list[tuple[str, str, str]]:
    """(alpha_3, official name, short name) in Chinese, from the zh_CN translations iso-codes
    ships, for the countries where both are translated and differ."""
    rows, zh = _iso("3166-1", "3166-1")
    out = []
    for c in rows:
        full, short = zh.gettext(c.get("official_name", c["name"])), zh.gettext(c["name"])
        if full not in (short, c.get("official_name")) and short != c["name"]:
            out.append((c["alpha_3"], full, short))
    return out


def country_short_zh() -> list[tuple[str, dict]]:
    """A country's full official name in Chinese rewritten as its short name (阿富汗伊斯兰共和国
    -> 阿富汗)."""
    return [(key, {"instruction": "把这个国家的正式全称改写为简称，只回答简称。", "input": full,
                   "output": short}) for key, full, short in _country_names_zh()]  # fmt: skip


def country_official_zh() -> list[tuple[str, dict]]:
    """The other way (阿富汗 -> 阿富汗伊斯兰共和国): an answer in Chinese that starts, in most
    records, with the prompt (X共和国 in 95 of 158), the rest the country's form of government,
    which the model has to know. Same split as country_short_zh (by alpha_3)."""
    return [(key, {"instruction": "写出这个国家的正式全称，只回答全称。", "input": short,
                   "output": full}) for key, full, short in _country_names_zh()]  # fmt: skip


def names_tw_to_cn() -> list[tuple[str, dict]]:
    """A name as iso-codes' zh_TW translation writes it rewritten as its zh_CN one (奧地利 ->
    奥地利, 安道爾侯國 -> 安道尔公国): countries (short and official names), currencies, scripts
    and languages, where both translations exist and differ. A Chinese answer mostly in the
    prompt (traditional characters made simplified), partly words the two regions name
    otherwise (蒲隆地 -> 布隆迪)."""
    out = []
    for standard, field in (("3166-1", "name"), ("3166-1", "official_name"), ("4217", "name"),
                            ("15924", "name"), ("639-3", "name")):  # fmt: skip
        rows, cn = _iso(standard, standard)
        tw = gettext.translation(f"iso_{standard}", LOCALE, languages=["zh_TW"], fallback=True)
        for c in rows:
            name = c.get(field)
            if (
                name
                and (t := tw.gettext(name)) != name
                and (s := cn.gettext(name)) not in (name, t)
            ):
                key = f"{standard}:{c.get('alpha_3', c.get('alpha_4'))}:{field}"
                out.append((key, {"instruction": "把这个名称从台湾的繁体中文写法改写为大陆的简体中文写法，"
                                  "只回答改写后的名称。", "input": t, "output": s}))  # fmt: skip
    return out


def _zone_key(name: str) -> str:
    """Zones that are links to one another (US/Mountain, America/Denver) share their TZif data,
    and so a split key: a link cannot sit on the other side of its target."""
    for root in TZPATH:
        if (path := Path(root) / name).is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
    return name


def utc_offset() -> list[tuple[str, dict]]:
    """Area/City zones on two dates (winter and summer offsets differ in many)."""
    out = []
    for name in sorted(z for z in available_timezones() if "/" in z and not z.startswith("Etc/")):
        for day in ("2024-01-15", "2024-07-15"):
            offset = (
                datetime.fromisoformat(f"{day}T12:00").replace(tzinfo=ZoneInfo(name)).strftime("%z")
            )
            out.append((_zone_key(name), {  # by zone data: a test zone is unseen on both dates
                "instruction": "What is the UTC offset of this time zone at noon on this date? "
                               "Answer like +01:00.",
                "input": f"{name}, {day}", "output": f"{offset[:3]}:{offset[3:]}"}))  # fmt: skip
    return out


def country_chat() -> list[tuple[str, dict]]:
    """Two turns: a country's two-letter code, then (asked in Chinese) its three-letter one,
    which needs the first turn's country."""
    codes, _ = _iso("3166-1", "3166-1")
    return [(c["name"], {"messages": [
        {"role": "user", "content": f"What is the two-letter ISO code of {c['name']}?"},
        {"role": "assistant", "content": c["alpha_2"]},
        {"role": "user", "content": "它的三字母代码呢？只回答代码。"},
        {"role": "assistant", "content": c["alpha_3"]}]}) for c in codes]  # fmt: skip


def country_short_en() -> list[tuple[str, dict]]:
    """country_short_zh's twin in English: the official name rewritten as ISO's short name
    (Islamic Republic of Afghanistan -> Afghanistan; Hellenic Republic -> Greece)."""
    return _field_to_field("3166-1", "Rewrite this country's official name as its short name. "
                           "Answer with the short name only.", "official_name", "name")  # fmt: skip


def language_code() -> list[tuple[str, dict]]:
    """A language's name -> its two-letter ISO 639-1 code (French -> fr): knowledge the base
    partly has, as the chat task's codes."""
    return _field_to_field("639-3", "Give the two-letter ISO 639-1 code of this language. Answer "
                           "with the code only.", "name", "alpha_2")  # fmt: skip


def language_name_zh() -> list[tuple[str, dict]]:
    """A language's English name -> its Chinese name from the zh_CN translations (Afar -> 阿法尔语):
    an answer in Chinese that is not in the prompt, to tell the Chinese rewriting task's language
    from its kind."""
    rows, zh = _iso("639-3", "639-3")
    return [(c["alpha_3"], {"instruction": "这种语言的中文名称是什么？只回答名称。", "input": c["name"],
                            "output": name_zh})
            for c in rows if (name_zh := zh.gettext(c["name"])) != c["name"]]  # fmt: skip


TASKS = {"country_codes": (country_codes, "json_fields"),
         "language_names": (language_names, "exact_match"),
         "country_short_zh": (country_short_zh, "exact_match"),
         "country_chat": (country_chat, "exact_match"),
         "utc_offset": (utc_offset, "exact_match"),
         "country_short_en": (country_short_en, "exact_match"),
         "language_code": (language_code, "exact_match"),
         "language_name_zh": (language_name_zh, "exact_match"),
         "country_official_zh": (country_official_zh, "exact_match"),
         "names_tw_to_cn": (names_tw_to_cn, "exact_match")}  # fmt: skip
SWEPT = ["country_codes", "language_names", "country_short_zh", "country_chat"]
"""The tasks the defaults are chosen on; the others are kept out, to check the choice on tasks
that did not make it."""


MAX_TRAIN, MAX_TEST = 200, 60  # small tasks: a sweep trains each many times on 2 cores


def _hash(key: str) -> str:
    return hashlib.sha256(f"order|{key}".encode()).hexdigest()


def build(task: str) -> tuple[list[dict], list[dict]]:
    rows = sorted(TASKS[task][0](), key=lambda kr: _hash(kr[0] + json.dumps(kr[1])))
    train = [r for k, r in rows if not _is_test(k)][:MAX_TRAIN]
    test = [r for k, r in rows if _is_test(k)][:MAX_TEST]
    return train, test


def write(out: Path) -> None:
    for task, (_, metric) in TASKS.items():
        train, test = build(task)
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", train), ("test", test)):
            (folder / f"{name}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
            )
        print(f"{task:<19} train {len(train):>4}  test {len(test):>3}  metric {metric}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("bench-out/tasks"))
    write(ap.parse_args().out)
