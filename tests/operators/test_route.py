"""route_frames: decode and route in one step; garbage and unroutable frames become Malformed items."""

from __future__ import annotations

import gc
import json
import weakref
from typing import Any

import pytest
from reactivex import Observable, abc, defer, merge, of, throw
from reactivex import operators as ops
from reactivex.disposable import CompositeDisposable
from reactivex.subject import Subject
from reactivex.testing import ReactiveTest, TestScheduler
from reactivex.testing.marbles import marbles_testing

from operators import Decoded, Malformed, Routed, route_frames

on_next = ReactiveTest.on_next
on_completed = ReactiveTest.on_completed
on_error = ReactiveTest.on_error
subscribe = ReactiveTest.subscribe

Message = dict[str, Any]
FRAMES: dict[str, str | bytes] = {
    "p": '{"t": "a", "n": 1}', "q": '{"t": "b", "n": 2}', "r": b'{"t": "a", "n": 3}', "x": "{not json"
}


def decode(frame: str | bytes) -> Message:
    value = json.loads(frame)
    if not isinstance(value, dict):
        raise TypeError(f"not an object: {value!r}")
    return value


def key_of(message: Message) -> Any:
    return message["t"]


def route(source: Observable[str | bytes], keys: list[str], **kwargs: Any) -> Routed[Any, Message]:
    return route_frames(source, decode, key_of, keys, malformed="malformed", **kwargs)


def summary(item: Decoded[Message] | Malformed) -> tuple[Any, ...]:
    if isinstance(item, Decoded):
        return ("ok", item.message["n"], item.frame)
    return ("bad", item.frame, type(item.error).__name__, str(item.error))


def tagged(routed: Routed[Any, Message], *message_keys: str) -> Observable[tuple[Any, ...]]:
    """Every branch (items summarised) and ``messages[k]`` for ``message_keys``, merged and tagged;
    connects once subscribed, with the subscriber's scheduler."""
    streams = [branch.pipe(ops.map(lambda x, k=key: (k, *summary(x)))) for key, branch in routed.branches.items()]
    streams += [routed.messages[key].pipe(ops.map(lambda m, k=key: ("message", k, m["n"]))) for key in message_keys]
    merged = merge(*streams)

    def subscribe_(observer: abc.ObserverBase[tuple[Any, ...]], scheduler: abc.SchedulerBase | None = None):
        subscription = merged.subscribe(observer, scheduler=scheduler)
        return CompositeDisposable(subscription, routed.connect(scheduler))

    return Observable(subscribe_)


def test_routing_docstring_diagram() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        routed = route(hot("-p-q-x-r-|", FRAMES), ["a", "b"])
        assert list(routed.branches) == ["a", "b", "malformed"]
        expected = exp(
            "-(P,m)-Q-X-(R,n)-|",
            {
                "P": ("a", "ok", 1, FRAMES["p"]),
                "m": ("message", "a", 1),
                "Q": ("b", "ok", 2, FRAMES["q"]),
                "X": ("malformed", "bad", "{not json", "JSONDecodeError", "Expecting property name enclosed in "
                      "double quotes: line 1 column 2 (char 1)"),
                "R": ("a", "ok", 3, FRAMES["r"]),
                "n": ("message", "a", 3),
            },
        )
        # (P,1) and (R,3) are groups at the frame's tick; a group's width shifts what follows: re-time.
        assert start(tagged(routed, "a")) == _at_ticks(expected, [1, 1, 3, 5, 7, 7, 9])


def _at_ticks(messages: list[Any], ticks: list[int]) -> list[Any]:
    """``messages`` re-timed to ``ticks`` (marble groups take up columns of their own)."""
    assert len(messages) == len(ticks)
    return [type(m)(200.0 + tick, m.value) for m, tick in zip(messages, ticks, strict=True)]


def test_messages_carry_the_decoded_message_itself() -> None:
    source: Subject[str | bytes] = Subject()
    routed = route(source, ["a", "b"])
    got: list[Message] = []
    routed.messages["a"].subscribe(got.append)
    routed.connect()
    source.on_next(FRAMES["p"])
    source.on_next(FRAMES["q"])
    assert got == [{"t": "a", "n": 1}]


