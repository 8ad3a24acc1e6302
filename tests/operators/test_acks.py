"""match_acks: FIFO pairing per connection, Unacked on disconnect, unexpected responses."""

from __future__ import annotations

from typing import Any

from reactivex.subject import Subject
from reactivex.testing.marbles import marbles_testing

from operators import Acked, AckEvent, Unacked, UnexpectedResponse, match_acks

CONNECTED = {"t": True, "f": False}


def test_simple_pairing() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        sent = hot("-a-b-c---|")
        responses = hot("--1---2-3-|")
        connected = hot("-t--------", CONNECTED)
        expected = exp("--A---B-C-|", {"A": Acked("a", 1), "B": Acked("b", 2), "C": Acked("c", 3)})
        assert start(match_acks(sent, responses, connected)) == expected


def test_docstring_diagram() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        sent = hot("-a-b-----c---")
        responses = hot("---1---------2--3-")
        connected = hot("-------f------", CONNECTED)
        lookup = {"A": Acked("a", 1), "U": Unacked(("b",)), "B": Acked("c", 2), "X": UnexpectedResponse(3)}
        assert start(match_acks(sent, responses, connected)) == exp("---A---U-----B--X-", lookup)


def test_matching_across_two_disconnects_with_interleaving() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        # connection 1: a b c sent, 1 answers a; drop -> Unacked(b, c)
        # connection 2: b c resent (as B C), d sent; 2 answers B; drop -> Unacked(C, d)
        # connection 3: C d resent; 3, 4 answer them; 5 is unexpected
        connected = hot("-t------f-t-----------f-t-----------|", CONNECTED)
        sent = hot("--a-b-c-----B-C--d--------C-d------|")
        responses = hot("---1----------------2-------3-4-5----|")
        lookup = {
            "p": Acked("a", 1),
            "u": Unacked(("b", "c")),
            "q": Acked("B", 2),
            "v": Unacked(("C", "d")),
            "r": Acked("C", 3),
            "s": Acked("d", 4),
            "x": UnexpectedResponse(5),
        }
        expected = exp("---p----u-----------q-v-----r-s-x----|", lookup)
        assert start(match_acks(sent, responses, connected)) == expected


def run_direct() -> tuple[Subject[str], Subject[int], Subject[bool], list[Any], list[Any]]:
    sent: Subject[str] = Subject()
    responses: Subject[int] = Subject()
    connected: Subject[bool] = Subject()
    events: list[AckEvent[str, int]] = []
    terminal: list[Any] = []
    match_acks(sent, responses, connected).subscribe(
        events.append, terminal.append, lambda: terminal.append("completed")
    )
    return sent, responses, connected, events, terminal


def test_unacked_keeps_the_original_order_and_is_emitted_once() -> None:
    sent, responses, connected, events, _ = run_direct()
    connected.on_next(True)
    for item in "abcde":
        sent.on_next(item)
    responses.on_next(1)
    connected.on_next(False)
    connected.on_next(False)  # nothing in flight any more: no second (empty) Unacked
    assert events == [Acked("a", 1), Unacked(("b", "c", "d", "e"))]


def test_unexpected_response_with_nothing_in_flight() -> None:
    sent, responses, connected, events, _ = run_direct()
    connected.on_next(True)
    responses.on_next(7)
    sent.on_next("a")
    responses.on_next(8)
    responses.on_next(9)
    assert events == [UnexpectedResponse(7), Acked("a", 8), UnexpectedResponse(9)]


def test_resend_from_inside_on_next_belongs_to_the_next_connection() -> None:
    sent: Subject[str] = Subject()
    responses: Subject[int] = Subject()
    connected: Subject[bool] = Subject()
    events: list[AckEvent[str, int]] = []

    def on_event(event: AckEvent[str, int]) -> None:
        events.append(event)
        if isinstance(event, Unacked):
            for item in event.items:  # the caller resends synchronously
                sent.on_next(item)

    match_acks(sent, responses, connected).subscribe(on_event)
    connected.on_next(True)
    sent.on_next("a")
    sent.on_next("b")
    connected.on_next(False)
    connected.on_next(True)
    responses.on_next(1)
    responses.on_next(2)
    assert events == [Unacked(("a", "b")), Acked("a", 1), Acked("b", 2)]


def test_completion_when_sent_and_responses_complete_flushes_in_flight() -> None:
    sent, responses, connected, events, terminal = run_direct()
    connected.on_next(True)
    sent.on_next("a")
    sent.on_completed()
    assert terminal == []
    responses.on_completed()  # `connected` never completes: not needed
    assert events == [Unacked(("a",))]
    assert terminal == ["completed"]


def test_errors_are_forwarded() -> None:
    for failing in range(3):
        subjects = run_direct()
        err = RuntimeError(f"input {failing} failed")
        subjects[failing].on_error(err)
        assert subjects[4] == [err]
