"""One temperature rule (finite and > 0) wherever siri takes a temperature, each error naming the argument.

The places: the kernels' public functions, a rollout's `SamplingSettings`, the config key
`rollout.temperature` and `siri eval --temperature`. Before the rule was shared,
`SamplingSettings` accepted +inf, which divides every logit to 0: uniform sampling.
"""

import math

import pytest
import torch

from siri import cli
from siri.config import load_config
from siri.errors import UserError
from siri.kernels import fused_linear_policy_loss, fused_linear_token_logprobs, policy_loss, token_logprobs
from siri.kernels.config import is_temperature
from siri.rollout import SamplingSettings

# 0 is greedy decoding, -1 flips the distribution, NaN is no number, +inf is uniform sampling.
NOT_TEMPERATURES = [0.0, -1.0, math.nan, math.inf]
# The same values as a user types them: on the command line, and as YAML scalars.
AS_TYPED = {0.0: "0", -1.0: "-1", math.nan: "nan", math.inf: "inf"}
AS_YAML = {0.0: "0", -1.0: "-1", math.nan: ".nan", math.inf: ".inf"}


def test_the_domain():
    assert all(is_temperature(t) for t in (1e-6, 0.6, 1, 1.0, 1e6))
    assert not any(is_temperature(t) for t in [*NOT_TEMPERATURES, -math.inf, True, "1.0", None])


def _kernel_calls():
    gen = torch.Generator().manual_seed(0)
    logits, hidden, weight = (torch.randn(5, 7, generator=gen), torch.randn(5, 3, generator=gen),
                              torch.randn(7, 3, generator=gen))
    targets, advantages, weights = torch.tensor([0, 3, 6, 2, 1]), torch.randn(5, generator=gen), torch.full((5,), 0.2)
    return {
        "token_logprobs": lambda t: token_logprobs(logits, targets, temperature=t),
        "policy_loss": lambda t: policy_loss(logits, targets, advantages, weights, temperature=t),
        "fused_linear_token_logprobs": lambda t: fused_linear_token_logprobs(hidden, weight, targets, temperature=t),
        "fused_linear_policy_loss": lambda t: fused_linear_policy_loss(hidden, weight, targets, advantages, weights,
                                                                       temperature=t),
    }


@pytest.mark.parametrize("function", sorted(_kernel_calls()))
def test_the_kernels(function):
    call = _kernel_calls()[function]
    call(0.6)
    for temperature in NOT_TEMPERATURES:
        with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0"):
            call(temperature)


@pytest.mark.parametrize("temperature", NOT_TEMPERATURES)
def test_sampling_settings(temperature):
    SamplingSettings(n=2, temperature=0.6, top_p=1.0, top_k=-1, max_tokens=4)
    with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0"):
        SamplingSettings(n=2, temperature=temperature, top_p=1.0, top_k=-1, max_tokens=4)


@pytest.mark.parametrize("temperature", NOT_TEMPERATURES)
def test_the_config_key(temperature):
    assert load_config(None, ["rollout.temperature=0.6"]).rollout.temperature == 0.6
    with pytest.raises(UserError, match=r"^rollout\.temperature must be a finite number > 0"):
        load_config(None, [f"rollout.temperature={AS_YAML[temperature]}"])


@pytest.mark.parametrize("temperature", NOT_TEMPERATURES)
def test_siri_eval(temperature, capsys):
    argv = ["eval", "--model", "m", "--data", "d.jsonl", "--budget", "8", "--temperature"]
    assert cli.build_parser().parse_args([*argv, "0.6"]).temperature == 0.6
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([*argv, AS_TYPED[temperature]])
    assert exit_info.value.code == 2
    assert "argument --temperature: must be a finite number > 0" in capsys.readouterr().err
