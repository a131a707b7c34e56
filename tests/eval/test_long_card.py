"""The report card's arithmetic: the control ratio, the doublings, the passkey intervals and the
retention, on evaluation results written out by hand."""

import pytest

from lorasft.eval.long_card import card_lines, passkey_rate, report_card, wilson


def test_wilson_interval_values():
    # textbook values of Wilson's 95% score interval
    assert [round(x, 4) for x in wilson(5, 10)] == [0.2366, 0.7634]
    assert [round(x, 4) for x in wilson(0, 10)] == [0.0, 0.2775]
    assert [round(x, 4) for x in wilson(10, 10)] == [0.7225, 1.0]
    assert [round(x, 4) for x in wilson(40, 50)] == [0.6696, 0.8876]
    lo, hi = wilson(40, 50)
    assert hi - lo < wilson(8, 10)[1] - wilson(8, 10)[0]  # more trials, a narrower interval
    assert wilson(0, 0) == (0.0, 1.0)


def _grid(length: int, hits: int, n: int) -> dict:
    return {"records": [{"length": length, "correct": i < hits} for i in range(n)]}


def _res(ppl: dict[str, dict[int, float]], tuned_pk=(16, 30, 50), base_pk=(8, 40, 50)) -> dict:
    return {
        "lengths": [2, 4, 8, 16], "original_window": 8, "target_length": 16,
        "perplexity": {m: {str(n): {"perplexity": v} for n, v in row.items()} for m, row in ppl.items()},
        "passkey": _grid(*tuned_pk), "passkey_base_window": _grid(*base_pk),
    }  # fmt: skip


# ppl by length 2, 4, 8, 16
BASE = {2: 20.0, 4: 16.0, 8: 14.0, 16: 90.0}
SCALED = {2: 21.0, 4: 16.5, 8: 14.2, 16: 15.0}


def test_domain_adaptation_alone_is_told_apart_from_using_the_context():
    # tuned 10% better everywhere: the same gain at 2 as at 16 is the domain, not the context
    same = {n: 0.9 * v for n, v in SCALED.items()}
    card = report_card(_res({"base": BASE, "base_scaled": SCALED, "tuned": same}))
    c = card["control"]
    assert c["untrained"] == "base_scaled" and (c["short"], c["long"]) == (2, 16)
    assert c["ratio_short"] == c["ratio_long"] == 0.9
    assert c["extension_gain"] == 1.0 and c["used_context"] is False
    # tuned 10% better at 2 but 20% better at 16: the extension added 0.8 / 0.9
    used = {**same, 16: 0.8 * SCALED[16]}
    c = report_card(_res({"base": BASE, "base_scaled": SCALED, "tuned": used}))["control"]
    assert c["ratio_long"] == 0.8 and c["extension_gain"] == pytest.approx(0.8889, abs=1e-4)
    assert c["used_context"] is True


def test_doubling_passkey_and_retention():
    tuned = {2: 19.0, 4: 15.0, 8: 13.0, 16: 12.74}
    card = report_card(_res({"base": BASE, "base_scaled": SCALED, "tuned": tuned}))
    d = card["doubling"]
    assert d["tuned"] == 0.98 and d["tuned_lengths"] == [8, 16] and d["met"] is True
    assert d["base"] == 0.875 and d["base_lengths"] == [4, 8]  # 14 / 16, inside its window
    p = card["passkey"]
    assert p["tuned"]["rate"] == 0.6 and p["tuned"]["trials"] == 50 and p["tuned"]["enough"]
    assert p["base_in_window"]["rate"] == 0.8 and p["base_in_window"]["interval"] == [
        0.6696,
        0.8876,
    ]
    assert p["met"] is False  # 60% is below the base's interval (67-89%)
    r = card["retention"]
    assert r["ratio"] == 0.95 and r["met"] is True  # 19 / 20 at the shortest length
    # a control that fails: tuned worse at 2 by more than 2%, its doubling flat
    worse = {**tuned, 2: 20.6, 16: 13.0}
    card = report_card(_res({"base": BASE, "base_scaled": SCALED, "tuned": worse}, (16, 36, 50)))
    assert card["retention"]["met"] is False and card["doubling"]["met"] is False
    assert card["passkey"]["met"] is True  # 72% inside 67-89%
    lines = card_lines(card)
    assert len(lines) == 4 and "NOT met" in lines[1] and "36/50 = 72%" in lines[2]


def test_what_was_not_measured_says_so():
    res = _res({"base": BASE, "tuned": {2: 19.0, 4: 15.0, 8: 13.0, 16: None}})
    res["passkey_base_window"] = None
    card = report_card(res)
    assert card["control"]["untrained"] == "base"  # nothing scaled: the base is the reference
    assert card["control"]["ratio_long"] is None and card["control"]["used_context"] is None
    assert card["doubling"]["met"] is None and card["passkey"]["met"] is None
    assert passkey_rate(_grid(16, 3, 10), 16)["enough"] is False
    assert "not measured" in card_lines(card)[2]
