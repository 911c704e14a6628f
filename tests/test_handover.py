"""translator.handover: when the decoding thread's wake-ups of the event loop are made."""

import threading

from translator import handover


def test_a_thread_that_does_not_defer_wakes_at_once():
    made = []
    handover.wake(lambda: made.append(1))
    assert made == [1]


def test_held_wake_ups_are_made_in_order_at_the_next_release():
    made = []
    with handover.deferring():
        handover.wake(lambda: made.append("a"))
        handover.wake(lambda: made.append("b"))
        assert made == []
        handover.release()
        assert made == ["a", "b"]
        handover.release()
        assert made == ["a", "b"]


def test_a_wake_up_is_held_through_at_most_one_whole_step():
    made = []
    with handover.deferring():
        handover.wake(lambda: made.append("first"))  # during step 1, after its native call
        handover.step_done()  # end of step 1: the next step may still release it
        assert made == []
        handover.wake(lambda: made.append("second"))  # during step 2, which released nothing
        handover.step_done()  # end of step 2: "first" was held through a whole step
        assert made == ["first"]
        handover.step_done()
        assert made == ["first", "second"]


def test_wake_ups_still_held_when_deferring_ends_are_made_then():
    made = []
    with handover.deferring():
        handover.wake(lambda: made.append(1))
        with handover.deferring():  # nested: the outer block still holds
            handover.wake(lambda: made.append(2))
        assert made == []
    assert made == [1, 2]
    handover.wake(lambda: made.append(3))  # deferring has ended: at once again
    assert made == [1, 2, 3]


def test_deferring_is_per_thread():
    made = []
    with handover.deferring():
        other = threading.Thread(target=lambda: handover.wake(lambda: made.append("other")))
        other.start()
        other.join()
        assert made == ["other"]  # the other thread does not defer
        handover.wake(lambda: made.append("mine"))
        assert made == ["other"]
    assert made == ["other", "mine"]
