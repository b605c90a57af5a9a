"""100k seeded adversarial responses: the scorer never raises, never executes anything, and agrees with an
independent reference built on Python's `ast` parser (which parses but never runs the text)."""

import ast
import builtins
import re
from collections import Counter
from fractions import Fraction

import helpers_countdown

from openrlhf_gmpo.countdown.scorer import MAX_ANSWER_CHARS, MAX_DEPTH, score

N_RESPONSES = 100_000
ALLOWED = set("0123456789+-*/()×÷ \t\r\n")
# The last <answer> ... </answer> with no other <answer> inside: the same block the scorer reads, found another way.
LAST_BLOCK = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_AST_OPS = {
    ast.Add: Fraction.__add__,
    ast.Sub: Fraction.__sub__,
    ast.Mult: Fraction.__mul__,
    ast.Div: Fraction.__truediv__,
}


def _ast_value(node, literals):
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        left, right = _ast_value(node.left, literals), _ast_value(node.right, literals)
        return _AST_OPS[type(node.op)](left, right)
    raise ValueError("outside the grammar")  # unary operators, calls, tuples, floats, ...


def _max_paren_depth(text):
    depth = deepest = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    return deepest


def reference_score(response, numbers, target):
    blocks = LAST_BLOCK.findall(response)
    if not blocks:
        return 0.0
    answer = blocks[-1]
    if len(answer) > MAX_ANSWER_CHARS or not set(answer) <= ALLOWED or _max_paren_depth(answer) > MAX_DEPTH:
        return 0.1
    text = re.sub(r"\s", " ", answer.replace("×", "*").replace("÷", "/")).strip()
    if re.search(r"(?<![0-9])0[0-9]", text):
        return 0.1  # "00" is valid Python but not our grammar; Python already rejects "07"
    literals = []
    try:
        value = _ast_value(ast.parse(text, mode="eval").body, literals)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return 0.1
    if Counter(literals) != Counter(numbers):
        return 0.1
    return 1.0 if value == target else 0.1


def _forbidden(*args, **kwargs):
    raise AssertionError("the scorer tried to evaluate, compile or import something")


def test_fuzz_scorer_never_raises_never_executes_and_matches_reference(monkeypatch):
    cases = list(helpers_countdown.adversarial_responses(N_RESPONSES, seed=20250728))
    with monkeypatch.context() as patched:
        for name in ("eval", "exec", "compile", "__import__"):
            patched.setattr(builtins, name, _forbidden)
        scores = [score(response, numbers, target) for response, numbers, target in cases]

    assert len(cases) == N_RESPONSES
    counts = Counter(scores)
    assert set(counts) <= {0.0, 0.1, 1.0}
    # The mix exercises every branch heavily: on this seed 40,035 x 0.0, 38,856 x 0.1 and 21,109 x 1.0.
    assert min(counts[0.0], counts[0.1], counts[1.0]) > 1000, counts
    mismatches = [
        (response, numbers, target, got)
        for (response, numbers, target), got in zip(cases, scores, strict=True)
        if got != reference_score(response, numbers, target)
    ]
    assert not mismatches, mismatches[:5]
