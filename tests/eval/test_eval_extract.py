"""GSM8K and MATH answer extraction and MATH equivalence on hand-written cases, tricky formats included."""

import pytest

from lopa.eval.extract import (
    extract_gsm8k,
    extract_math,
    gsm8k_correct,
    gsm8k_target,
    last_boxed,
    math_equiv,
    normalize_number,
)

# (generated text, expected extracted answer)
GSM8K_CASES = [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = 72.\n#### 72", "72"),
    ("She pays 3 * $4 = $12.\n#### $12", "12"),
    ("#### 1,234", "1234"),
    ("The total is 1,000,000 dollars.\n#### 1,000,000", "1000000"),
    ("####18", "18"),
    ("#### -3\n\nQuestion: John has 7 apples", "-3"),
    ("Cost is 2.50 + 1.00 = 3.50\n#### 3.50", "3.5"),
    ("#### 5.00", "5"),
    ("So the answer is 42.", "42"),
    ("The answer is: 17", "17"),
    ("The answer is $1,234.50.", "1234.5"),
    ("First 3 + 4 = 7, then 7 * 2 = 14. Total 14 apples", "14"),
    ("It drops −7 degrees", "-7"),
    ("The total is \\boxed{42}.", "42"),
    ("**#### 64**", "64"),
    ("She has 25% left, i.e. 25", "25"),
    ("#### 10\nThe next step uses 99 marbles", "10"),  # the first #### wins over a later number
    ("The answer is 8 \n\nQuestion: What is 9?", "8"),  # text after the stop string is ignored
    ("He walks .5 miles, so .5", "0.5"),
    ("Result: 0", "0"),
    ("1, 2, 3 and finally 4", "4"),  # comma-separated list, not a thousands separator
    ("no digits at all", None),
]


@pytest.mark.parametrize(("text", "expected"), GSM8K_CASES)
def test_gsm8k_extraction(text: str, expected: str | None) -> None:
    assert extract_gsm8k(text).answer == expected


def test_gsm8k_strict_and_flexible_differ() -> None:
    found = extract_gsm8k("#### 10\nbut later I computed 12")
    assert (found.strict, found.flexible, found.answer) == ("10", "12", "10")
    found = extract_gsm8k("I computed 12")
    assert (found.strict, found.flexible) == (None, "12")


def test_gsm8k_target_and_correctness() -> None:
    assert gsm8k_target("Some reasoning 5 * 4 = 20\n#### 1,200") == "1200"
    assert gsm8k_correct("1200.0", "1200")
    assert gsm8k_correct("$1,200", "1200")
    assert not gsm8k_correct("1201", "1200")
    assert not gsm8k_correct(None, "1200")
    assert normalize_number("abc") is None
    assert normalize_number("-0") == "0"


# (generated solution, expected raw extracted answer)
MATH_EXTRACT_CASES = [
    ("so $x = \\boxed{5}$.", "5"),
    ("We get \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("First \\boxed{1} then corrected: \\boxed{2}", "2"),
    ("Nested \\boxed{\\{1, \\{2\\}\\}} here", "\\{1, \\{2\\}\\}"),
    ("\\boxed 7 is it", "7"),
    ("\\fbox{12}", "12"),
    ("... $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.", "$[2,5)$"),
    ("Final Answer: The final answer is 24. I hope it is correct.\n\nProblem:\nNext problem \\boxed{3}", "24"),
    ("cut off inside the box \\boxed{\\frac{1}{", None),
    ("no answer here", None),
]


@pytest.mark.parametrize(("text", "expected"), MATH_EXTRACT_CASES)
def test_math_extraction(text: str, expected: str | None) -> None:
    assert extract_math(text) == expected


# (prediction, target, equivalent?)
MATH_EQUIV_CASES = [
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac12", "\\frac{1}{2}", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("[2,5)", "[2, 5)", True),
    ("\\boxed{24}", "24", True),
    ("10\\%", "10", True),
    ("x = 5", "5", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("(1,2)", "(1, 2)", True),
    ("\\text{(A)}", "(A)", True),
    ("1,000", "1000", True),
    ("3 \\text{ inches}", "3", True),
    ("90^\\circ", "90", True),
    ("\\$5", "5", True),
    ("-\\frac{2}{3}", "\\frac{-2}{3}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\pi/2", "\\frac{\\pi}{2}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("5.0", "5", True),
    ("\\$1,000", "1000", True),
    ("(1,2)", "[1,2]", False),  # open and closed intervals differ
    ("[2,5]", "[2,5)", False),
    ("3", "4", False),
    ("\\frac{1}{3}", "0.33", False),
    ("x+1", "x-1", False),
    ("(1,2,3)", "(1,2)", False),
    ("__import__('os').system('true')", "0", False),  # never evaluated
    (None, "1", False),
]


@pytest.mark.parametrize(("prediction", "target", "equal"), MATH_EQUIV_CASES)
def test_math_equivalence(prediction: str | None, target: str, equal: bool) -> None:
    assert math_equiv(prediction, target) is equal


def test_last_boxed_handles_unbalanced_and_missing() -> None:
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed{open") is None
    assert last_boxed("nothing") is None
