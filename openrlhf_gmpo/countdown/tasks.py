"""CountDown tasks: reach a target from 3-4 numbers, each used exactly once, with + - * /.

`generate_tasks` draws the numbers first and then a target among the integers they can reach, so every task is
solvable by construction; `solve` is the exact solver that proves it (and writes the SFT traces).
"""

import functools
import itertools
import random
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class CountdownTask:
    numbers: tuple[int, ...]
    target: int


# A solution tree: a leaf is an int (one of the given numbers), a node is (operator, left, right).
Tree = int | tuple[str, "Tree", "Tree"]


def _combine(a, b):
    """Yield (operator, value) for every way to combine a and b in that order (exact; no division by zero).

    Values stay Python ints while they are integral (several times faster than Fraction; equal values hash alike).
    """
    yield "+", a + b
    yield "-", a - b
    yield "*", a * b
    if b != 0:
        if type(a) is int and type(b) is int and a % b == 0:
            yield "/", a // b
        else:
            yield "/", Fraction(a, b)


def reachable(numbers) -> dict[int | Fraction, Tree]:
    """Every value reachable using each number exactly once, mapped to the simplest tree that reaches it.

    Subset dynamic programming over bit masks: the values of a subset are all combinations of the values of its two
    complementary parts. "Simplest" keeps SFT traces easy to learn: all intermediate values integral first, then none
    negative, then the smallest largest intermediate: for 28 from 44, 19, 35 that is (44-35)+19, passing through 9,
    rather than (44+19)-35, passing through 63.
    """
    numbers = tuple(int(n) for n in numbers)
    full = (1 << len(numbers)) - 1
    return {value: tree for value, (_, tree) in _subset_tables(numbers, full)[full].items()}


# (has a fraction, has a negative, largest magnitude) of a tree's values: the smaller, the simpler the tree
Cost = tuple[bool, bool, int | Fraction]


def _cost(cost_a: Cost, cost_b: Cost, value: int | Fraction) -> Cost:
    return (
        cost_a[0] or cost_b[0] or value.denominator != 1,
        cost_a[1] or cost_b[1] or value < 0,
        max(cost_a[2], cost_b[2], abs(value)),
    )


def _subset_tables(numbers: tuple[int, ...], last_mask: int) -> list[dict[int | Fraction, tuple[Cost, Tree]]]:
    """tables[mask]: value -> (cost, simplest tree) for every subset mask <= last_mask (others stay empty).

    A mask's value is kept from the first tree of least cost, in the order: splits, left values, right values,
    operators; solve_tree relies on that order.
    """
    tables: list[dict[int | Fraction, tuple[Cost, Tree]]] = [{} for _ in range(1 << len(numbers))]
    for i, n in enumerate(numbers):
        tables[1 << i].setdefault(n, ((False, False, n), n))
    for mask in range(1, last_mask + 1):
        if mask & (mask - 1) == 0:
            continue  # single number, set above
        table = tables[mask]
        # Enumerate ordered splits (left, right) of mask; both orders matter for - and /.
        left = (mask - 1) & mask
        while left:
            for a, (cost_a, tree_a) in tables[left].items():
                for b, (cost_b, tree_b) in tables[mask ^ left].items():
                    for op, value in _combine(a, b):
                        cost = _cost(cost_a, cost_b, value)
                        known = table.get(value)
                        if known is None or cost < known[0]:
                            table[value] = (cost, (op, tree_a, tree_b))
            left = (left - 1) & mask
    return tables


def reachable_values(numbers) -> set[int | Fraction]:
    """The keys of reachable(numbers), without building trees (the generator needs only these, ~3x faster)."""
    count = len(numbers)
    values: list[set[int | Fraction]] = [set() for _ in range(1 << count)]
    for i, n in enumerate(numbers):
        values[1 << i].add(int(n))
    for mask in range(1, 1 << count):
        if mask & (mask - 1) == 0:
            continue
        table = values[mask]
        left = (mask - 1) & mask
        while left:
            for a in values[left]:
                for b in values[mask ^ left]:
                    table.update(value for _, value in _combine(a, b))
            left = (left - 1) & mask
    return values[(1 << count) - 1]