def test_decoded_items_and_messages_share_one_decoded_message_and_key() -> None:
    decoded: list[str | bytes] = []
    keyed: list[Message] = []

    def counting_decode(frame: str | bytes) -> Message:
        decoded.append(frame)
        return decode(frame)

    def counting_key_of(message: Message) -> Any:
        keyed.append(message)
        return message["t"]

    source: Subject[str | bytes] = Subject()
    routed = route_frames(source, counting_decode, counting_key_of, ["a"], malformed="malformed")
    items: list[Any] = []
    for _ in range(2):
        routed["a"].subscribe(items.append)
        routed.messages["a"].subscribe(items.append)
    routed.connect()
    source.on_next(FRAMES["p"])
    assert decoded == [FRAMES["p"]] and len(keyed) == 1
    first, message, second, message_again = items
    assert first is second  # one Decoded per frame, whoever wants it
    assert first == Decoded({"t": "a", "n": 1}, FRAMES["p"])
    assert message is message_again is first.message is keyed[0]


def test_subscribers_are_called_in_subscription_order_whichever_form_they_take() -> None:
    source: Subject[str | bytes] = Subject()
    routed = route(source, ["a"])
    calls: list[str] = []
    routed["a"].subscribe(lambda _: calls.append("item 1"))
    routed.messages["a"].subscribe(lambda _: calls.append("message 1"))
    routed["a"].subscribe(lambda _: calls.append("item 2"))
    routed.connect()
    source.on_next(FRAMES["p"])
    assert calls == ["item 1", "message 1", "item 2"]


def test_default_branch_gets_unknown_keys() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        routed = route(hot("-p-q-r-|", FRAMES), ["a"], default="other")
        assert list(routed.branches) == ["a", "other", "malformed"]
        lookup = {"p": ("a", "ok", 1, FRAMES["p"]), "q": ("other", "ok", 2, FRAMES["q"]),
                  "r": ("a", "ok", 3, FRAMES["r"])}
        assert start(tagged(routed)) == exp("-p-q-r-|", lookup)


def test_unknown_key_without_default_is_a_malformed_frame_and_the_stream_goes_on() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        routed = route(hot("-p-q-r-|", FRAMES), ["a"])
        error = "route_frames: key 'b' is not one of ['a', 'malformed'] and there is no default branch"
        lookup = {"p": ("a", "ok", 1, FRAMES["p"]), "q": ("malformed", "bad", FRAMES["q"], "ValueError", error),
                  "r": ("a", "ok", 3, FRAMES["r"])}
        assert start(tagged(routed)) == exp("-p-q-r-|", lookup)


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ("[1, 2]", "TypeError('not an object: [1, 2]')"),  # decode raises
        ('{"n": 4}', "KeyError('t')"),  # key_of raises
        ('{"t": ["a"], "n": 5}', "TypeError(\"unhashable type: 'list'\")"),  # the key is unhashable
    ],
)
def test_a_frame_that_fails_to_decode_or_to_key_is_malformed_with_its_error(frame: str, error: str) -> None:
    source: Subject[str | bytes] = Subject()
    routed = route(source, ["a"])
    items: list[Any] = []
    messages: list[Any] = []
    routed["malformed"].subscribe(items.append)
    routed.messages["malformed"].subscribe(messages.append)  # a malformed frame has no message
    routed["a"].subscribe(items.append)
    routed.connect()
    source.on_next(frame)
    source.on_next(FRAMES["p"])
    assert [type(item) for item in items] == [Malformed, Decoded]
    assert items[0].frame == frame and repr(items[0].error) == error
    assert messages == []


def test_decode_error_is_the_very_exception_raised() -> None:
    boom = ValueError("boom")

    def failing(frame: str | bytes) -> Message:
        raise boom

    with marbles_testing(timespan=1.0) as (start, cold, _hot, exp):
        routed = route_frames(cold("-a-|"), failing, key_of, ["a"], malformed="bad")
        assert list(routed.branches) == ["a", "bad"]
        result = start(tagged(routed))
        assert result == exp("-m-|", {"m": ("bad", "bad", "a", "ValueError", "boom")})
    malformed: list[Malformed] = []
    routed = route_frames(of("a"), failing, key_of, ["a"], malformed="bad")
    routed["bad"].subscribe(malformed.append)
    routed.connect()
    assert malformed == [Malformed("a", boom)] and malformed[0].error is boom


def test_a_message_keyed_like_the_malformed_branch_reaches_its_message_subscribers() -> None:
    source: Subject[str | bytes] = Subject()
    routed = route(source, ["a"])
    items: list[Any] = []
    messages: list[Any] = []
    routed["malformed"].subscribe(items.append)
    routed.messages["malformed"].subscribe(messages.append)
    routed.connect()
    source.on_next('{"t": "malformed", "n": 6}')
    source.on_next("garbage")
    assert messages == [{"t": "malformed", "n": 6}]
    assert items[0] == Decoded({"t": "malformed", "n": 6}, '{"t": "malformed", "n": 6}')
    assert isinstance(items[1], Malformed) and items[1].frame == "garbage"


