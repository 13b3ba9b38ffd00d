"""The bot's refusal rule: `refuses` at and around its threshold, the session applying it (the
default threshold when none is given), and the figures `moderate.py --eval` prints for it."""

from __future__ import annotations

import pytest

from openchatkit.errors import UserError
from openchatkit.evaluation.moderation_metrics import format_policy, policy_figures
from openchatkit.moderation import INTERVENTION, INTERVENTION_THRESHOLD, LABELS, refuses


def probs(top: str, p_top: float, p_intervention: float) -> dict[str, float]:
    """Five probabilities summing to 1: `top` gets p_top, `needs intervention` p_intervention."""
    out = {label: 0.0 for label in LABELS}
    out[INTERVENTION] = p_intervention
    out[top] = p_top if top != INTERVENTION else p_intervention
    rest = [lab for lab in LABELS if lab not in (top, INTERVENTION)]
    out[rest[0]] = 1 - sum(out.values())  # the remainder on one other label
    assert abs(sum(out.values()) - 1) < 1e-9
    return out


def test_threshold_is_a_probability_that_catches_more_than_the_top_label():
    # Below 1/2 so a second-ranked `needs intervention` can be refused; the rule then covers
    # every message whose top label it is only when the threshold is at most 1/5.
    assert 0 < INTERVENTION_THRESHOLD < 0.5


def test_refuses_when_intervention_reaches_the_threshold_whatever_the_top_label():
    t = INTERVENTION_THRESHOLD
    assert refuses(probs("casual", 1 - t, t))  # at the threshold, casual on top
    assert not refuses(probs("casual", 1 - t + 0.01, t - 0.01))  # just under it
    assert refuses(probs(INTERVENTION, 0, 0.9))
    # An explicit threshold replaces the default, both ways.
    assert not refuses(probs(INTERVENTION, 0, 0.6), threshold=0.7)
    assert refuses(probs("casual", 0.9, 0.1), threshold=0.1)


class FixedModerator:
    """Stands in for a Moderator: the same probabilities for every text."""

    def __init__(self, probabilities: dict[str, float]):
        self.probabilities = probabilities

    def classify(self, text: str):
        return max(self.probabilities, key=self.probabilities.get), self.probabilities


@pytest.mark.parametrize(
    ("p_intervention", "threshold", "refused"),
    [
        (INTERVENTION_THRESHOLD, None, True),  # second-ranked, at the default: refused
        (INTERVENTION_THRESHOLD - 0.02, None, False),
        (0.3, 0.5, False),
        (0.3, 0.3, True),
    ],
)
def test_session_applies_the_rule(char_tokenizer, p_intervention, threshold, refused):
    from openchatkit.inference.session import ChatSession
    from openchatkit.models.loading import LoadedModel

    loaded = LoadedModel(None, char_tokenizer, "no-chat-model", "cpu", "float32", 1024)
    session = ChatSession(loaded, moderator=FixedModerator(probs("casual", 0.5, p_intervention)))
    session.moderation_threshold = threshold
    label, refuse = session.moderate("user", "any text")
    assert label == "casual" and refuse is refused


def test_policy_figures_count_recall_and_casual_refused():
    truth = ["casual", "casual", "casual", "casual", INTERVENTION, INTERVENTION, "needs caution"]
    p_int = [0.0, 0.3, 0.6, 0.1, 0.35, 0.1, 0.9]
    table = [probs("casual", 1 - p, p) for p in p_int]
    f = policy_figures(truth, table, threshold=0.3)
    assert (f["intervention_caught"], f["intervention_total"]) == (1, 2)
    assert (f["casual_refused_count"], f["casual_total"]) == (2, 4)
    assert f["intervention_recall"] == 0.5 and f["casual_refused"] == 0.5
    assert f["refused_total"] == 4
    line = format_policy(f)
    assert "recall 0.500 (1/2)" in line and "casual refused 50.0% (2/4)" in line
    assert policy_figures(truth, table)["threshold"] == INTERVENTION_THRESHOLD


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--threshold", "0.3", "some text"], "--threshold"),
        (["--sweep", "some text"], "--sweep"),
        (["--eval", "x.jsonl", "--threshold", "1.5"], "--threshold"),
    ],
)
def test_moderate_policy_flags_need_eval_and_a_probability(cli, argv, flag):
    import importlib.util

    spec = importlib.util.spec_from_file_location("moderate", cli.REPO / "inference/moderate.py")
    moderate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moderate)
    with pytest.raises(UserError, match=flag):
        moderate.parse_args(argv)
