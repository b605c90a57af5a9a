"""CountDown scorer (TinyZero convention), safe on any model text.

    1.0  the last <answer>...</answer> is an expression that uses each given number exactly once and equals the target
    0.1  there is an answer block but it is wrong, malformed, uses the numbers wrongly or divides by zero
    0.0  there is no complete <answer>...</answer> block

Model text is never evaluated as code. The answer is read by a hand-written tokenizer and recursive-descent parser for
a small grammar, and evaluated with exact rationals:

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := NUMBER | '(' expr ')'
    NUMBER := ASCII digits only ('0'-'9'; other Unicode digits such as '٣' are malformed), no leading zero

'×' and '÷' are accepted as '*' and '/'; spaces, tabs and newlines are ignored. There is no unary minus (no given
number is negative, so it is never needed). Work is bounded: an answer longer than MAX_ANSWER_CHARS or nested deeper
than MAX_DEPTH is malformed, and the literals are checked against the given numbers before any arithmetic, so at most a
handful of small integers are ever multiplied.
"""

import json
from collections import Counter
from fractions import Fraction

SCORE_CORRECT = 1.0
SCORE_WRONG = 0.1
SCORE_NO_ANSWER = 0.0

MAX_ANSWER_CHARS = 200
MAX_DEPTH = 16  # parentheses; the deepest sensible 4-number answer needs 3
MAX_LITERAL_DIGITS = 12  # a literal must be one of the given numbers anyway

OPEN_TAG = "<answer>"
CLOSE_TAG = "</answer>"

_DIGITS = frozenset("0123456789")
_SPACE = frozenset(" \t\r\n")
_OPERATORS = {"+": "+", "-": "-", "*": "*", "/": "/", "×": "*", "÷": "/", "(": "(", ")": ")"}


class MalformedAnswer(ValueError):
    """The answer text is outside the grammar or its bounds."""


def extract_answer(response: str) -> str | None:
    """The text of the LAST complete <answer>...</answer> block, or None.

    That is the last <answer> followed somewhere by </answer>, up to the first </answer> after it. The last block wins
    because a model may restate or correct itself; an unterminated trailing <answer> and stray closing tags are ignored.
    """
    last_close = response.rfind(CLOSE_TAG)
    if last_close < 0:
        return None
    start = response.rfind(OPEN_TAG, 0, last_close)
    if start < 0:
        return None
    start += len(OPEN_TAG)
    return response[start : response.find(CLOSE_TAG, start)]


def tokenize(text: str) -> list[str | int]:
    """Operators as one-character strings ('×' -> '*', '÷' -> '/'), literals as ints."""
    if len(text) > MAX_ANSWER_CHARS:
        raise MalformedAnswer(f"answer longer than {MAX_ANSWER_CHARS} characters")
    tokens: list[str | int] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in _SPACE:
            i += 1
        elif ch in _DIGITS:
            j = i + 1
            while j < len(text) and text[j] in _DIGITS:
                j += 1
            if j - i > MAX_LITERAL_DIGITS:
                raise MalformedAnswer(f"literal longer than {MAX_LITERAL_DIGITS} digits")
            if text[i] == "0" and j - i > 1:
                raise MalformedAnswer("literal with a leading zero")  # as Python and TinyZero's eval reject "07"
            tokens.append(int(text[i:j]))
            i = j
        elif ch in _OPERATORS:
            tokens.append(_OPERATORS[ch])
            i += 1
        else:
            raise MalformedAnswer(f"unexpected character {ch!r}")
    return tokens


class _Parser:
    """Recursive descent over the token list; builds (op, left, right) trees with int leaves."""

    def __init__(self, tokens: list[str | int]):
        self.tokens = tokens
        self.pos = 0

    def parse(self):
        if not self.tokens:
            raise MalformedAnswer("empty answer")
        tree = self._expr(0)
        if self.pos != len(self.tokens):
            raise MalformedAnswer(f"unexpected token {self.tokens[self.pos]!r}")
        return tree

    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _expr(self, depth: int):
        tree = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            tree = (op, tree, self._term(depth))
        return tree

    def _term(self, depth: int):
        tree = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            tree = (op, tree, self._factor(depth))
        return tree

    def _factor(self, depth: int):
        token = self._peek()
        if isinstance(token, int):
            self.pos += 1
            return token
        if token == "(":
            if depth >= MAX_DEPTH:
                raise MalformedAnswer(f"parentheses nested deeper than {MAX_DEPTH}")
            self.pos += 1
            tree = self._expr(depth + 1)
            if self._peek() != ")":
                raise MalformedAnswer("unclosed parenthesis")
            self.pos += 1
            return tree
        raise MalformedAnswer(f"expected a number or '(', got {token!r}")


def parse(text: str):
    """The expression tree of an answer text; raises MalformedAnswer."""
    return _Parser(tokenize(text)).parse()


def literals(tree) -> list[int]:
    if isinstance(tree, int):
        return [tree]
    return literals(tree[1]) + literals(tree[2])


def evaluate(tree) -> Fraction:
    """Exact value of a tree; raises ZeroDivisionError on division by zero."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    a, b = evaluate(left), evaluate(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def score(response: str, numbers, target: int) -> float:
    """1.0 / 0.1 / 0.0 for one model response to the task (numbers, target); never raises on any response string."""
    answer = extract_answer(response)
    if answer is None:
        return SCORE_NO_ANSWER
    try:
        tree = parse(answer)
    except MalformedAnswer:
        return SCORE_WRONG
    # Check the multiset of literals first: it bounds the arithmetic below to the given (small) numbers.
    if Counter(literals(tree)) != Counter(numbers):
        return SCORE_WRONG
    try:
        value = evaluate(tree)
    except ZeroDivisionError:
        return SCORE_WRONG
    return SCORE_CORRECT if value == target else SCORE_WRONG


def encode_label(numbers, target: int) -> str:
    """The dataset label of a task, as OpenRLHF passes it to the reward function: '{"numbers": [..], "target": N}'."""
    return json.dumps({"numbers": list(numbers), "target": target})


def decode_label(label) -> tuple[list[int], int]:
    """(numbers, target) from a label string (or an already decoded dict); ValueError names a bad label."""
    try:
        data = json.loads(label) if isinstance(label, str) else label
        numbers, target = data["numbers"], data["target"]
        numbers_ok = isinstance(numbers, list) and all(type(n) is int and n >= 0 for n in numbers)
    except (TypeError, KeyError, json.JSONDecodeError) as error:
        raise ValueError(f'CountDown label must be JSON {{"numbers": [...], "target": N}}, got {label!r}') from error
    if not numbers_ok or type(target) is not int:
        raise ValueError(f"CountDown label must hold non-negative integer numbers and an integer target, got {label!r}")
    return numbers, target