def test_a_raising_subscriber_propagates_to_the_source_and_is_no_malformed_frame() -> None:
    source: Subject[str | bytes] = Subject()
    routed = route(source, ["a"])
    malformed: list[Any] = []
    routed["malformed"].subscribe(malformed.append)

    def raising(_: Any) -> None:
        raise RuntimeError("subscriber bug")

    routed.messages["a"].subscribe(raising)
    routed.connect()
    with pytest.raises(RuntimeError, match="subscriber bug"):
        source.on_next(FRAMES["p"])
    assert malformed == []


def test_completion_reaches_every_branch_and_every_message_subscriber() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_hot_observable(on_next(210, FRAMES["p"]), on_completed(220))
    routed = route(source, ["a", "b"])
    observers = {key: scheduler.create_observer() for key in routed.branches}
    for key, observer in observers.items():
        routed[key].subscribe(observer)
    message_observers = {key: scheduler.create_observer() for key in routed.messages}
    for key, observer in message_observers.items():
        routed.messages[key].subscribe(observer)
    scheduler.schedule_absolute(200, lambda *_: routed.connect())
    scheduler.start()
    assert observers["a"].messages == [on_next(210, Decoded({"t": "a", "n": 1}, FRAMES["p"])), on_completed(220)]
    assert observers["b"].messages == [on_completed(220)]
    assert observers["malformed"].messages == [on_completed(220)]
    assert message_observers["a"].messages == [on_next(210, {"t": "a", "n": 1}), on_completed(220)]
    assert message_observers["b"].messages == [on_completed(220)]
    assert message_observers["malformed"].messages == [on_completed(220)]


def test_an_error_reaches_every_branch_and_every_message_subscriber() -> None:
    err = ConnectionError("socket closed")
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        routed = route(hot("-p-q-#", FRAMES, err), ["a", "b"])
        lookup = {"p": ("a", "ok", 1, FRAMES["p"]), "m": ("message", "a", 1), "q": ("b", "ok", 2, FRAMES["q"])}
        result = start(tagged(routed, "a"))
        assert result == _at_ticks(exp("-(p,m)-q-#", lookup, err), [1, 1, 3, 5])

    source: Subject[str | bytes] = Subject()
    routed = route(source, ["a"])
    errors: list[Exception] = []
    for key in routed.branches:
        routed[key].subscribe(on_error=errors.append)
        routed.messages[key].subscribe(on_error=errors.append)
    routed.connect()
    source.on_error(err)
    assert errors == [err] * 4


LATE_ERROR = ConnectionError("socket closed")


@pytest.mark.parametrize(
    ("source", "ending"), [(of(FRAMES["p"]), "completed"), (throw(LATE_ERROR), ("error", LATE_ERROR))]
)
def test_a_late_subscriber_learns_how_the_source_ended(source: Observable[str], ending: Any) -> None:
    routed = route(source, ["a"])
    routed.connect()
    endings: list[Any] = []
    for observable in (routed["a"], routed.messages["malformed"]):
        observable.subscribe(
            endings.append, lambda e: endings.append(("error", e)), lambda: endings.append("completed")
        )
    assert endings == [ending, ending]


def test_a_subscriber_sees_the_items_after_it_subscribed_until_it_unsubscribes() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_hot_observable(
        on_next(210, FRAMES["p"]), on_next(220, FRAMES["r"]), on_next(230, FRAMES["p"]), on_completed(240)
    )
    routed = route(source, ["a"])
    early = scheduler.create_observer()
    late = scheduler.create_observer()
    stays = scheduler.create_observer()
    subscriptions = [routed.messages["a"].subscribe(early), routed.messages["a"].subscribe(stays)]
    scheduler.schedule_absolute(200, lambda *_: routed.connect())
    scheduler.schedule_absolute(215, lambda *_: subscriptions.append(routed.messages["a"].subscribe(late)))
    scheduler.schedule_absolute(225, lambda *_: subscriptions[0].dispose())
    scheduler.start()
    one, three = {"t": "a", "n": 1}, {"t": "a", "n": 3}
    assert early.messages == [on_next(210, one), on_next(220, three)]
    assert late.messages == [on_next(220, three), on_next(230, one), on_completed(240)]
    assert stays.messages == [on_next(210, one), on_next(220, three), on_next(230, one), on_completed(240)]


