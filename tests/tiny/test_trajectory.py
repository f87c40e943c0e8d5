"""The visited states of ``lopa.tiny.trajectory``: every trajectory replayed state by state against a plain
re-statement of the threshold and D2F rules with a full-row forward, and the states turned into training rows
with the layout of the random rows."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lopa.tiny
from lopa.checkpoint.loader import load_checkpoint
from lopa.model.transformer import Transformer
from lopa.tiny import task
from lopa.tiny.data import Layout, block_causal_mask, encode_rows, open_fresh_blocks
from lopa.tiny.posterior import Phrasings
from lopa.tiny.train import model_config
from lopa.tiny.trajectory import Visited, visit, visited_batch
from lopa.tiny.vocab import build_tokenizer, special_ids
from tests.support.wordings import all_answers

THRESHOLD = 0.82


def _setup(block_size: int = 16, num_blocks: int = 4) -> tuple[Transformer, Layout, tuple]:
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = Layout(32, block_size, num_blocks, ids["eos_token_id"], ids["mask_token_id"])
    args = SimpleNamespace(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    torch.manual_seed(0)
    model = Transformer(model_config(args, tok.get_vocab_size(), ids))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # random logits with confidences spread around 0.8
    problems = task.fixed_set("validation", 6)
    return model, layout, encode_rows(problems, lambda t: tok.encode(t, add_special_tokens=False).ids, layout)


def _confidence(model: Transformer, ids: torch.Tensor, positions, valid, layout: Layout, window=()) -> list[float]:  # noqa: ANN001
    """Per answer position: the largest probability among non-mask tokens, from a full-row forward in which the
    ``window`` blocks (0-based) see each other."""
    attn = block_causal_mask(valid[None], layout).clone()
    block = [0] * layout.max_prompt + [1 + j // layout.block_size for j in range(layout.answer_len)]
    for q in range(layout.length):
        for k in range(layout.length):
            attn[0, q, k] |= block[q] - 1 in window and block[k] - 1 in window
    with torch.no_grad():
        probs = model(ids[None], positions[None], attn_mask=attn).float()[0].softmax(-1)  # (L, vocab)
    probs[:, layout.mask_id] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    p = layout.max_prompt
    return probs[p - 1 : layout.length - 1].max(-1).values.tolist()  # Dream's shift: output i - 1 predicts i


@pytest.mark.parametrize(("order", "windowed"), [("threshold", False), ("d2f", False), ("d2f", True)])
def test_states_follow_the_decoders_rule_with_the_reference_tokens(order: str, windowed: bool) -> None:
    """Every state replayed; with ``windowed`` (the engine's window attention) the D2F forward lets the blocks in
    flight see each other and each state keeps that window for its training rows."""
    model, layout, (clean, positions, valid) = _setup()
    pool = visit(model, clean, positions, valid, layout, order, THRESHOLD, window_attention=windowed)
    assert model.training  # restored
    p, bs, nb = layout.max_prompt, layout.block_size, layout.num_blocks
    multi = semi = 0
    for r in range(clean.shape[0]):
        target = clean[r, p:].tolist()
        index = [s for s in range(len(pool)) if int(pool.row[s]) == r]
        states = [pool.masks[s].tolist() for s in index]
        assert all(states[0])  # the answer starts all-mask
        window, full, end_seen = [0], {0: True}, False
        for i, masked in enumerate(states):
            left = [sum(masked[b * bs : (b + 1) * bs]) for b in range(nb)]
            if order == "threshold":  # one block: the first one with masks
                window = [next(b for b in range(nb) if left[b])]
                full = {window[0]: True}
            else:  # D2F: append at tau_add = 0.1, fully activate at tau_act = 0.95 (the predecessor's ratio)
                last = window[-1]
                if not end_seen and last + 1 < nb and 1 - left[last] / bs >= 0.1:
                    window.append(last + 1)
                    full[last + 1] = False
                for b in window[1:]:
                    full[b] = full[b] or 1 - left[b - 1] / bs >= 0.95
            assert pool.window[index[i]].tolist() == [windowed and b in window for b in range(nb)]
            ids = clean[r].clone()
            ids[p:][torch.tensor(masked)] = layout.mask_id
            conf = _confidence(model, ids, positions[r], valid[r], layout, window if windowed else ())
            fill = []
            for b in window:
                open_ = [j for j in range(b * bs, (b + 1) * bs) if masked[j]]
                above = [j for j in open_ if conf[j] > THRESHOLD]
                if not above and full[b] and open_:
                    above = [max(open_, key=lambda j: (conf[j], -j))]
                semi += not full[b] and bool(above)
                fill += above
            assert fill, (r, i)
            multi += len(fill) > 1
            after = [m and j not in fill for j, m in enumerate(masked)]
            end_seen = end_seen or any(target[j] == layout.end_id for j in fill)
            if i + 1 < len(states):
                assert states[i + 1] == after, (order, r, i)
            else:  # the last forward completes the window, and the row ends there
                assert not any(after[j] for b in window for j in range(b * bs, (b + 1) * bs))
                done = [b for b in range(nb) if not any(after[b * bs : (b + 1) * bs])]
                ended = any(target[j] == layout.end_id for b in done for j in range(b * bs, (b + 1) * bs))
                assert not any(after) or (ended if order == "threshold" else end_seen), (order, r)
    assert multi > 0
    assert order == "threshold" or semi > 0  # semi-activated blocks filled above-threshold positions


def test_an_unknown_order_is_refused() -> None:
    model, layout, rows = _setup()
    with pytest.raises(ValueError, match="order"):
        visit(model, *rows, layout, "vanilla")


def test_visited_rows_have_the_random_rows_layout(tmp_path: Path) -> None:
    model, layout, rows = _setup()
    pool = Visited.merge([visit(model, *rows, layout, "threshold"), visit(model, *rows, layout, "d2f")])
    assert int(pool.row.max()) == 2 * rows[0].shape[0] - 1 and torch.equal(pool.clean[6:], pool.clean[:6])
    pool.save(tmp_path / "pool.safetensors")
    again = Visited.load(tmp_path / "pool.safetensors")
    assert all(torch.equal(getattr(pool, k), getattr(again, k)) for k in ("clean", "positions", "row", "masks"))
    batch = visited_batch(again, layout, torch.Generator().manual_seed(0), 400)
    twice = visited_batch(again, layout, torch.Generator().manual_seed(0), 400)
    assert all(torch.equal(batch[k], twice[k]) for k in batch)  # a pure function of the generator
    p, bs = layout.max_prompt, layout.block_size
    assert torch.equal(batch["loss_mask"], batch["ids"] == layout.mask_id)
    assert not batch["loss_mask"][:, :p].any()
    states = {tuple(m.tolist()) for m in pool.masks}
    fresh_rows = 0
    for i in range(400):
        masked = batch["loss_mask"][i, p:]
        assert tuple(masked.tolist()) in states  # a recorded state, unchanged
        keep = ~batch["loss_mask"][i]
        assert torch.equal(batch["ids"][i][keep], batch["targets"][i][keep])
        valid = batch["attn_mask"][i, -1]  # the last answer query sees every real key and no pad
        base = block_causal_mask(valid[None], layout)[0]
        if not torch.equal(batch["attn_mask"][i], base):  # opened: only for a fresh block, as the engine does
            first = int(masked.nonzero()[0]) // bs
            assert first * bs == int(masked.nonzero()[0]) and masked[first * bs :].all()
            opened = open_fresh_blocks(base[None], valid[None], torch.tensor([first]), layout)[0]
            assert torch.equal(batch["attn_mask"][i], opened)
            fresh_rows += 1
    assert fresh_rows > 0


def _own_token_pool(model: Transformer, layout: Layout, problems: list[task.Problem], encode) -> Visited:  # noqa: ANN001
    phrasings = [Phrasings(p, encode, layout.end_id, layout.answer_len) for p in problems]
    rows = encode_rows(problems, encode, layout)
    return visit(model, *rows, layout, "threshold", 0.9, phrasings=phrasings, rng=random.Random(0))


def _answers(p: task.Problem, encode, layout: Layout) -> torch.Tensor:  # noqa: ANN001
    """(phrasings, answer_len) every phrasing of ``p`` as answer ids, enumerated (``tests.support.wordings``)."""
    return torch.tensor(all_answers(p, encode, layout.end_id, layout.answer_len))


@pytest.mark.parametrize("weights", ["bundled", "random"])
def test_own_token_states_follow_the_rule_with_the_models_tokens_or_a_posterior_draw(weights: str) -> None:
    """Threshold order, filled with the model's own tokens: each state's target is one of the problem's phrasings
    (by enumeration) agreeing with the state; the next state fixes exactly the positions the rule picks (replayed
    with a full-row forward), holding the model's tokens when some phrasing agrees with them, else the target's."""
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = Layout(32, 32, 2, ids["eos_token_id"], ids["mask_token_id"])
    encode = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    if weights == "bundled":
        model = load_checkpoint(Path(lopa.tiny.__file__).parent / "checkpoint").model
    else:
        torch.manual_seed(0)
        args = SimpleNamespace(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
        model = Transformer(model_config(args, tok.get_vocab_size(), ids))
    problems = [p for p in task.fixed_set("validation", 12) if p.num_ops == 2][:4]  # 2,160 phrasings each
    pool = _own_token_pool(model, layout, problems, encode)
    p, bs = layout.max_prompt, layout.block_size
    own = drawn = 0
    for prob in problems:
        answers = _answers(prob, encode, layout)
        prompt = encode_rows([prob], encode, layout)[0][0, :p]
        states = [s for s in range(len(pool)) if torch.equal(pool.clean[s, :p], prompt)]
        assert all(pool.masks[states[0]])  # the answer starts all-mask
        for i, s in enumerate(states):
            target, masked = pool.clean[s, p:], pool.masks[s]
            assert (answers == target).all(1).any()  # a phrasing of this problem, agreeing with the state
            row = pool.clean[s].clone()
            row[p:][masked] = layout.mask_id
            attn = block_causal_mask(pool.valid[s][None], layout)
            with torch.no_grad():
                logits = model(row[None], pool.positions[s][None], attn_mask=attn).float()[0, p - 1 : -1]
            logits[:, layout.mask_id] = float("-inf")
            conf, best = logits.softmax(-1).max(-1)  # (answer_len,) each; Dream's shift
            window = int(masked.nonzero()[0]) // bs
            open_ = [j for j in range(window * bs, (window + 1) * bs) if masked[j]]
            fill = [j for j in open_ if conf[j] > 0.9] or [max(open_, key=lambda j: (float(conf[j]), -j))]
            if i + 1 == len(states):
                continue
            nxt = pool.clean[states[i + 1], p:]
            assert pool.masks[states[i + 1]].tolist() == [m and j not in fill for j, m in enumerate(masked.tolist())]
            proposal = torch.where(masked, best, target)  # the model's tokens on every masked position
            fixed = ~masked
            fixed[fill] = True
            fits = bool(((answers == proposal) | ~fixed).all(1).any())  # some phrasing agrees with the fills
            if fits:
                own += 1
                assert all(int(nxt[j]) == int(best[j]) for j in fill)
            else:
                drawn += 1
                assert all(int(nxt[j]) == int(target[j]) for j in fill)
    if weights == "bundled":
        assert own > 10 * max(drawn, 1)  # a trained model's fills mostly fit
    else:
        assert drawn > own  # a random model's rarely do
