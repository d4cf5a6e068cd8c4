"""SamplingParams: every invalid value raises RequestError (a ValueError) naming the field."""

from __future__ import annotations

import pytest

from engine.core.sampling_params import SamplingParams
from engine.errors import RequestError

INVALID = [
    ("n", {"n": 0}), ("n", {"n": 1.5}),
    ("temperature", {"temperature": -0.1}),
    ("top_p", {"top_p": 0.0}), ("top_p", {"top_p": 1.01}), ("top_p", {"top_p": float("nan")}),
    ("top_k", {"top_k": -2}), ("top_k", {"top_k": 2.0}),
    ("min_p", {"min_p": -0.1}), ("min_p", {"min_p": 1.5}), ("min_p", {"min_p": float("nan")}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("presence_penalty", {"presence_penalty": -2.5}),
    ("frequency_penalty", {"frequency_penalty": 3.0}),
    ("frequency_penalty", {"frequency_penalty": -2.01}),
    ("max_tokens", {"max_tokens": 0}), ("max_tokens", {"max_tokens": 2.5}),
    ("min_tokens", {"min_tokens": -1}), ("min_tokens", {"min_tokens": 1.5}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 4}),
    ("logprobs", {"logprobs": -1}), ("logprobs", {"logprobs": 1.5}),
    ("prompt_logprobs", {"prompt_logprobs": -1}),
    ("stop", {"stop": ""}), ("stop", {"stop": ["a", ""]}), ("stop", {"stop": [3]}),
    ("stop_token_ids", {"stop_token_ids": [-1]}), ("stop_token_ids", {"stop_token_ids": ["a"]}),
    ("seed", {"seed": 1.5}), ("seed", {"seed": "1"}),
]

# Invalid values the current validation lets through or reports as a bare TypeError.
# Each needs a change in engine/sampling_params.py.
KNOWN_GAPS = [
    ("temperature", {"temperature": float("nan")}),
    ("temperature", {"temperature": float("inf")}),
    ("temperature", {"temperature": "1"}),
    ("repetition_penalty", {"repetition_penalty": float("nan")}),
    ("repetition_penalty", {"repetition_penalty": float("inf")}),
    ("stop", {"stop": 5}),
    ("stop_token_ids", {"stop_token_ids": 5}),
]


@pytest.mark.parametrize(("name", "kwargs"), INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_invalid_value_raises_request_error_naming_field(name, kwargs):
    with pytest.raises(RequestError, match=rf"SamplingParams\.{name}=") as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("name", "kwargs"), KNOWN_GAPS, ids=[f"{n}={v}" for n, v in KNOWN_GAPS])
def test_known_gaps_raise_request_error(name, kwargs):
    with pytest.raises(RequestError, match=rf"SamplingParams\.{name}="):
        SamplingParams(**kwargs)


def test_defaults_and_edge_values_are_valid():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.stop_strs, p.stop_token_ids) == (1, 1.0, -1, [], [])
    SamplingParams(top_p=1.0, top_k=0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   max_tokens=None, min_tokens=0, logprobs=0, prompt_logprobs=0, seed=-3)
    SamplingParams(min_tokens=4, max_tokens=4)


def test_tiny_temperature_is_greedy():
    assert SamplingParams(temperature=1e-6).temperature == 0.0
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_stop_normalized_to_list():
    assert SamplingParams(stop="###").stop_strs == ["###"]
    assert SamplingParams(stop=["a", "b"]).stop_strs == ["a", "b"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
