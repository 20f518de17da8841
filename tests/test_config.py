"""Config files and overrides: types, domains and unknown keys are clear errors."""

import re

import pytest

from siri import config as config_module
from siri.config import load_config, parse_overrides, resume_changes, to_dict
from siri.errors import UserError


def test_defaults_are_the_papers_setting():
    cfg = load_config(None)
    assert (cfg.schedule.kind, cfg.schedule.l_max, cfg.schedule.l_min, cfg.schedule.period) == (
        "cosine", 16384, 8192, 640,
    )
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.kl_coef) == (0.2, 0.28, 0.0)
    assert (cfg.prompts_per_step, cfg.optim.lr, cfg.rollout.temperature) == (128, 1e-6, 1.0)


def test_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-6\nschedule:\n  kind: stair\n  period: 20\nrollout:\n  n: 4\n")
    cfg = load_config(str(path), ["optim.lr=3e-6", "schedule.stages=[[0, 8], [5, 16]]", "algorithm.dual_clip=3"])
    assert cfg.optim.lr == 3e-6 and cfg.schedule.kind == "stair" and cfg.rollout.n == 4
    assert cfg.schedule.stages == [[0, 8], [5, 16]] and cfg.algorithm.dual_clip == 3.0


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lrr=1", "optim.'lrr'"),
        ("nonsense=1", "'nonsense'"),
        ("rollout.n=0", "rollout.n"),
        ("rollout.n=2.5", "rollout.n"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("algorithm.loss_agg=foo", "algorithm.loss_agg"),
        ("algorithm.kl_estimator=k9", "algorithm.kl_estimator"),
        ("logging.progress=1", "logging.progress"),
        ("optim=3", "optim"),
        ("schedule.kind=sawtooth", "schedule.kind"),
        ("prompts_per_step=10", "mini_batches"),
        ("model.param_dtype=int8", "model.param_dtype"),
        ("model.param_dtype=float16", "model.param_dtype"),  # narrower than model.dtype's bfloat16
    ],
)
def test_bad_values_name_the_key(override, named):
    overrides = [override, "algorithm.mini_batches=4"] if override.startswith("prompts_per_step") else [override]
    with pytest.raises(ValueError, match=named.replace(".", r"\.").replace("'", "'")):
        load_config(None, overrides)


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["lr"])


# Every key is checked when the config is read, before anything loads; each of these was
# accepted before (and failed later, deep in a run, or silently trained wrongly).
@pytest.mark.parametrize("override, named", [
    ("optim.grad_clip=-1", "optim.grad_clip"),  # flipped every gradient
    ("optim.grad_clip=0", "optim.grad_clip"),  # zeroed them
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.warmup_steps=-5", "optim.warmup_steps"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("algorithm.clip_low=1.5", "algorithm.clip_low"),
    ("algorithm.clip_high=-0.1", "algorithm.clip_high"),
    ("algorithm.dual_clip=0.5", "algorithm.dual_clip"),
    ("algorithm.tis_cap=0", "algorithm.tis_cap"),
    ("algorithm.kl_coef=.nan", "algorithm.kl_coef"),
    ("algorithm.entropy_coef=.inf", "algorithm.entropy_coef"),
    ("algorithm.kernel_backend=tpu", "algorithm.kernel_backend"),
    ("algorithm.max_tokens_per_micro_batch=16384", "algorithm.max_tokens_per_micro_batch"),  # < 1 + l_max
    ("rollout.temperature=.nan", "rollout.temperature"),
    ("rollout.temperature=.inf", "rollout.temperature"),
    ("rollout.gpu_memory_utilization=0", "rollout.gpu_memory_utilization"),
    ("reward.overlong_buffer=0", "reward.overlong_buffer"),
    ("reward.timeout_s=0", "reward.timeout_s"),
    ("reward.fn=''", "reward.fn"),
    ("seed=18446744073709551616", "seed"),  # 2**64: overflowed torch's and numpy's seeding
    ("seed=-1", "seed"),
    ("schedule.l_min=20000", "schedule"),  # above l_max
    ("schedule.period=7", "schedule"),  # odd
    ("schedule.kind=constant", None),  # valid: l_max is its length
    ("model.attn_implementation=''", "model.attn_implementation"),
    ("data.problem_key=''", "data.problem_key"),
    ("logging.wandb_project=''", "logging.wandb_project"),
    ("output_dir=''", "output_dir"),
])
def test_every_key_is_checked_up_front(override, named):
    if named is None:
        load_config(None, [override])
        return
    with pytest.raises(UserError, match=re.escape(named)):
        load_config(None, [override])


