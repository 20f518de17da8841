"""Problem files, prompt building and the resumable data cursor."""

import json

import pytest

pytest.importorskip("transformers")

from tiny_models import char_tokenizer

from siri.config import DataConfig
from siri.data import DataCursor, Problem, PromptDataset, load_records

RECORDS = [
    {"problem": "1+1=?", "answer": "2", "extra": [1, 2]},
    {"problem": "2+3=?", "answer": 5},  # a numeric answer, as some data sets store them
    {"problem": "a long one " * 20, "answer": "x"},
]

# A chat template in the Qwen style; the test checks the exact text it produces.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template=None):
    """A character-level tokenizer built here (no downloads), optionally with a chat template."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+=?.,'{}\\ \n_|<>"))
    tokenizer = char_tokenizer("".join(chars), unk_token="<unk>", pad=False)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def write_jsonl(path, records):
    with open(path, "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
        handle.write("\n")  # a trailing blank line is not a record
    return str(path)


def test_jsonl_round_trip(tmp_path):
    assert load_records(write_jsonl(tmp_path / "p.jsonl", RECORDS)) == RECORDS


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = [{"problem": r["problem"], "answer": str(r["answer"])} for r in RECORDS]
    path = tmp_path / "p.parquet"
    # Two row groups: the reader walks them in order.
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    assert load_records(path) == records


def test_bad_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        load_records(bad)
    with pytest.raises(ValueError, match="unsupported file type"):
        load_records(write_jsonl(tmp_path / "p.csv", RECORDS))
    with pytest.raises(ValueError, match="is not a file"):
        load_records(tmp_path / "absent.jsonl")


def test_missing_field_names_file_line_and_key(tmp_path):
    records = [{"problem": "1+1=?", "answer": "2"}, {"question": "2+2=?", "answer": "4"}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    with pytest.raises(ValueError, match=r"p\.jsonl, line 2: missing field 'problem'"):
        PromptDataset([path], make_tokenizer(), DataConfig(use_chat_template=False))
    with pytest.raises(ValueError, match="files"):
        PromptDataset([], make_tokenizer(), DataConfig())


def test_raw_prompts_and_length_filter(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    tokenizer = make_tokenizer()
    cfg = DataConfig(use_chat_template=False, instruction="Box it.", max_prompt_length=40)
    dataset = PromptDataset([path], tokenizer, cfg)
    assert len(dataset) == 2 and dataset.num_dropped == 1  # the long problem is over 40 characters
    first = dataset[0]
    assert isinstance(first, Problem)
    assert first.prompt_text == "1+1=? Box it."
    assert first.prompt_ids == tokenizer("1+1=? Box it.")["input_ids"]
    assert (first.index, first.answer, first.source) == (0, "2", "train")
    assert dataset[1].answer == "5" and dataset[1].index == 1
    # No instruction: the problem alone, without a dangling space.
    bare = PromptDataset(path, tokenizer, DataConfig(use_chat_template=False, instruction="", max_prompt_length=400))
    assert bare[0].prompt_text == "1+1=?" and len(bare) == 3


def test_chat_template_is_applied(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS[:1])
    tokenizer = make_tokenizer(CHAT_TEMPLATE)
    dataset = PromptDataset([path], tokenizer, DataConfig(instruction="Box it.", max_prompt_length=400))
    expected = "<|im_start|>user\n1+1=? Box it.<|im_end|>\n<|im_start|>assistant\n"
    assert dataset[0].prompt_text == expected
    assert dataset[0].prompt_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    # Switched off, or a tokenizer without a template: the raw text.
    off = PromptDataset([path], tokenizer, DataConfig(instruction="Box it.", use_chat_template=False))
    assert off[0].prompt_text == "1+1=? Box it."
    with pytest.warns(UserWarning, match="no chat template"):
        plain = PromptDataset([path], make_tokenizer(), DataConfig(instruction="Box it."))
    assert plain[0].prompt_text == "1+1=? Box it."


def test_several_files_keep_order_and_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", RECORDS[:1])
    dataset = PromptDataset([a, b], make_tokenizer(), DataConfig(use_chat_template=False))
    assert [p.source for p in dataset] == ["a", "a", "b"]
    assert [p.index for p in dataset] == [0, 1, 2]


# -- DataCursor ----------------------------------------------------------------------------

def test_cursor_walks_epochs_of_permutations():
    cursor = DataCursor(7, seed=3, shuffle=True)
    drawn = cursor.next_indices(7 * 3 + 2)  # three epochs and a bit, in one call
    for epoch in range(3):
        assert sorted(drawn[7 * epoch:7 * (epoch + 1)]) == list(range(7))
    assert drawn[:7] != drawn[7:14] or drawn[7:14] != drawn[14:21]  # epochs are reshuffled
    assert cursor.state_dict()["epoch"] == 3 and cursor.state_dict()["position"] == 2
    # Same draws in different chunk sizes: the order depends on (seed, epoch) only.
    other = DataCursor(7, seed=3, shuffle=True)
    assert [i for k in (3, 5, 0, 1, 14) for i in other.next_indices(k)] == drawn
    assert DataCursor(7, seed=4).next_indices(21) != drawn[:21]
    assert DataCursor(5, shuffle=False).next_indices(7) == [0, 1, 2, 3, 4, 0, 1]


def test_cursor_resume_draws_what_the_uninterrupted_run_draws():
    uninterrupted = DataCursor(10, seed=11)
    reference = [uninterrupted.next_indices(4) for _ in range(8)]  # crosses several epoch boundaries

    for stop in (1, 2, 3, 5):  # stop at and between epoch boundaries
        first = DataCursor(10, seed=11)
        for _ in range(stop):
            first.next_indices(4)
        state = json.loads(json.dumps(first.state_dict()))  # as stored in trainer_state.json
        resumed = DataCursor(10, seed=11)
        resumed.load_state_dict(state)
        assert [resumed.next_indices(4) for _ in range(8 - stop)] == reference[stop:]


def test_cursor_rejects_a_foreign_state():
    state = DataCursor(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        DataCursor(11, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        DataCursor(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        DataCursor(10, seed=1).load_state_dict({**state, "position": 12})
    with pytest.raises(ValueError, match="num_items"):
        DataCursor(0)
    with pytest.raises(ValueError, match="n must"):
        DataCursor(3).next_indices(-1)
