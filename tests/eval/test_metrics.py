import pytest
from rouge_score import rouge_scorer

from lorasft.eval.metrics import MixedTokenizer, aggregate, chrf, exact_match, rouge_l


def test_chinese_is_scored_per_character():
    # pred 张伟住在北京 (6 chars) vs ref 张伟在北京 (5): LCS 5, P 5/6, R 1, F = 10/11.
    assert rouge_l("张伟住在北京", "张伟在北京") == pytest.approx(10 / 11)
    # The stock rouge-score tokenizer drops non-ASCII text and scores the same pair as zero.
    stock = rouge_scorer.RougeScorer(["rougeL"])
    assert stock.score("张伟在北京", "张伟住在北京")["rougeL"].fmeasure == 0.0


def test_mixed_tokenizer():
    assert MixedTokenizer().tokenize('{"name": "李娜"} Hello World') == [
        "{",
        '"',
        "name",
        '"',
        ":",
        '"',
        "李",
        "娜",
        '"',
        "}",
        "hello",
        "world",
    ]


def test_english_rouge_and_exact_match():
    # pred "the cat sat" vs ref "the cat sat down": LCS 3, P 1, R 3/4, F = 6/7.
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert exact_match(" yes\n", "yes") == 1.0 and exact_match("Yes", "yes") == 0.0


def test_chrf_and_aggregate():
    assert chrf("abc", "abc") == pytest.approx(1.0)
    assert chrf("北京", "上海") == 0.0
    agg = aggregate(["北京", "x"], ["北京", "y"])
    assert agg["exact_match"] == 50.0 and agg["rouge_l"] == 50.0 and agg["n"] == 2
