import pytest

from openrlhf_gmpo.countdown.scorer import MAX_ANSWER_CHARS, MAX_DEPTH, extract_answer, score

NUMBERS, TARGET = (44, 19, 35), 28  # 44 - 35 + 19 = 28


@pytest.mark.parametrize(
    "response, expected",
    [
        # 1.0: correct, in any order, with spaces and newlines, with a think block; then the accepted × and ÷
        ("<think>44-35=9,9+19=28</think><answer>(44-35)+19</answer>", 1.0),
        ("<answer> 19 + 44 - 35 </answer>", 1.0),
        ("<answer>(44-35)\n+19</answer><|end|>", 1.0),
        ("<answer>((44+19)×35)÷35-35</answer>", 0.1),  # × and ÷ parse, but 35 is used three times
        ("<answer>((((44))))-35+19</answer>", 1.0),  # redundant parentheses are fine
        # 0.1: well-formed but wrong value
        ("<answer>44+19-35+0</answer>", 0.1),  # 0 is not a given number (extra literal)
        ("<answer>44+19+35</answer>", 0.1),  # 98, not 28
        # 0.1: number reused / missing
        ("<answer>44-35+19+19-19</answer>", 0.1),  # 19 three times
        ("<answer>44-35+19*1</answer>", 0.1),  # extra literal 1
        ("<answer>63-35</answer>", 0.1),  # 28, but 44 and 19 are replaced by their sum
        ("<answer>44-16</answer>", 0.1),  # 28 with numbers that were not given
        # 0.1: garbage inside the tags
        ("<answer>__import__('os').system('echo pwned')</answer>", 0.1),
        ("<answer>44-35+19=28</answer>", 0.1),  # '=' is not in the grammar
        ("<answer>44 - 35 + ١٩</answer>", 0.1),  # Arabic-Indic digits are not ASCII digits
        ("<answer>44-35+(19</answer>", 0.1),  # unclosed parenthesis
        ("<answer>44--35+19</answer>", 0.1),  # no unary minus
        ("<answer>44**1-35+19</answer>", 0.1),  # no power operator
        ("<answer>044-35+19</answer>", 0.1),  # leading zero, as Python's eval would reject
        ("<answer>44.0-35+19</answer>", 0.1),  # integers only
        ("<answer></answer>", 0.1),  # empty answer is an answer, and wrong
        ("<answer>   </answer>", 0.1),
        # 0.0: no complete answer block
        ("44-35+19", 0.0),
        ("<answer>44-35+19", 0.0),  # unterminated
        ("44-35+19</answer>", 0.0),  # no opening tag
        ("</answer><answer>44-35+19", 0.0),  # tags in the wrong order
        ("", 0.0),
    ],
)
def test_score_branches(response, expected):
    assert score(response, NUMBERS, TARGET) == expected


def test_last_complete_answer_wins():
    # A wrong answer then a corrected one -> the last is scored (1.0); and the other way round (0.1).
    assert score("<answer>44+19+35</answer> no: <answer>44-35+19</answer>", NUMBERS, TARGET) == 1.0
    assert score("<answer>44-35+19</answer> no: <answer>44+19+35</answer>", NUMBERS, TARGET) == 0.1
    # A trailing unterminated block is ignored; the last complete block counts.
    assert score("<answer>44-35+19</answer><answer>1", NUMBERS, TARGET) == 1.0
    # With an opening tag inside a block, the text after the last opening tag is the answer.
    assert extract_answer("<answer>junk<answer>44-35+19</answer>") == "44-35+19"
    # Stray closing tags after the last block do not extend it.
    assert extract_answer("<answer>44-35+19</answer></answer>x</answer>") == "44-35+19"


def test_multiplication_and_division_signs_are_accepted():
    # (44 - 35) × (19 ÷ 19) = 9 × 1 = 9
    assert score("<answer>(44-35)×(19÷19)</answer>", (44, 35, 19, 19), 9) == 1.0
    assert score("<answer>(44-35)*(19/19)</answer>", (44, 35, 19, 19), 9) == 1.0


def test_length_and_depth_bounds():
    padded = "44-35+19" + " " * (MAX_ANSWER_CHARS - len("44-35+19"))  # exactly at the limit: still scored
    assert score(f"<answer>{padded}</answer>", NUMBERS, TARGET) == 1.0
    assert score(f"<answer>{padded} </answer>", NUMBERS, TARGET) == 0.1  # one character over
    deepest = "(" * MAX_DEPTH + "44" + ")" * MAX_DEPTH + "-35+19"
    assert score(f"<answer>{deepest}</answer>", NUMBERS, TARGET) == 1.0
    too_deep = "(" * (MAX_DEPTH + 1) + "44" + ")" * (MAX_DEPTH + 1) + "-35+19"
    assert score(f"<answer>{too_deep}</answer>", NUMBERS, TARGET) == 0.1


def test_fractional_intermediate_is_exact():
    # 3, 3, 8, 8 -> 24 = 8/(3-8/3) = 8/(1/3): floats give 23.999999999999996; exact rationals give 24.
    assert score("<answer>8/(3-8/3)</answer>", (3, 8, 3, 8), 24) == 1.0
    assert score("<answer>8/(3-8/3)</answer>", (3, 8, 3, 8), 23) == 0.1
    assert score("<answer>8/(3-8/3)</answer>", (3, 8, 8), 24) == 0.1  # 3 given once, used twice


def test_huge_literal_is_bounded():
    assert score("<answer>" + "9" * 150 + "</answer>", NUMBERS, TARGET) == 0.1
    assert score("<answer>" + "9" * 5000 + "</answer>", NUMBERS, TARGET) == 0.1


def test_division_by_zero_is_a_wrong_answer():
    # 44 / (35 - 35) + 19 uses each of 44, 35, 35, 19 once, so the division itself is evaluated (with the default
    # numbers 35 would be used twice and the literal check would answer first): well-formed, so 0.1, not 0.
    assert score("<answer>44/(35-35)+19</answer>", (44, 35, 35, 19), 28) == 0.1


def test_the_value_must_equal_the_target_exactly():
    # 7 / 2 = 3.5: not 3, though it truncates to 3
    assert score("<answer>7/2</answer>", (7, 2), 3) == 0.1
    assert score("<answer>7/2</answer>", (7, 2), 4) == 0.1
