"""`rlmt serve`'s text of a choice as its tokens arrive: incremental detokenizing equals decoding the whole
completion (multi-byte characters split across tokens, special tokens, invalid bytes), stop strings across token
boundaries with the tokens counted up to the one that completed it, and the held-back text that makes the
streamed deltas concatenate to the non-streamed reply."""

from __future__ import annotations

import random

import pytest

from rlmt.serve import ChoiceText


@pytest.fixture(scope="module")
def tok():
    from rlmt.models import load_model

    return load_model("tiny-random").tokenizer  # byte-level: one token a byte, then <|endoftext|> etc.


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def random_ids(rng: random.Random, tokenizer, pieces: list[int], n: int) -> list[int]:
    """Random bytes, pieces of multi-byte characters cut anywhere, and special tokens."""
    special = sorted(set(tokenizer.all_special_ids))
    ids: list[int] = []
    while len(ids) < n:
        r = rng.random()
        ids += (pieces[rng.randrange(len(pieces)):] if r < 0.3 else [rng.choice(special)] if r < 0.4
                else [rng.randrange(256)])
    return ids


def run(decode, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[ChoiceText, list[str]]:
    """Push ``ids`` one at a time -> (the text, what ready() gave after each token)."""
    text, readies = ChoiceText(decode, stop), []
    for token in ids:
        if text.push(token):
            break
        readies.append(text.ready())
    text.finish()
    return text, readies


def test_incremental_text_is_the_whole_decode_and_ready_only_grows(tok):
    decode, rng = decoder(tok), random.Random(0)
    pieces = ids_of(tok, "é€😀ab\n")
    for _ in range(400):
        ids = random_ids(rng, tok, pieces, rng.randint(0, 30))
        text, readies = run(decode, ids)
        assert text.text == decode(ids) and text.tokens == len(ids)
        assert all(r == text.text[:len(r)] for r in readies)  # what was sent is never taken back
        assert all(len(a) <= len(b) for a, b in zip(readies, readies[1:]))


def test_an_incomplete_character_is_held_until_its_last_byte(tok):
    decode = decoder(tok)
    euro = ids_of(tok, "€")
    assert len(euro) == 3
    text = ChoiceText(decode)
    for token in ids_of(tok, "a") + euro[:2]:
        text.push(token)
    assert text.ready() == "a"
    text.push(euro[2])
    assert text.ready() == "a€"
    text = ChoiceText(decode)
    text.push(euro[0])
    text.finish()  # the tokens ended mid-character: the replacement character, as a whole decode gives
    assert text.text == decode(euro[:1]) == "\ufffd"


def test_stop_string_across_tokens_ends_the_text_before_it(tok):
    decode = decoder(tok)
    ids = ids_of(tok, "hello world. Bye. More")
    text, readies = run(decode, ids, ("d. B",))
    assert text.stopped and text.text == "hello worl"
    assert text.tokens == len("hello world. B")  # one token a byte: up to the token that completed the stop
    assert all(not r.endswith(("d", "d.", "d. ")) for r in readies)  # a possible stop's start is held back
    assert readies[-1] == "hello worl"  # after "hello world. ": all but the held "d. "


def test_the_earliest_stop_wins_and_an_unmatched_hold_is_released(tok):
    decode = decoder(tok)
    text, _ = run(decode, ids_of(tok, "abc xyz abc"), ("xyz", "c x"))
    assert text.text == "ab" and text.tokens == len("abc x")
    text = ChoiceText(decode, ("xyz",))
    for token in ids_of(tok, "abx"):
        text.push(token)
    assert text.ready() == "ab"  # "x" may begin "xyz"
    text.push(ids_of(tok, "q")[0])
    assert text.ready() == "abxq"
    text = ChoiceText(decode, ("xyz",))
    for token in ids_of(tok, "abxy"):
        text.push(token)
    text.finish()  # ended on a prefix of the stop: it is text, not a stop
    assert text.text == text.ready() == "abxy" and not text.stopped


def test_stop_at_the_first_token_gives_empty_text(tok):
    text, _ = run(decoder(tok), ids_of(tok, "STOP here"), ("STOP",))
    assert text.text == "" and text.stopped and text.tokens == 4


@pytest.mark.slow
def test_incremental_text_on_the_embedded_tokenizer():
    """SmolLM2's byte-level BPE (multi-character tokens, merges across spaces): random ids decode the same."""
    from transformers import AutoTokenizer

    from rlmt.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    decode, rng = decoder(tokenizer), random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 40))]
        text, readies = run(decode, ids)
        assert text.text == decode(ids) and all(r == text.text[:len(r)] for r in readies)