def render(tree: Tree, top: bool = True) -> str:
    """Write a tree as a compact expression: every inner operation in parentheses, none around the whole."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    text = f"{render(left, False)}{op}{render(right, False)}"
    return text if top else f"({text})"


def evaluate_tree(tree: Tree) -> int | Fraction:
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    return dict(_combine(evaluate_tree(left), evaluate_tree(right)))[op]


def solve_tree(numbers, target: int) -> Tree | None:
    """The tree reachable(numbers)[target] holds, or None if target is not reachable.

    ~2.4x faster than reachable() for 4 numbers: the values of the proper subsets as there, but of the whole set only
    the combinations that give target, met in reachable()'s order, so the same tree wins.
    """
    _check_numbers(numbers)
    numbers = tuple(int(n) for n in numbers)
    if isinstance(target, float):  # exact, as reachable()'s dict compares it: 0.5 finds 1/2, 0.1 finds nothing
        target = Fraction(target)
    full = (1 << len(numbers)) - 1
    if full == 1:
        return numbers[0] if numbers[0] == target else None
    tables = _subset_tables(numbers, full - 1)
    best: tuple[Cost, Tree] | None = None
    left = (full - 1) & full
    while left:
        right = tables[full ^ left]
        order = {value: index for index, value in enumerate(right)}
        for a, (cost_a, tree_a) in tables[left].items():
            for _, _, op, b in _operands_reaching(a, target, order):
                cost = _cost(cost_a, right[b][0], target)
                if best is None or cost < best[0]:
                    best = (cost, (op, tree_a, right[b][1]))
        left = (left - 1) & full
    return None if best is None else best[1]


def _quotient(x, y) -> int | Fraction:
    """x / y exactly, as an int where it is one (Fraction arithmetic is the slow part of solving)."""
    if type(x) is int and type(y) is int and x % y == 0:
        return x // y
    return Fraction(x) / y


def _operands_reaching(a, target: int, order: dict) -> list[tuple[int, int, str, int | Fraction]]:
    """(position, operator rank, operator, b) for each b of a table (`order`: value -> position) with
    `a op b == target`, sorted as reachable() meets them: by b's position, then +, -, *, /."""
    if a == 0 or target == 0:  # 0*b or 0/b (or a/b == 0) hold for many b: check every one
        return [
            (index, rank, op, b)
            for b, index in order.items()
            for rank, (op, value) in enumerate(_combine(a, b))
            if value == target
        ]
    # the one b per operator; `in order` finds an int key from an equal Fraction (equal values hash alike)
    wanted = (
        (0, "+", target - a),
        (1, "-", a - target),
        (2, "*", _quotient(target, a)),
        (3, "/", _quotient(a, target)),
    )
    return sorted((order[b], rank, op, b) for rank, op, b in wanted if b in order)


def solve(numbers, target: int) -> str | None:
    """An expression that reaches target using each number exactly once (e.g. "(44-35)+19"), or None."""
    tree = solve_tree(numbers, target)
    return None if tree is None else render(tree)


def _check_numbers(numbers) -> None:
    if not 1 <= len(numbers) <= 6:
        raise ValueError(f"numbers must hold 1 to 6 values for the exact solver, got {len(numbers)}: {numbers!r}")
    for n in numbers:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"numbers must be non-negative ints, got {n!r} in {numbers!r}")


def check_settings(
    min_numbers: int, max_numbers: int, min_value: int, max_value: int, min_target: int, max_target: int
) -> None:
    """Raise ValueError naming the first impossible generator setting."""
    if min_numbers < 3:
        raise ValueError(f"min_numbers must be >= 3 (CountDown uses 3-4 numbers), got {min_numbers}")
    if max_numbers > 5:
        raise ValueError(f"max_numbers must be <= 5 (the exact solver grows fast), got {max_numbers}")
    if min_numbers > max_numbers:
        raise ValueError(f"min_numbers ({min_numbers}) must be <= max_numbers ({max_numbers})")
    if min_value < 1:
        raise ValueError(f"min_value must be >= 1, got {min_value}")
    if min_value > max_value:
        raise ValueError(f"min_value ({min_value}) must be <= max_value ({max_value})")
    if min_target > max_target:
        raise ValueError(f"min_target ({min_target}) must be <= max_target ({max_target})")
    if max_target < 0:
        raise ValueError(f"max_target must be >= 0, got {max_target}")


