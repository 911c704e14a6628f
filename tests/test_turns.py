"""Turns: one step at a time across running batches, the least-served batch first."""

from __future__ import annotations

import threading
import time

from translator.turns import Turns


def test_a_lone_batch_keeps_its_turn_without_waiting():
    turns = Turns()
    start = time.monotonic()
    turns.enter("a")
    for _ in range(1000):
        turns.pause("a")
    turns.leave("a")
    assert time.monotonic() - start < 1.0


def test_the_least_served_batch_steps_next_until_it_has_caught_up():
    turns = Turns()
    ran: list[str] = []
    turns.enter("long")
    ran.append("long")

    def cheap_batch() -> None:
        turns.enter("short")
        for _ in range(5):
            ran.append("short")
            turns.pause("short")
        turns.leave("short")

    short = threading.Thread(target=cheap_batch)
    short.start()
    while "short" not in turns._waiting:  # it asked for a turn while the long step runs
        time.sleep(0.001)
    time.sleep(0.05)  # the long batch's step: 50 ms of compute
    turns.pause("long")  # waits: the short batch has used less
    ran.append("long")
    short.join(5)
    turns.leave("long")
    assert ran == ["long"] + ["short"] * 5 + ["long"]


def test_only_one_batch_holds_the_turn_at_a_time():
    turns = Turns()
    inside, most = 0, 0
    lock = threading.Lock()

    def batch(name: str) -> None:
        nonlocal inside, most
        turns.enter(name)
        for _ in range(50):
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.0005)
            with lock:
                inside -= 1
            turns.pause(name)
        turns.leave(name)

    threads = [threading.Thread(target=batch, args=(f"b{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most == 1
