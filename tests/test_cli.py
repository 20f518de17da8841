"""The `siri` command: a user's mistake is one line naming what is wrong and exit code 2;
a fault of siri keeps its traceback."""

import pytest

pytest.importorskip("transformers")

from trainer_fixtures import save_model_dir, tiny_overrides, write_problems

from siri import cli
from siri.errors import UserError


def error_of(capsys, argv) -> str:
    """stderr of `siri argv`, which must fail as a user error: exit code 2, one line."""
    capsys.readouterr()  # what the test's own setup printed (transformers' progress bars)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("directory", "is not a file"),
    ("optim: [1,\n", "is not readable YAML"),
    ("- a\n- b\n", "must hold a mapping"),
])
def test_a_bad_config_file(tmp_path, capsys, content, match):
    path = tmp_path / "run.yaml"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    assert match in error_of(capsys, ["train", "--config", str(path)])


def test_model_path_missing_or_a_file_names_the_key_not_a_hub(tmp_path, capsys):
    err = error_of(capsys, ["train", *tiny_overrides(tmp_path, **{"model.path": str(tmp_path / "missing")})])
    assert "model.path" in err and "does not exist" in err and "Repo id" not in err
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    assert "is a file" in error_of(capsys, ["train", *tiny_overrides(tmp_path, **{"model.path": str(a_file)})])


def test_output_dir_under_a_regular_file(tmp_path, capsys):
    model_dir = save_model_dir(str(tmp_path / "model"))
    (tmp_path / "taken").write_text("x")
    overrides = tiny_overrides(tmp_path, **{"model.path": model_dir, "output_dir": str(tmp_path / "taken" / "run")})
    assert "output_dir" in error_of(capsys, ["train", *overrides])


def test_demo_out_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert "--out" in error_of(capsys, ["demo", "--quick", "--out", str(tmp_path / "taken" / "demo")])


def test_eval_on_an_empty_data_file_is_an_error_not_accuracy_zero(tmp_path, capsys):
    model_dir = save_model_dir(str(tmp_path / "model"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    err = error_of(capsys, ["eval", "--model", model_dir, "--data", str(empty), "--budget", "4", "--device", "cpu",
                            "--no-chat-template", "--out", str(tmp_path / "eval")])
    assert "empty.jsonl" in err and "nothing to evaluate" in err
    assert not (tmp_path / "eval").exists()


def test_eval_out_under_a_regular_file(tmp_path, capsys):
    model_dir = save_model_dir(str(tmp_path / "model"))
    data = write_problems(str(tmp_path / "a.jsonl"), 2)
    (tmp_path / "taken").write_text("x")
    err = error_of(capsys, ["eval", "--model", model_dir, "--data", data, "--budget", "4", "--device", "cpu",
                            "--out", str(tmp_path / "taken" / "eval")])
    assert "out" in err and "which is a file" in err


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    import siri.trainer

    def broken(cfg, **kwargs):
        raise ValueError("a bug deep inside a run")

    monkeypatch.setattr(siri.trainer, "train", broken)
    with pytest.raises(ValueError, match="a bug deep inside a run"):
        cli.main(["train", *tiny_overrides(tmp_path)])


def test_a_user_error_from_deep_inside_is_one_line(tmp_path, monkeypatch, capsys):
    import siri.trainer

    def refused(cfg, **kwargs):
        raise UserError("data.train_files: something the user can fix")

    monkeypatch.setattr(siri.trainer, "train", refused)
    assert "something the user can fix" in error_of(capsys, ["train", *tiny_overrides(tmp_path)])


def test_a_model_directory_without_weights(tmp_path, capsys):
    model_dir = save_model_dir(str(tmp_path / "model"))
    (tmp_path / "model" / "model.safetensors").unlink()
    err = error_of(capsys, ["train", *tiny_overrides(tmp_path, **{"model.path": model_dir})])
    assert "has no loadable weights" in err and model_dir in err
