"""batching.py as pure functions: BatchSize.parse, make_size_fn and iter_batches."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamproc.batching import BatchSize, iter_batches, make_size_fn, validate_batch_by


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (64, BatchSize(64, "records")),
        (1, BatchSize(1, "records")),
        ("64", BatchSize(64, "records")),
        ("64 records", BatchSize(64, "records")),
        ("64 record", BatchSize(64, "records")),
        ("  64   Records ", BatchSize(64, "records")),
        ("8192 tokens", BatchSize(8192, "tokens")),
        ("8192tokens", BatchSize(8192, "tokens")),
        ("8192 TOKENS", BatchSize(8192, "tokens")),
        ("8192 padded_tokens", BatchSize(8192, "padded_tokens")),
        (BatchSize(5, "tokens"), BatchSize(5, "tokens")),
    ],
)
def test_parse_valid_specs(spec, expected):
    assert BatchSize.parse(spec) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (0, "must be positive"),
        (-3, "must be positive"),
        ("0 tokens", "must be positive"),
        ("-5", "is not a batch size"),
        ("", "is not a batch size"),
        ("tokens", "is not a batch size"),
        ("64 tokens please", "is not a batch size"),
        ("1.5", "is not a batch size"),
        ("1e3", "is not a batch size"),
        ("64 bananas", "unknown unit 'bananas'"),
        (True, "positive int"),
        (3.0, "must be an int"),
        (None, "must be an int"),
        ([64], "must be an int"),
    ],
)
def test_parse_invalid_specs_name_the_parameter(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        BatchSize.parse(spec, param="my_batch_size")
    assert "my_batch_size" in str(info.value)


def test_parse_default_parameter_name_and_str():
    with pytest.raises(ValueError, match=r"^batch_size"):
        BatchSize.parse(0)
    assert str(BatchSize.parse("10 padded_tokens")) == "10 padded_tokens"
    assert str(BatchSize.parse(7)) == "7 records"


def test_validate_batch_by():
    assert validate_batch_by(None) is None
    assert validate_batch_by("text") == "text"
    assert validate_batch_by(len) is len
    for bad in (3, ["text"], 1.5):
        with pytest.raises(ValueError, match="my_by"):
            validate_batch_by(bad, param="my_by")


def test_make_size_fn():
    assert make_size_fn(None)("abcd") == 4
    assert make_size_fn(None)([1, 2]) == 2
    assert make_size_fn("text")({"text": "abc"}) == 3
    assert make_size_fn("tokens")({"tokens": [1, 2, 3, 4]}) == 4
    assert make_size_fn("n")({"n": 17}) == 17  # an int field is the size itself
    assert make_size_fn(lambda r: r * 2)(5) == 10
    with pytest.raises(TypeError, match="pass batch_by"):
        make_size_fn(None)({"text": "abc"})
    with pytest.raises(KeyError):
        make_size_fn("missing")({"text": "abc"})


def batches(records, spec, batch_by=None):  # type: ignore[no-untyped-def]
    return list(iter_batches(records, BatchSize.parse(spec), batch_by))


def test_record_batches():
    assert batches(range(5), 2) == [[0, 1], [2, 3], [4]]
    assert batches(range(4), 2) == [[0, 1], [2, 3]]
    assert batches(range(3), 10) == [[0, 1, 2]]
    assert batches(range(3), 1) == [[0], [1], [2]]
    assert batches([], 3) == []
    assert batches([], "3 tokens") == []


def test_record_batches_ignore_batch_by():
    assert batches([{"t": "a"}] * 3, 2, batch_by="t") == [[{"t": "a"}] * 2, [{"t": "a"}]]


def test_token_batches():
    assert batches(["ab", "c", "def"], "4 tokens") == [["ab", "c"], ["def"]]
    assert batches(["ab", "cd"], "4 tokens") == [["ab", "cd"]]  # exactly at the budget
    assert batches(["ab", "cde"], "4 tokens") == [["ab"], ["cde"]]


def test_oversized_record_forms_its_own_batch():
    assert batches(["aaaaaa"], "4 tokens") == [["aaaaaa"]]
    assert batches(["aaaaaa", "b", "c"], "4 tokens") == [["aaaaaa"], ["b", "c"]]
    assert batches(["a", "bbbbbb", "c"], "4 tokens") == [["a"], ["bbbbbb"], ["c"]]
    assert batches(["a", "bbbbbb", "c"], "4 padded_tokens") == [["a"], ["bbbbbb"], ["c"]]
    assert batches(["a", "bbbbbb", "cccccc"], "4 padded_tokens") == [["a"], ["bbbbbb"], ["cccccc"]]


def test_zero_size_records_fit_anywhere():
    assert batches(["", "", "abcd", ""], "4 tokens") == [["", "", "abcd", ""]]


def test_padded_token_batches():
    # max size x count <= 6
    assert batches(["a", "a", "a", "a", "a", "a", "a"], "6 padded_tokens") == [["a"] * 6, ["a"]]
    assert batches(["aa", "a", "aaa"], "6 padded_tokens") == [["aa", "a"], ["aaa"]]  # 3x3 > 6
    assert batches(["aaa", "a"], "6 padded_tokens") == [["aaa", "a"]]  # 3x2
    assert batches(["a", "aaa", "a"], "6 padded_tokens") == [["a", "aaa"], ["a"]]  # 3x3 > 6
    # the same records by plain tokens: 1 + 3 + 1 = 5 fits
    assert batches(["a", "aaa", "a"], "6 tokens") == [["a", "aaa", "a"]]


def test_token_batches_with_batch_by():
    records = [{"n": 3}, {"n": 3}, {"n": 1}, {"n": 5}]
    assert batches(records, "6 tokens", batch_by="n") == [records[:2], records[2:]]
    assert batches(records, "6 padded_tokens", batch_by=lambda r: r["n"]) == [records[:2], records[2:3], records[3:]]


def test_iter_batches_is_lazy():
    pulled = []

    def source():  # type: ignore[no-untyped-def]
        for i in range(100):
            pulled.append(i)
            yield i

    iterator = iter_batches(source(), BatchSize(3))
    assert pulled == []
    assert next(iterator) == [0, 1, 2]
    assert pulled == [0, 1, 2]  # a record batch is yielded as soon as it is full
    tokens = iter_batches(source(), BatchSize(2, "tokens"), batch_by=lambda i: 1)
    pulled.clear()
    assert next(tokens) == [0, 1]
    assert pulled == [0, 1, 2]  # a token batch ends when the next record does not fit


@st.composite
def sizes_and_budget(draw):  # type: ignore[no-untyped-def]
    return (
        draw(st.lists(st.integers(0, 12), max_size=40)),
        draw(st.integers(1, 20)),
        draw(st.sampled_from(["tokens", "padded_tokens"])),
    )


def _cost(sizes: list[int], unit: str) -> int:
    return sum(sizes) if unit == "tokens" else max(sizes, default=0) * len(sizes)


@settings(max_examples=200, deadline=None)
@given(sizes_and_budget())
def test_token_batches_are_greedy_and_within_budget(case):
    sizes, budget, unit = case
    records = [(i, size) for i, size in enumerate(sizes)]
    result = list(iter_batches(records, BatchSize(budget, unit), batch_by=lambda r: r[1]))
    assert [r for batch in result for r in batch] == records  # order kept, nothing lost
    for index, batch in enumerate(result):
        batch_sizes = [size for _, size in batch]
        assert batch, "no empty batch"
        assert len(batch) == 1 or _cost(batch_sizes, unit) <= budget
        if index + 1 < len(result):  # greedy: the next record would not have fitted
            assert _cost([*batch_sizes, result[index + 1][0][1]], unit) > budget


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 50), st.integers(1, 10))
def test_record_batches_property(count, size):
    result = list(iter_batches(range(count), BatchSize(size)))
    assert [r for batch in result for r in batch] == list(range(count))
    assert all(len(batch) == size for batch in result[:-1])
    assert all(0 < len(batch) <= size for batch in result)
