"""A worker's EXCHANGE routing: what comes before the trainer asks is kept for it,
handlers answer later steps, older rounds are forgotten, and waiting ends."""

from __future__ import annotations

import threading

import pytest

from elastic.errors import ElasticError
from elastic.wire.header import Message, MsgType
from elastic.worker.exchanges import Exchanges


def exchange(number: int, stage: str, data: dict) -> Message:
    return Message(MsgType.EXCHANGE, job="j", round=number, meta={"stage": stage, "data": data})


def work(number: int) -> Message:
    return Message(MsgType.WORK, job="j", round=number, meta={})


def test_a_step_that_comes_early_waits_for_the_trainer() -> None:
    sent: list[Message] = []
    exchanges = Exchanges(sent.append, threading.Event())
    assert exchanges.deliver(exchange(3, "roster", {"a": 1})) is None
    channel = exchanges.channel("w0", work(3))
    assert channel.receive("roster", 1.0) == {"a": 1}
    channel.send("keys", {"k": b"x"})
    assert sent[0].type is MsgType.EXCHANGE and sent[0].meta == {
        "stage": "keys",
        "data": {"k": b"x"},
    }
    assert sent[0].round == 3 and sent[0].sender == "w0"


def test_a_handler_answers_later_steps_and_a_new_round_forgets_the_old() -> None:
    exchanges = Exchanges(lambda m: None, threading.Event())
    channel = exchanges.channel("w0", work(1))
    channel.answer("unmask", lambda data: {"b": data["n"] + 1})
    reply = exchanges.deliver(exchange(1, "unmask", {"n": 1}))
    assert reply is not None and reply.meta == {"stage": "unmask", "data": {"b": 2}}
    exchanges.channel("w0", work(2))
    assert exchanges.deliver(exchange(1, "unmask", {"n": 1})) is None  # round 1 is over here
    assert exchanges.deliver(exchange(2, "unmask", {"n": 1})) is None  # no handler: queued


def test_a_failing_handler_answers_nothing() -> None:
    exchanges = Exchanges(lambda m: None, threading.Event())
    channel = exchanges.channel("w0", work(1))
    channel.answer("unmask", lambda data: {"b": data["missing"]})
    assert exchanges.deliver(exchange(1, "unmask", {})) is None


def test_waiting_ends_at_the_timeout_or_when_the_worker_stops() -> None:
    stop = threading.Event()
    exchanges = Exchanges(lambda m: None, stop)
    channel = exchanges.channel("w0", work(1))
    with pytest.raises(ElasticError, match="nothing came at stage 'roster'"):
        channel.receive("roster", 0.2)
    stop.set()
    with pytest.raises(ElasticError, match="stopping"):
        channel.receive("roster", 5.0)
