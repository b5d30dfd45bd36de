"""The shared batcher on the demo bundle's real network: one forward serves the images of several studies, each
gets what it would get alone, a forward that fails fails every study in it (and only those) without hanging."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.imaging.batching import SharedBatcher
from inference.imaging.bundle import load_bundle
from inference.imaging.operator import BundleOperator

_POISON = -7.0  # an input filled with this makes the network's forward raise


@pytest.fixture(scope="module")
def operator(trained_model: tuple[Path, dict[str, Any]]) -> Iterator[BundleOperator]:
    """The demo bundle loaded afresh (its network gets hooks the session's one must not have), batches of 4;
    counts its forwards in ``forwards`` and raises in the forward of a batch holding a poisoned input."""
    op = BundleOperator(load_bundle(trained_model[0], "cpu"), batch_size=4)
    op.forwards = 0  # type: ignore[attr-defined]

    def count_and_poison(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        op.forwards += 1  # type: ignore[attr-defined]
        if (args[0] == _POISON).flatten(1).all(dim=1).any():
            raise RuntimeError("the network refused a poisoned input")

    handle = op.bundle.network.register_forward_pre_hook(count_and_poison)
    yield op
    handle.remove()


def _inputs(op: BundleOperator, count: int, seed: int) -> list[torch.Tensor]:
    shape = (op.bundle.in_channels, *op.bundle.spatial_shape)
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator) for _ in range(count)]


def _studies_at_once(batcher: SharedBatcher, op: BundleOperator, studies: list[list[torch.Tensor]]) -> list[Any]:
    """Each study on a thread of its own, all in flight before any submits; each one's result or exception."""
    ready = threading.Barrier(len(studies))

    def study(inputs: list[torch.Tensor]) -> Any:
        with batcher.study():
            ready.wait(timeout=10)
            try:
                return batcher.classify(op, inputs)
            except RuntimeError as exc:
                return exc

    with ThreadPoolExecutor(len(studies)) as pool:
        return list(pool.map(study, studies, timeout=30))


def _assert_same(got: list[dict[str, float]], alone: list[dict[str, float]]) -> None:
    assert [list(p) for p in got] == [list(p) for p in alone]  # same images in the same order, same findings
    assert torch.allclose(torch.tensor([list(p.values()) for p in got]),
                          torch.tensor([list(p.values()) for p in alone]), atol=1e-5)


def test_one_forward_serves_the_images_of_every_study_waiting_and_each_gets_what_it_would_alone(
    operator: BundleOperator,
) -> None:
    studies = [_inputs(operator, 1, seed=1), _inputs(operator, 2, seed=2), _inputs(operator, 1, seed=3)]
    alone = [operator.classify_inputs(inputs) for inputs in studies]
    # a wait far longer than the test: the forward runs because every study in flight waits, not on a timer
    batcher = SharedBatcher(max_wait_seconds=30)
    operator.forwards = 0  # type: ignore[attr-defined]
    began = time.monotonic()
    results = _studies_at_once(batcher, operator, studies)
    assert time.monotonic() - began < 10
    assert operator.forwards == batcher.forwards == 1  # type: ignore[attr-defined]
    for got, expected in zip(results, alone, strict=True):
        _assert_same(got, expected)

    # 3 studies of 3 images, batches of 4: full batches split studies across forwards, 9 images in 3 forwards
    studies = [_inputs(operator, 3, seed=10 + i) for i in range(3)]
    alone = [operator.classify_inputs(inputs) for inputs in studies]
    operator.forwards = 0  # type: ignore[attr-defined]
    results = _studies_at_once(batcher, operator, studies)
    assert operator.forwards == 3  # type: ignore[attr-defined]
    for got, expected in zip(results, alone, strict=True):
        _assert_same(got, expected)


def test_images_wait_at_most_the_max_wait_for_a_study_in_flight_that_adds_none(operator: BundleOperator) -> None:
    batcher = SharedBatcher(max_wait_seconds=0.05)
    inputs = _inputs(operator, 2, seed=4)
    with batcher.study():  # a study in flight, busy elsewhere (decoding, explaining)
        with batcher.study():
            began = time.monotonic()
            got = batcher.classify(operator, inputs)
            waited = time.monotonic() - began
    assert 0.05 <= waited < 5
    _assert_same(got, operator.classify_inputs(inputs))


def test_a_failing_forward_fails_every_study_in_it_and_the_next_ones_are_served(operator: BundleOperator) -> None:
    batcher = SharedBatcher(max_wait_seconds=30)
    poisoned = [torch.full_like(_inputs(operator, 1, seed=5)[0], _POISON)]
    results = _studies_at_once(batcher, operator, [_inputs(operator, 1, seed=6), poisoned, _inputs(operator, 2, 7)])
    assert [type(r) for r in results] == [RuntimeError] * 3  # one batch: each study gets the error, none hangs
    assert all("poisoned input" in str(r) for r in results)
    assert len({id(r) for r in results}) == 3  # an exception object per study's thread

    # a study split across a failing forward and a later one fails once; nothing of it is left queued
    operator.forwards = 0  # type: ignore[attr-defined]
    studies = [[*_inputs(operator, 3, seed=8), *poisoned, *_inputs(operator, 3, seed=9)], _inputs(operator, 1, 11)]
    results = _studies_at_once(batcher, operator, studies)
    assert isinstance(results[0], RuntimeError)
    assert operator.forwards == 2  # type: ignore[attr-defined]
    _assert_same(results[1], operator.classify_inputs(studies[1]))  # the study that shared a healthy forward

    healthy = [_inputs(operator, 2, seed=12), _inputs(operator, 1, seed=13)]
    for got, inputs in zip(_studies_at_once(batcher, operator, healthy), healthy, strict=True):
        _assert_same(got, operator.classify_inputs(inputs))
