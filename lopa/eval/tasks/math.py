"""Math tasks scored in-process: GSM8K (4-shot), MATH (Minerva 4-shot) and the bundled model's ``tiny`` task.

Prompts follow lm-eval 0.4.8: GSM8K ``Question: q\\nAnswer:`` with ``#### N`` targets; MATH
``Problem:\\nq\\n\\nSolution:`` with the four fixed Minerva shots. One deviation: lm-eval draws GSM8K shots at
random from the train split; here they are the first four train problems, fixed, so runs are comparable and
need no train file. Extraction and equivalence live in :mod:`lopa.eval.extract`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lopa.eval.extract import extract_gsm8k, extract_math, gsm8k_correct, gsm8k_target, last_boxed, math_equiv
from lopa.eval.tasks.base import Doc, Score, Task, need_path, read_records, require_fields

GSM8K_SHOTS = [
    (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
        "clips did Natalia sell altogether in April and May?",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in "
        "April and May.\n#### 72",
    ),
    (
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did "
        "she earn?",
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
        "$<<0.2*50=10>>10.\n#### 10",
    ),
    (
        "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her "
        "parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How "
        "much more money does Betty need to buy the wallet?",
        "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 = "
        "$<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5",
    ),
    (
        "Julie is reading a 120-page book. Yesterday, she was able to read 12 pages and today, she read twice as "
        "many pages as yesterday. If she wants to read half of the remaining pages tomorrow, how many pages should "
        "she read?",
        "Maila read 12 x 2 = <<12*2=24>>24 pages today.\nSo she was able to read a total of 12 + 24 = "
        "<<12+24=36>>36 pages since yesterday.\nThere are 120 - 36 = <<120-36=84>>84 pages left to be read.\nSince "
        "she wants to read half of the remaining pages tomorrow, then she should read 84/2 = <<84/2=42>>42 pages."
        "\n#### 42",
    ),
]

MATH_SHOTS = [
    (
        "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
        "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives "
        "$x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is "
        "$[2,5)$. I hope it is correct.",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
        "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
        "times must Terrell lift them in order to lift the same total weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
        "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
        "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$: "
        "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: "
        "The final answer is $16$. I hope it is correct.",
    ),
    (
        "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
        "$(x, y)$ where $x$ and $y$ are both nonzero, find $\\frac{a}{b},$ assuming $b$ is nonzero.",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also "
        "know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
        "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
    ),
]


class GSM8K(Task):
    name = "gsm8k"
    stop = ("Question:", "</s>", "<|im_end|>")
    max_new_tokens = 256
    num_fewshot = 4
    data_help = (
        "the GSM8K test split as JSONL, one object per line with fields 'question' and 'answer' (the answer ends "
        "with '#### N'): grade_school_math/data/test.jsonl from github.com/openai/grade-school-math, or the "
        "Hugging Face dataset openai/gsm8k (config main, split test) saved with Dataset.to_json()"
    )

    def load_docs(self, path: Path | None) -> list[Doc]:
        path = need_path(path, self)
        rows = read_records(path, self)
        require_fields(rows, ("question", "answer"), path, self)
        return rows

    def shots(self) -> list[tuple[str, str]]:
        return [(f"Question: {q}\nAnswer:", " " + a) for q, a in GSM8K_SHOTS]

    def question(self, doc: Doc) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def target(self, doc: Doc) -> str:
        return gsm8k_target(doc["answer"])

    def score(self, doc: Doc, completion: str) -> Score:
        found = extract_gsm8k(completion)
        target = self.target(doc)
        strict = gsm8k_correct(found.strict, target)
        flexible = gsm8k_correct(found.flexible, target)
        extra: dict[str, Any] = {"strict_match": strict, "flexible_extract": flexible}
        return Score(gsm8k_correct(found.answer, target), found.answer, extra)


class MATH(Task):
    name = "math"
    stop = ("Problem:", "</s>", "<|im_end|>")
    max_new_tokens = 512
    num_fewshot = 4
    data_help = (
        "MATH test problems as JSONL with fields 'problem' and 'solution' (final answer in \\boxed{}), optionally "
        "'answer', 'level', 'type': e.g. test.jsonl of the Hugging Face dataset HuggingFaceH4/MATH-500, or the "
        "Hendrycks MATH test set (hendrycks/competition_math, split test) saved with Dataset.to_json()"
    )

    def load_docs(self, path: Path | None) -> list[Doc]:
        path = need_path(path, self)
        rows = read_records(path, self)
        require_fields(rows, ("problem",), path, self)
        if "answer" not in rows[0] and "solution" not in rows[0]:
            require_fields(rows, ("solution",), path, self)
        return rows

    def shots(self) -> list[tuple[str, str]]:
        return [(f"Problem:\n{q}\n\nSolution:", " " + a) for q, a in MATH_SHOTS]

    def question(self, doc: Doc) -> str:
        return f"Problem:\n{doc['problem']}\n\nSolution:"

    def target(self, doc: Doc) -> str:
        answer = doc.get("answer")
        return str(answer) if answer is not None else (last_boxed(doc["solution"]) or "")

    def doc_id(self, doc: Doc, index: int) -> str:
        return str(doc.get("unique_id", doc.get("id", index)))

    def score(self, doc: Doc, completion: str) -> Score:
        found = extract_math(completion)
        return Score(math_equiv(found, self.target(doc)), found)


class Tiny(Task):
    """The bundled model's synthetic word problems (lopa.tiny.task); no data file needed."""

    name = "tiny"
    stop = ()
    max_new_tokens = 32
    chat_default = False
    test_size = 200
    data_help = "nothing: the problems come from lopa.tiny.task.fixed_set('test', n)"

    def load_docs(self, path: Path | None) -> list[Doc]:
        from lopa.tiny import task as tiny_task

        return [
            {"id": i, "prompt": p.prompt, "answer": p.answer, "num_ops": p.num_ops}
            for i, p in enumerate(tiny_task.fixed_set("test", self.test_size))
        ]

    def question(self, doc: Doc) -> str:
        return doc["prompt"]

    def target(self, doc: Doc) -> str:
        return str(doc["answer"])

    def score(self, doc: Doc, completion: str) -> Score:
        from lopa.tiny.task import extract_answer

        found = extract_answer(completion)
        return Score(found == doc["answer"], None if found is None else str(found))

    def decode_defaults(self, generation_config: dict[str, Any]) -> dict[str, Any]:
        """The tiny checkpoint records the block size and answer length it was trained with; use them."""
        keys = ("block_size", "max_new_tokens")
        return {
            "max_new_tokens": self.max_new_tokens,
            **{k: generation_config[k] for k in keys if k in generation_config},
        }