# task_space_bound counts every number tuple's targets where tuples * 20^(count - 3) stays under this:
# reachable_values takes ~0.1 ms for 3 numbers and ~20x more per extra number, so about 1.5 s at most.
EXACT_COUNT_BUDGET = 15_000


@functools.lru_cache(maxsize=32)  # presets are loaded and split many times in one process
def task_space_bound(
    min_numbers: int, max_numbers: int, min_value: int, max_value: int, min_target: int, max_target: int
) -> int:
    """How many distinct tasks the settings allow: exact where counting is cheap, else an upper bound.

    Per count of numbers: with few enough ordered tuples (EXACT_COUNT_BUDGET), each tuple's reachable targets
    counted; otherwise tuples times the targets they could reach (an expression over numbers x_i >= 1 is at most
    prod(x_i + 1)).
    """
    values = max_value - min_value + 1
    total = 0
    for count in range(min_numbers, max_numbers + 1):
        if values**count * 20 ** (count - 3) <= EXACT_COUNT_BUDGET:
            tuples = itertools.product(range(min_value, max_value + 1), repeat=count)
            total += sum(len(_targets(numbers, min_target, max_target)) for numbers in tuples)
        else:
            highest = min(max_target, (max_value + 1) ** count)
            total += values**count * max(0, highest - min_target + 1)
    return total


def _targets(numbers, min_target: int, max_target: int) -> list[int]:
    """The integer targets in range that numbers reach, ascending."""
    return sorted(int(v) for v in reachable_values(numbers) if v.denominator == 1 and min_target <= v <= max_target)


def generate_tasks(
    n: int,
    seed: int,
    *,
    min_numbers: int = 3,
    max_numbers: int = 4,
    min_value: int = 1,
    max_value: int = 99,
    min_target: int = 1,
    max_target: int = 100,
    progress: bool = False,
) -> list[CountdownTask]:
    """n distinct solvable tasks, the same for the same arguments.

    Defaults follow TinyZero's CountDown-Tasks-3to4 data: 3-4 numbers in 1..99, a target in 1..100. The target is
    drawn uniformly among the integers in range that the numbers reach, so no task needs a search at training time.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    check_settings(min_numbers, max_numbers, min_value, max_value, min_target, max_target)
    bound = task_space_bound(min_numbers, max_numbers, min_value, max_value, min_target, max_target)
    if n > bound:  # fail now instead of after 100 * n fruitless draws (minutes to hours)
        raise ValueError(
            f"{n} distinct tasks asked for, but {min_numbers}-{max_numbers} numbers in {min_value}..{max_value} with "
            f"targets {min_target}..{max_target} allow at most {bound}; raise max_value, max_numbers or max_target"
        )
    rng = random.Random(seed)
    tasks: list[CountdownTask] = []
    seen: set[CountdownTask] = set()
    # Give up rather than loop forever when the ranges admit too few distinct tasks (e.g. n above the task space).
    max_draws = 100 * n + 1000
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="CountDown tasks", unit="task")
    for _ in range(max_draws):
        if len(tasks) == n:
            break
        count = rng.randint(min_numbers, max_numbers)
        numbers = tuple(rng.randint(min_value, max_value) for _ in range(count))
        targets = _targets(numbers, min_target, max_target)
        if not targets:
            continue
        task = CountdownTask(numbers, rng.choice(targets))
        if task in seen:
            continue
        seen.add(task)
        tasks.append(task)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if len(tasks) < n:
        raise ValueError(
            f"could draw only {len(tasks)} distinct solvable tasks of the {n} asked for; raise max_value, max_numbers "
            "or max_target"
        )
    return tasks
