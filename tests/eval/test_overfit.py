from lorasft.eval.overfit import verdict


def logs(train, evals):
    h = [{"step": s, "loss": v} for s, v in train]
    return h + [{"step": s, "eval_loss": v} for s, v in evals]


TRAIN_FALLING = [(s, 2.0 - s / 100) for s in range(5, 101, 5)]


def test_rising_eval_while_train_falls_is_overfitting():
    v = verdict(logs(TRAIN_FALLING, [(20, 1.0), (40, 0.8), (60, 0.9), (80, 1.0), (100, 1.1)]), 3)
    assert v["overfitting"] is True
    assert v["region"] == [40, 100] and v["best_step"] == 40 and v["best_eval_loss"] == 0.8


def test_falling_eval_is_learning_not_overfitting():
    # The design document's check flags three falling eval losses; that is the opposite case.
    v = verdict(logs(TRAIN_FALLING, [(20, 1.0), (40, 0.9), (60, 0.8), (80, 0.7)]), 3)
    assert v["overfitting"] is False and v["best_step"] == 80


def test_rising_eval_with_rising_train_is_not_overfitting():
    train_rising = [(s, 1.0 + s / 100) for s in range(5, 101, 5)]
    v = verdict(logs(train_rising, [(20, 1.0), (40, 0.8), (60, 0.9), (80, 1.0), (100, 1.1)]), 3)
    assert v["overfitting"] is False


def test_too_few_rises_and_no_evals():
    v = verdict(logs(TRAIN_FALLING, [(20, 1.0), (40, 0.8), (60, 0.9), (80, 1.0)]), 3)
    assert v["overfitting"] is False and v["best_step"] == 40
    assert verdict(logs(TRAIN_FALLING, []), 3)["reason"] == "no evaluations logged"
