"""What a user keeps is replaced whole or not at all (siri.files)."""

import json
import os

import pytest

from siri.files import write_atomically, write_json_atomically, write_text_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "eval.json")
    write_json_atomically(path, {"acc": 0.5})

    def torn(tmp):
        with open(tmp, "w") as handle:
            handle.write('{"acc": 0.')  # killed half-way, as far as this file knows
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, torn)
    assert json.loads(open(path).read()) == {"acc": 0.5}
    assert os.listdir(tmp_path) == ["eval.json"]


def test_a_value_json_cannot_take_raises_before_writing(tmp_path):
    path = str(tmp_path / "results.json")
    write_json_atomically(path, [1, 2])
    with pytest.raises(TypeError):
        write_json_atomically(path, {"model": object()})
    assert json.loads(open(path).read()) == [1, 2]
    assert os.listdir(tmp_path) == ["results.json"]


def test_text_replaces_the_file(tmp_path):
    path = str(tmp_path / "id.txt")
    write_text_atomically(path, "a\n")
    write_text_atomically(path, "b\n")
    assert open(path).read() == "b\n" and os.listdir(tmp_path) == ["id.txt"]
