"""agent.mqtt_acks: which packet ids the link may still acknowledge, across reconnects (pure)."""

from __future__ import annotations

from agent.mqtt_acks import AckBook


def test_an_ack_is_sent_once_and_only_in_its_session() -> None:
    book = AckBook()
    book.on_connect(session_present=False)
    assert book.admit(5, dup=False)
    token = book.token(5, 1)
    assert book.release(token, connected=True) is True
    assert book.release(token, connected=True) is False  # acked already
    assert book.admit(5, dup=False)                      # the broker reused the id: a new message
    old = book.token(5, 1)
    book.on_connect(session_present=False)              # the session is gone: its ids mean nothing
    assert book.release(old, connected=True) is False
    assert book.pending == 0


def test_a_redelivery_of_a_held_message_is_not_handed_over_again() -> None:
    book = AckBook()
    book.on_connect(session_present=False)
    assert book.admit(7, dup=False)
    assert book.on_connect(session_present=True) == []
    assert book.admit(7, dup=True) is False   # still held by its owner
    assert book.release(book.token(7, 1), connected=True) is True


def test_an_ack_given_offline_goes_out_after_the_next_connack_and_its_redelivery_is_dropped() -> None:
    book = AckBook()
    book.on_connect(session_present=False)
    assert book.admit(9, dup=False)
    token = book.token(9, 1)
    assert book.release(token, connected=False) is False  # not now: offline
    assert book.on_connect(session_present=True) == [9]   # sent right after the CONNACK
    assert book.admit(9, dup=True) is False               # the redelivery already on its way
    assert book.admit(9, dup=False) is True               # after that the id is the broker's again


def test_an_offline_ack_is_forgotten_when_the_session_was_lost() -> None:
    book = AckBook()
    book.on_connect(session_present=False)
    assert book.admit(3, dup=False)
    book.release(book.token(3, 1), connected=False)
    assert book.on_connect(session_present=False) == []
    assert book.admit(3, dup=True) is True  # a new session: whatever comes is new to us
