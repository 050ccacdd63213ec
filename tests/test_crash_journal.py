"""The crash journal's rules (operators/crash_journal.py): which item a dead attempt blames, and when;
the watchdog that stops a process whose item hangs."""

import time

import ray

from operators.crash_journal import (CRASH_ERROR_TYPE, FRUITLESS_DEATHS, TIMEOUT_ERROR_TYPE, CrashJournal, TaskGuard,
                                     batch_key, crash_message, current_task_id, retries_needed, start_journal)


def test_a_first_attempt_names_nothing_and_blames_nothing():
    journal = CrashJournal()
    assert journal.begin("t") == (0, {}, 0)
    # The first attempt died (it named no item): the retry is careful, and skips nothing yet.
    assert journal.begin("t") == (1, {}, 0)


def test_the_item_a_careful_attempt_died_on_is_skipped_by_the_next():
    journal = CrashJournal()
    journal.begin("t")
    journal.begin("t")  # attempt 1, careful
    journal.enter("t", "a")
    journal.leave("t", "a")
    journal.enter("t", "b")  # ... and it died here
    assert journal.begin("t") == (2, {"b": "crashed"}, 0)
    journal.enter("t", "c")  # attempt 2 died on another item: both are skipped from then on
    assert journal.begin("t") == (3, {"b": "crashed", "c": "crashed"}, 0)
    assert journal.begin("t") == (4, {"b": "crashed", "c": "crashed"}, 1)  # died outside any item: fruitless


def test_an_item_that_ran_past_its_limit_is_skipped_at_once():
    journal = CrashJournal()
    journal.begin("t")
    journal.timed_out("t", "slow", 2.5)  # a first attempt's watchdog names the item itself
    assert journal.begin("t") == (1, {"slow": "timeout:2.5"}, 0)


def test_careful_attempts_dying_on_no_item_leave_out_every_item_left():
    """However many items crash their worker, each death names one and the task goes on; deaths that name
    none (out of memory between items, a lost node) are bounded: then every unread item is a dead letter."""
    journal = CrashJournal()
    journal.begin("t")  # died: a first attempt names nothing, which is no fault
    for i in range(10):  # ten bad items, one death each: all progress
        journal.enter("t", f"bad{i}")
        attempt, skipped, fruitless = journal.begin("t")
        assert (len(skipped), fruitless) == (i + 1, 0)
    for n in range(1, FRUITLESS_DEATHS + 1):  # careful attempts that died reading nothing
        attempt, skipped, fruitless = journal.begin("t")
        assert fruitless == n
    assert attempt == 10 + FRUITLESS_DEATHS
    deaths = attempt  # the attempts so far (the one now succeeds)
    restarted = CrashJournal()  # ... unless the journal restarted first, forgetting it all
    restarted.begin("t")
    for i in range(10):
        restarted.enter("t", f"bad{i}")
        restarted.begin("t")
    for _ in range(FRUITLESS_DEATHS):
        attempt, _, fruitless = restarted.begin("t")
    assert fruitless == FRUITLESS_DEATHS
    assert deaths + 1 + attempt <= retries_needed(10)  # the pool's retry budget covers even that
    guard = TaskGuard.__new__(TaskGuard)  # the journal's answer as a guard sees it
    guard.skipped, guard.fruitless, guard.setting, guard.give_up = skipped, fruitless, None, True
    assert guard.skip("bad3") and guard.skip("never read")
    error_type, message = guard.letter("never read", "embedding")
    assert error_type == CRASH_ERROR_TYPE and "reading no item" in message and "re-run" in message
    assert guard.letter("bad3", "embedding")[1] == crash_message("embedding")
    # An expansion task never gives up: Ray keeps the rows an attempt passed on, and the retry must
    # make the same rows up to there (a dead letter in place of a unit already passed on loses rows).
    guard.give_up = False
    assert guard.skip("bad3") and not guard.skip("never read")


def test_tasks_are_kept_apart_and_forgotten_when_they_end():
    journal = CrashJournal()
    journal.begin("t")
    journal.begin("u")
    journal.begin("u")
    journal.enter("u", "x")
    assert journal.begin("t") == (1, {}, 0)
    journal.end("u")
    assert journal.begin("u") == (0, {}, 0)
    assert journal.tasks() == 2


def test_batch_keys_depend_on_the_items_and_their_order():
    assert batch_key(["a", "b"]) == batch_key(["a", "b"])
    assert batch_key(["a", "b"]) != batch_key(["b", "a"])
    assert batch_key(["ab"]) != batch_key(["a", "b"])


def test_a_guard_names_items_only_after_a_crash(ray_local):
    journal = start_journal()
    try:
        first = TaskGuard(journal, "task")
        assert not first.careful
        with first.reading("a"):  # not named: a first attempt costs one call in all
            pass
        assert ray.get(journal.begin.remote("task")) == (1, {}, 0)

        careful = TaskGuard(journal, "task")  # attempt 2
        assert careful.careful and not careful.skip("a")
        with careful.reading("a"):
            pass
        ray.get(journal.enter.remote("task", "b"))  # as a careful attempt that dies reading "b" leaves it
        after = TaskGuard(journal, "task")
        assert after.skip("b") and not after.skip("a")
        assert after.letter("b", "reading")[0] == CRASH_ERROR_TYPE
        after.end()
        assert ray.get(journal.tasks.remote()) == 0
    finally:
        ray.kill(journal)


def test_an_exception_while_reading_is_not_a_crash(ray_local):
    journal = start_journal()
    try:
        ray.get(journal.begin.remote("task"))
        guard = TaskGuard(journal, "task")  # careful
        try:
            with guard.reading("a"):
                raise ValueError("a Python error, caught by the caller")
        except ValueError:
            pass
        assert ray.get(journal.begin.remote("task")) == (2, {}, 1)  # died on no item
    finally:
        ray.kill(journal)


@ray.remote(max_retries=1)
def _hanging_task(journal):
    guard = TaskGuard(journal, current_task_id(), limit_s=1.0, setting="limits.example_s")
    if guard.skip("slow"):
        return guard.letter("slow", "reading")
    with guard.reading("slow"):
        time.sleep(120)  # stands in for a decoder that never returns
    return "finished"


def test_the_watchdog_stops_a_hung_process_and_the_retry_skips_its_item(ray_local):
    journal = start_journal()
    try:
        started = time.monotonic()
        error_type, message = ray.get(_hanging_task.remote(journal), timeout=90)
        assert error_type == TIMEOUT_ERROR_TYPE
        assert message.startswith("reading it took longer than limits.example_s=1 s (a hung decoder?)")
        assert time.monotonic() - started < 60
    finally:
        ray.kill(journal)
