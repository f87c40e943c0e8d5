"""The server's usage arithmetic pinned by hand: usage_dict, sum_usage over several prompts, and OutputCutter's
max_tokens cut, which decides ``completion_tokens`` and ``finish_reason``."""

from lopa.engine.output import Completion, Stats
from lopa.server.output_cut import OutputCutter
from lopa.server.protocol import sum_usage, usage_dict


class Pieces:
    """A tokenizer whose ids decode to fixed strings of different lengths (id i -> PIECES[i])."""

    PIECES = ["a", "bb", "ccc", "d", "ee", "f"]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.PIECES[i] for i in ids)


def completion(text: str, ids: list[int], reason: str = "stop") -> Completion:
    return Completion(text, ids, reason, Stats(forwards=1, tokens=len(ids)))  # type: ignore[arg-type]


def test_usage_dict_fields() -> None:
    u = usage_dict(12, 7, 3, 7 / 3)
    assert u == {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "total_tokens": 19,
        "forwards": 3,
        "tokens_per_forward": 2.3333,  # rounded to 4 places
    }


def test_sum_usage_sums_prompts_and_weights_tpf_by_forwards() -> None:
    # prompt A: 10 prompt tokens, 8 completion tokens in 4 forwards (tpf 2); prompt B: 5, 3 in 1 (tpf 3)
    total = sum_usage([usage_dict(10, 8, 4, 2.0), usage_dict(5, 3, 1, 3.0)])
    # tpf = (2 * 4 + 3 * 1) / (4 + 1) = 11 / 5, not the plain mean 2.5
    assert total == {
        "prompt_tokens": 15,
        "completion_tokens": 11,
        "total_tokens": 26,
        "forwards": 5,
        "tokens_per_forward": 2.2,
    }


def test_sum_usage_of_one_and_of_no_forwards() -> None:
    one = usage_dict(4, 6, 2, 3.0)
    assert sum_usage([one]) == one
    assert sum_usage([usage_dict(4, 0, 0, 0.0), usage_dict(2, 0, 0, 0.0)]) == usage_dict(6, 0, 0, 0.0)
    assert sum_usage([]) == usage_dict(0, 0, 0, 0.0)


def test_no_max_tokens_passes_everything_and_counts_every_id() -> None:
    cut = OutputCutter(Pieces(), None)
    assert cut.feed("a", [0]) == "a"
    assert cut.feed("bb", [1]) == "bb"
    assert cut.emitted == "abb"
    assert cut.finish(completion("abb", [0, 1])) == ("abb", "stop", 2)  # the end token is not among the ids


def test_max_tokens_cuts_the_stream_at_the_decoded_length_of_the_first_ids() -> None:
    cut = OutputCutter(Pieces(), 2)
    assert cut.feed("abbccc", [0, 1, 2]) == "abb"  # limit = len(decode([0, 1])) = 3 characters
    assert cut.feed("d", [3]) == ""  # nothing past the limit, ever
    assert cut.emitted == "abb"
    assert cut.finish(completion("abbcccd", [0, 1, 2, 3])) == ("abb", "length", 2)


def test_the_limit_is_found_once_enough_ids_arrive() -> None:
    cut = OutputCutter(Pieces(), 2)
    assert cut.feed("a", [0]) == "a"  # one id: no limit yet
    assert cut.feed("bb", [1]) == "bb"  # two ids = max_tokens: still no cut
    assert cut.feed("cccd", [2, 3]) == ""  # now the limit is 3 characters, all already sent
    assert cut.emitted == "abb"


def test_ids_that_fit_max_tokens_exactly_are_not_cut() -> None:
    # the engine's text may be longer than decode(ids) (e.g. a stop string cut the ids, not the text); with
    # len(ids) == max_tokens nothing is cut and the reason stays the engine's
    cut = OutputCutter(Pieces(), 2)
    assert cut.feed("abb!", [0, 1]) == "abb!"
    assert cut.finish(completion("abb!", [0, 1])) == ("abb!", "stop", 2)


def test_text_already_within_the_limit_keeps_its_reason() -> None:
    # 3 ids > max_tokens 2, but a stop string left only 3 characters = the limit: reason stays "stop"
    cut = OutputCutter(Pieces(), 2)
    assert cut.finish(completion("abb", [0, 1, 2])) == ("abb", "stop", 2)
    # one character more than the limit: cut, and the reason becomes "length"
    assert OutputCutter(Pieces(), 2).finish(completion("abbc", [0, 1, 2])) == ("abb", "length", 2)


def test_completion_tokens_is_the_smaller_of_ids_and_max_tokens() -> None:
    assert OutputCutter(Pieces(), 5).finish(completion("abb", [0, 1]))[2] == 2
    assert OutputCutter(Pieces(), 1).finish(completion("abb", [0, 1]))[2] == 1
    assert OutputCutter(Pieces(), 0).finish(completion("abb", [0, 1])) == ("", "length", 0)