def test_a_subscriber_disposed_by_another_during_an_emission_gets_nothing_more() -> None:
    source: Subject[str | bytes] = Subject()
    routed = route(source, ["a"])
    got: list[str] = []
    second: list[abc.DisposableBase] = []

    def first(_: Any) -> None:
        got.append("first")
        second[0].dispose()

    routed.messages["a"].subscribe(first)
    second.append(routed.messages["a"].subscribe(lambda _: got.append("second")))
    routed.connect()
    source.on_next(FRAMES["p"])
    source.on_next(FRAMES["p"])
    assert got == ["first", "first"]  # skipped at once, the current item included (its observer is detached)


def test_a_disposed_subscription_is_released_by_its_branch() -> None:
    class Sink:
        def __init__(self) -> None:
            self.items: list[Any] = []

        def on_next(self, item: Any) -> None:
            self.items.append(item)

        def on_error(self, error: Exception) -> None:
            raise error

        def on_completed(self) -> None:
            pass

    source: Subject[str | bytes] = Subject()
    routed = route(source, ["a"])
    routed.connect()
    sinks = [Sink(), Sink()]
    subscriptions = [routed.messages["a"].subscribe(sinks[0]), routed["a"].subscribe(sinks[1])]
    source.on_next(FRAMES["p"])
    assert len(sinks[0].items) == len(sinks[1].items) == 1
    refs = [weakref.ref(sinks[0]), weakref.ref(sinks[1])]
    subscriptions[0].dispose()
    subscriptions[1].dispose()
    del sinks, subscriptions
    gc.collect()
    assert [ref() for ref in refs] == [None, None]  # nothing of the subscribers kept: no leak per subscribe


def test_one_upstream_subscription_and_disposal_unsubscribes_it() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(
        on_next(10, FRAMES["p"]), on_next(20, FRAMES["q"]), on_next(60, FRAMES["r"]), on_completed(70)
    )
    routed = route(source, ["a", "b"])
    observers = [scheduler.create_observer() for _ in range(3)]
    for observer in observers:
        routed["a"].subscribe(observer)
    connection: list[abc.DisposableBase] = []
    scheduler.schedule_absolute(200, lambda *_: connection.append(routed.connect()))
    scheduler.schedule_absolute(205, lambda *_: connection.append(routed.connect()))  # no second one
    scheduler.schedule_absolute(250, lambda *_: connection[0].dispose())
    scheduler.start()
    assert source.subscriptions == [subscribe(200, 250)]
    assert connection[0] is connection[1]
    for observer in observers:  # r (at 260) and the completion came after the disposal
        assert observer.messages == [on_next(210, Decoded({"t": "a", "n": 1}, FRAMES["p"]))]


def test_connect_after_dispose_subscribes_the_source_again() -> None:
    source: Subject[str | bytes] = Subject()
    routed = route(source, ["a"])
    got: list[Message] = []
    routed.messages["a"].subscribe(got.append)
    first = routed.connect()
    assert routed.connect() is first
    assert len(source.observers) == 1
    first.dispose()
    assert not source.observers
    source.on_next(FRAMES["p"])  # nobody listens upstream: lost
    second = routed.connect()
    assert second is not first and len(source.observers) == 1
    source.on_next(FRAMES["r"])
    assert got == [{"t": "a", "n": 3}]
    first.dispose()  # disposing the old connection again does not touch the new one
    assert len(source.observers) == 1 and routed.connect() is second
    second.dispose()
    assert not source.observers


END_ERROR = ConnectionError("socket closed")


@pytest.mark.parametrize(
    ("first", "then", "ending"),
    [
        (throw(END_ERROR), of(FRAMES["p"]), ("error", END_ERROR)),
        (of(FRAMES["p"]), of(FRAMES["r"]).pipe(ops.concat(throw(END_ERROR))), "completed"),
    ],
)
def test_after_the_source_ended_a_new_connection_delivers_nothing_and_decodes_nothing(
    first: Observable[str], then: Observable[str], ending: Any
) -> None:
    runs = [first, then]
    decoded: list[str | bytes] = []

    def counting_decode(frame: str | bytes) -> Message:
        decoded.append(frame)
        return decode(frame)

    source: Observable[str | bytes] = defer(lambda _: runs.pop(0))
    routed = route_frames(source, counting_decode, key_of, ["a"], malformed="malformed")
    got: list[Any] = []
    routed["a"].subscribe(summary, lambda e: got.append(("error", e)), lambda: got.append("completed"))
    routed.connect().dispose()
    calls = list(decoded)
    routed.connect()
    assert decoded == calls  # the second connection's frames are not even decoded
    assert got == [ending]
    late: list[Any] = []
    routed.messages["a"].subscribe(
        on_error=lambda e: late.append(("error", e)), on_completed=lambda: late.append("completed")
    )
    assert late == [ending]  # the first ending is the one kept
