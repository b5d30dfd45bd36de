"""The HTTP backend against a server that is down, slow, overloaded or answers garbage (a real server
on a real socket): "retry later" and "never" are told apart, and requests in flight stay bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from knowledge.generation.openai_backend import OpenAICompatibleGenerator, RetryPolicy
from knowledge.generation.protocol import LLMInvalidResponseError, LLMNotFoundError, LLMUnavailableError
from tests.knowledge.generation.misbehaving_server import Behaviour, misbehaving_server

PROMPT = [{"role": "user", "content": "Summarise: type 2 diabetes, HbA1c 8.2 %."}]


def generator(base_url: str, *, waits: list[float] | None = None, **kwargs: object) -> OpenAICompatibleGenerator:
    recorded = waits if waits is not None else []
    options: dict[str, object] = {"context_length": 512, "timeout_seconds": 5.0,
                                  "retry": RetryPolicy(max_retries=2, base_seconds=0.01, cap_seconds=0.02)}
    options.update(kwargs)
    return OpenAICompatibleGenerator(base_url=base_url, model="stub", sleep=recorded.append, **options)  # type: ignore[arg-type]


def test_requests_in_flight_never_exceed_the_configured_concurrency() -> None:
    behaviour = Behaviour(delay_seconds=0.3, gather=3)
    with misbehaving_server(behaviour) as url:
        gen = generator(url, concurrency=3)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _i: gen.generate(PROMPT, 16), range(8)))  # type: ignore[arg-type]
        gen.close()
    assert answers == [behaviour.answer] * 8
    assert behaviour.max_in_flight == 3  # concurrent, and bounded


def test_overloaded_server_is_retried_with_capped_backoff_then_reported_unavailable() -> None:
    behaviour = Behaviour(mode="status", status=503)
    with misbehaving_server(behaviour) as url:
        waits: list[float] = []
        gen = generator(url, waits=waits)
        with pytest.raises(LLMUnavailableError, match="503.*gave up after 3 attempts"):
            gen.generate(PROMPT, 16)  # type: ignore[arg-type]
        assert len(waits) == 2 and all(0 <= w <= 0.02 for w in waits)
        behaviour.mode = "ok"  # the server recovers: the next request succeeds
        assert gen.generate(PROMPT, 16) == behaviour.answer  # type: ignore[arg-type]
        gen.close()


def test_rate_limit_then_success_is_one_generation() -> None:
    behaviour = Behaviour(mode="status", status=429)
    with misbehaving_server(behaviour) as url:
        gen = generator(url, waits=(waits := []))

        def recover(seconds: float) -> None:
            waits.append(seconds)
            behaviour.mode = "ok"

        gen._sleep = recover  # the wait is where the rate limit lifts
        assert gen.generate(PROMPT, 16) == behaviour.answer  # type: ignore[arg-type]
        assert len(waits) == 1
        gen.close()


def test_slow_server_times_out_as_unavailable() -> None:
    behaviour = Behaviour(delay_seconds=2.0)
    with misbehaving_server(behaviour) as url:
        gen = generator(url, timeout_seconds=0.3, retry=RetryPolicy(max_retries=1, base_seconds=0.01, cap_seconds=0.01))
        with pytest.raises(LLMUnavailableError, match="did not answer within the timeout"):
            gen.generate(PROMPT, 16)  # type: ignore[arg-type]
        gen.close()


def test_server_that_went_down_is_unavailable() -> None:
    behaviour = Behaviour()
    with misbehaving_server(behaviour) as url:
        gen = generator(url)
    # the prompt is counted first, with the server's tokenizer: that is where the outage shows
    with pytest.raises(LLMUnavailableError, match="tokenizer failed: ConnectError"):
        gen.generate(PROMPT, 16)  # type: ignore[arg-type]
    gen.close()


def test_server_down_at_start_is_unavailable_not_a_crash() -> None:
    with misbehaving_server(Behaviour()) as url:
        pass
    with pytest.raises(LLMUnavailableError, match="cannot be reached"):
        generator(url)


@pytest.mark.parametrize("mode", ["garbage-text", "garbage-json"])
def test_garbage_answer_is_invalid_and_not_retried(mode: str) -> None:
    behaviour = Behaviour(mode=mode)  # type: ignore[arg-type]
    with misbehaving_server(behaviour) as url:
        waits: list[float] = []
        gen = generator(url, waits=waits)
        with pytest.raises(LLMInvalidResponseError, match="not a chat completion|no choices|no usable"):
            gen.generate(PROMPT, 16)  # type: ignore[arg-type]
        assert waits == []
        gen.close()


def test_rejected_request_is_invalid_and_not_retried() -> None:
    with misbehaving_server(Behaviour(mode="status", status=400)) as url:
        gen = generator(url, waits=(waits := []))
        with pytest.raises(LLMInvalidResponseError, match="HTTP 400"):
            gen.generate(PROMPT, 16)  # type: ignore[arg-type]
        assert waits == []
        gen.close()


def test_server_without_a_tokenizer_needs_a_local_one() -> None:
    server_threads_before = threading.active_count()
    with misbehaving_server(Behaviour()) as url:
        with pytest.raises(LLMNotFoundError, match="MEDBRIDGE_LLM_TOKENIZER"):
            OpenAICompatibleGenerator(base_url=url.replace("/v1", "/nothing/v1"), model="stub")
    assert threading.active_count() <= server_threads_before + 1
