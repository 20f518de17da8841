"""Config files and overrides: types, domains and unknown keys are clear errors."""

import pytest

from siri.config import load_config, parse_overrides


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