def test_grad_clip_null_turns_clipping_off():
    assert load_config(None, ["optim.grad_clip=null"]).optim.grad_clip is None


def test_the_defaults_fit_the_longest_sample():
    cfg = load_config(None)
    assert cfg.algorithm.max_tokens_per_micro_batch >= cfg.schedule.l_max + 1


def test_paths_are_checked_up_front(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserError, match=r"model.path .* does not exist .*nothing is downloaded"):
        load_config(None, [f"model.path={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match=r"model.path .* is a file"):
        load_config(None, [f"model.path={a_file}"])
    with pytest.raises(UserError, match=r"model.path .* holds no config.json"):
        load_config(None, [f"model.path={tmp_path}"])
    with pytest.raises(UserError, match=r"output_dir .* is under .*file.txt.*, which is a file"):
        load_config(None, [f"output_dir={a_file / 'run'}"])
    with pytest.raises(UserError, match=r"output_dir .* is a file"):
        load_config(None, [f"output_dir={a_file}"])
    with pytest.raises(UserError, match=r"data.train_files\[0\]"):
        load_config(None, [f"data.train_files=[{tmp_path / 'missing.jsonl'}]"])


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("directory", "is not a file"),
    ("optim: {lr: [1e-6\n", "is not readable YAML"),
    ("- optim\n- data\n", "must hold a mapping of sections"),
    ("\xff\xfe", "is not readable YAML"),
])
def test_a_bad_config_file_is_a_user_error_naming_it(tmp_path, content, match):
    path = tmp_path / "run.yaml"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError, match=f"--config '{re.escape(str(path))}' {match}"):
        load_config(str(path))


def test_a_malformed_override_value_is_a_user_error():
    with pytest.raises(UserError, match="optim.lr=\\[1"):
        parse_overrides(["optim.lr=[1"])


def test_choice_lists_and_loss_defaults_come_from_their_owners():
    from siri import advantages, packing, schedule
    from siri.config import AlgorithmConfig
    from siri.kernels.config import LossConfig

    assert config_module.LOSS_AGGS is packing.LOSS_AGGS
    assert config_module.ADVANTAGE_ESTIMATORS is advantages.ADVANTAGE_ESTIMATORS
    assert config_module.SCHEDULE_KINDS is schedule.SCHEDULE_KINDS
    defaults = AlgorithmConfig()
    for name in ("clip_low", "clip_high", "dual_clip", "kl_coef", "kl_estimator", "entropy_coef", "tis_cap"):
        assert getattr(defaults, name) == getattr(LossConfig, name), name


def test_resume_changes_sorts_keys_into_refused_and_applied():
    cfg = load_config(None)
    saved = to_dict(cfg)
    assert resume_changes(saved, cfg, "ckpt") == []
    changed = load_config(None, ["optim.lr=2e-6", "total_steps=3000", "rollout.temperature=0.9"])
    assert resume_changes(saved, changed, "ckpt") == [
        "optim.lr: 1e-06 -> 2e-06", "rollout.temperature: 1.0 -> 0.9", "total_steps: 1920 -> 3000"]
    for override in ("schedule.period=320", "data.max_prompt_length=512", "seed=3", "model.param_dtype=bfloat16"):
        with pytest.raises(UserError, match=f"cannot resume 'ckpt' with a changed {override.split('=')[0]} "):
            resume_changes(saved, load_config(None, [override]), "ckpt")
    # A key the saved config lacks (an older siri) is not compared.
    del saved["reward"]["timeout_s"]
    assert resume_changes(saved, cfg, "ckpt") == []
