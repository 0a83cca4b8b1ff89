"""The buttons under an idle warning: "Keep 1 h", "Keep 4 h" and "Stop now".

The daemon runs its idle rule against the simulator on 127.0.0.1. It sends the warning
through the real PTB stack to `FakeTelegramApi`, where the tests press the buttons.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tdbot.bot import ChatBot
from tdbot.daemon.runner import open_daemon
from tdbot.evaluation.model import IdleSample
from tdbot.notify.base import MAX_CALLBACK_DATA_BYTES
from tdbot.notify.telegram import TelegramNotifier
from tdbot.rules.schema import IdleStopRule
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.testing import make_test_market, running_simulator
from tdbot.store.db import Store
from tdbot.tensordock.models import VmStatus
from tests.fakes.telegram_api import FakeTelegramApi, SentMessage
from tests.test_bot import (
    SECRETS,
    STRANGER,
    USER,
    WAIT_SECONDS,
    Chat,
    button_data,
    settings_for,
    shown,
    until,
)

# PTB 22.8's own RetryAfter constructor reads retry_after as an int, which warns.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*retry_after.*:telegram.warnings.PTBDeprecationWarning"
)

VM_NAME = "api-server-4090"
KEEP_LABELS = ("Keep 1 h", "Keep 4 h", "Stop now")
IDLE = IdleStopRule.model_validate(
    {
        "name": "idle",
        "kind": "idle_stop",
        "every": "2m",
        "select": {"names": ["api-server-*"]},
        "window": "30m",
        "min_samples": 3,
        "max_sample_age": "10m",
        "grace_after_start": "20m",
        "warning": "15m",
    }
)


@pytest.fixture
async def api() -> AsyncIterator[FakeTelegramApi]:
    async with FakeTelegramApi(max_poll_seconds=1.0) as server:
        yield server


@pytest.fixture
def market() -> SimulatedMarket:
    market = make_test_market(balance_usd=100.0)
    market.seed_example_vms()
    return market


@pytest.fixture
async def api_url(market: SimulatedMarket) -> AsyncIterator[str]:
    async with running_simulator(market) as simulator:
        yield simulator.api_url


@asynccontextmanager
async def running_bot(
    api: FakeTelegramApi, market: SimulatedMarket, api_url: str, folder: Path, rule: IdleStopRule
) -> AsyncIterator[Chat]:
    """Open the daemon on the database in `folder` with its bot, as `tdbot run` would."""
    settings = settings_for(api, api_url, folder)
    notifier = TelegramNotifier(api.token, [USER], base_url=api.base_url)
    async with open_daemon(
        settings, SECRETS, clock=market.clock, notifier=notifier, rules=[rule]
    ) as daemon:
        assert daemon.executor is not None
        daemon.executor.verify_interval_seconds = 0.05
        await notifier.start()
        bot = ChatBot(daemon, api.token, poll_timeout_seconds=1)
        await bot.start()
        try:
            yield Chat(api, market, daemon, bot)
        finally:
            await bot.stop()
            await notifier.stop()


@pytest.fixture
async def chat(
    api: FakeTelegramApi, market: SimulatedMarket, api_url: str, tmp_path: Path
) -> AsyncIterator[Chat]:
    async with running_bot(api, market, api_url, tmp_path, IDLE) as opened:
        yield opened


async def add_quiet_samples(store: Store, vm_id: str, now: datetime, **fields: Any) -> None:
    """Store three idle samples from the last 20 minutes before `now`."""
    values: dict[str, Any] = {"gpu_util_percent": 1.0, **fields}
    for minutes_ago in (20, 12, 4):
        at = now - timedelta(minutes=minutes_ago)
        await store.add_idle_sample(IdleSample(vm_id=vm_id, at=at, **values))


async def seed_idle_vm(chat: Chat, **fields: Any) -> str:
    """Make the VM look idle: running for 2 h, with quiet samples; return its id."""
    vm_id = chat.vm_id(VM_NAME)
    now = chat.market.now()
    await chat.daemon.store.set_running_since(IDLE.name, vm_id, now - timedelta(hours=2))
    await add_quiet_samples(chat.daemon.store, vm_id, now, **fields)
    return vm_id


async def tick(chat: Chat, rule: IdleStopRule = IDLE) -> list[str]:
    """Run one tick of the rule; return the kinds of its decisions."""
    result = await chat.daemon.engine.run_rule(rule)
    assert result.error is None, result.error
    return [type(decision).__name__ for decision in result.decisions]


async def warn(chat: Chat, rule: IdleStopRule = IDLE) -> SentMessage:
    """Seed an idle VM, run the rule, and return the warning message the user got."""
    await seed_idle_vm(chat)
    count = len(chat.api.messages)

    assert await tick(chat, rule) == ["WarnIdle"]

    await chat.api.wait_for_messages(count + 1, timeout_seconds=WAIT_SECONDS)
    return chat.api.messages[count]


async def due_at(chat: Chat, vm_id: str) -> datetime:
    state = await chat.daemon.store.load_rule_state(IDLE.name)
    return state.idle_warnings[vm_id].due_at


async def later(chat: Chat, minutes: int) -> datetime:
    """Move the simulated clock on and store fresh quiet samples; return the new time."""
    now = chat.market.advance(timedelta(minutes=minutes))
    await add_quiet_samples(chat.daemon.store, chat.vm_id(VM_NAME), now)
    return now


# --- the warning message ------------------------------------------------------------------


async def test_warning_carries_three_buttons(chat: Chat) -> None:
    message = await warn(chat)

    assert "will be stopped at 2024-11-04 12:15 UTC unless it becomes busy" in shown(message)
    for label in KEEP_LABELS:
        data = button_data(message, label)
        assert data.startswith("k:")
        assert len(data.encode()) <= MAX_CALLBACK_DATA_BYTES


async def test_cancellation_has_no_buttons(chat: Chat) -> None:
    await warn(chat)
    await chat.daemon.store.add_idle_sample(
        IdleSample(vm_id=chat.vm_id(VM_NAME), at=chat.market.now(), gpu_util_percent=90.0)
    )
    count = len(chat.api.messages)

    assert await tick(chat) == ["CancelIdleWarning"]

    await chat.api.wait_for_messages(count + 1, timeout_seconds=WAIT_SECONDS)
    cancelled = chat.api.messages[count]
    assert "is busy again, so its idle stop is cancelled" in shown(cancelled)
    assert cancelled.reply_markup is None


# --- keep ---------------------------------------------------------------------------------


async def test_keep_1h_moves_due_time(chat: Chat) -> None:
    message = await warn(chat)
    vm_id = chat.vm_id(VM_NAME)
    warned_due = await due_at(chat, vm_id)

    answer = await chat.press(message, "Keep 1 h")

    assert await due_at(chat, vm_id) == warned_due + timedelta(hours=1)
    assert answer == (
        f"Kept: VM {vm_id} is not stopped before 2024-11-04 13:15:00 UTC. "
        "Activity before then cancels the stop."
    )


async def test_kept_vm_survives_old_due_time(chat: Chat) -> None:
    message = await warn(chat)
    await chat.press(message, "Keep 1 h")

    await later(chat, 20)
    at_old_due = await tick(chat)
    await later(chat, 40)
    before_new_due = await tick(chat)
    await later(chat, 16)
    at_new_due = await tick(chat)

    assert at_old_due == []
    assert before_new_due == []
    assert at_new_due == ["Stop"]
    assert chat.status(VM_NAME) is VmStatus.STOPPED


async def test_keep_4h_after_due_counts_from_now(chat: Chat) -> None:
    message = await warn(chat)
    vm_id = chat.vm_id(VM_NAME)
    # The due time passed without a tick, as when the daemon was down.
    now = await later(chat, 20)
    stored = await chat.daemon.store.idle_warning(IDLE.name, vm_id)
    assert stored is not None

    await chat.press(message, "Keep 4 h")

    assert stored.warning.due_at < now
    assert await due_at(chat, vm_id) == now + timedelta(hours=4)
    assert await tick(chat) == []
    assert chat.status(VM_NAME) is VmStatus.RUNNING


async def test_activity_cancels_kept_warning(chat: Chat) -> None:
    message = await warn(chat)
    await chat.press(message, "Keep 4 h")
    now = await later(chat, 10)
    await chat.daemon.store.add_idle_sample(
        IdleSample(vm_id=chat.vm_id(VM_NAME), at=now, gpu_util_percent=75.0)
    )
    count = len(chat.api.messages)

    assert await tick(chat) == ["CancelIdleWarning"]
    await chat.api.wait_for_messages(count + 1, timeout_seconds=WAIT_SECONDS)
    again = await chat.press(message, "Keep 1 h")

    assert "is busy again, so its idle stop is cancelled" in shown(chat.api.messages[count])
    assert "no longer pending" in again
    assert chat.status(VM_NAME) is VmStatus.RUNNING


async def test_keep_survives_restart(
    api: FakeTelegramApi, market: SimulatedMarket, api_url: str, tmp_path: Path
) -> None:
    async with running_bot(api, market, api_url, tmp_path, IDLE) as first:
        message = await warn(first)
        await first.press(message, "Keep 1 h")
        vm_id = first.vm_id(VM_NAME)
        kept_due = await due_at(first, vm_id)

    async with running_bot(api, market, api_url, tmp_path, IDLE) as second:
        due_after_restart = await due_at(second, vm_id)
        await later(second, 20)
        at_old_due = await tick(second)
        await later(second, 56)
        at_new_due = await tick(second)

    assert due_after_restart == kept_due
    assert kept_due == datetime.fromisoformat("2024-11-04T13:15:00+00:00")
    assert at_old_due == []
    assert at_new_due == ["Stop"]
    assert market.vm(vm_id).status is VmStatus.STOPPED


# --- stop now -------------------------------------------------------------------------------


async def test_stop_now_asks_confirmation(chat: Chat) -> None:
    message = await warn(chat)
    count = len(chat.api.messages)

    answer = await chat.press(message, "Stop now")
    question_text = await chat.next_message(count)
    question = chat.api.messages[count]

    assert answer == "Confirm or cancel the stop in the next message."
    assert question_text.startswith(f"⚠️ Stop VM {VM_NAME} (Running, $")
    assert "/h)" in question_text
    assert button_data(question, "Confirm").startswith("c:")
    assert button_data(question, "Cancel").startswith("c:")
    assert chat.status(VM_NAME) is VmStatus.RUNNING
    assert await chat.daemon.store.recent_actions() == []


async def test_stop_now_confirmed_stops(chat: Chat) -> None:
    message = await warn(chat)
    count = len(chat.api.messages)
    await chat.press(message, "Stop now")
    await chat.next_message(count)
    question = chat.api.messages[count]
    count = len(chat.api.messages)

    await chat.press(question, "Confirm")
    result = await chat.next_message(count)

    assert result.startswith("ℹ️ Done: VM")
    assert chat.status(VM_NAME) is VmStatus.STOPPED


async def test_stop_now_cancelled_keeps_warning(chat: Chat) -> None:
    message = await warn(chat)
    vm_id = chat.vm_id(VM_NAME)
    warned_due = await due_at(chat, vm_id)
    count = len(chat.api.messages)
    await chat.press(message, "Stop now")
    await chat.next_message(count)

    answer = await chat.press(chat.api.messages[count], "Cancel")

    assert answer == "Cancelled; nothing was done."
    assert chat.status(VM_NAME) is VmStatus.RUNNING
    assert await due_at(chat, vm_id) == warned_due


async def test_stop_now_releases_for_release_rule(
    api: FakeTelegramApi, market: SimulatedMarket, api_url: str, tmp_path: Path
) -> None:
    rule = IDLE.model_copy(update={"action": "stop_release"})
    async with running_bot(api, market, api_url, tmp_path, rule) as chat:
        message = await warn(chat, rule)
        count = len(chat.api.messages)
        await chat.press(message, "Stop now")
        question_text = await chat.next_message(count)

    assert "and release its GPU, vCPUs and RAM" in question_text


# --- rejected presses ---------------------------------------------------------------------


async def test_stranger_cannot_keep(chat: Chat) -> None:
    message = await warn(chat)
    vm_id = chat.vm_id(VM_NAME)
    warned_due = await due_at(chat, vm_id)

    answer = await chat.press(message, "Keep 4 h", user=STRANGER)

    assert answer == "You are not allowed to command this bot."
    assert await due_at(chat, vm_id) == warned_due


@pytest.mark.parametrize(
    ("make_data", "expected"),
    [
        (lambda button_id: f"k:{button_id.split('.')[0]}.abcdef:1h", "no longer pending"),
        (lambda button_id: "k:999999.abcdef:1h", "no longer pending"),
        (lambda button_id: f"k:{button_id}:2h", "not valid"),
        (lambda button_id: "k:nonsense", "not valid"),
    ],
    ids=["wrong-check", "unknown-row", "unknown-choice", "malformed"],
)
async def test_bad_keep_button_changes_nothing(
    chat: Chat, make_data: object, expected: str
) -> None:
    message = await warn(chat)
    vm_id = chat.vm_id(VM_NAME)
    warned_due = await due_at(chat, vm_id)
    stored = await chat.daemon.store.idle_warning(IDLE.name, vm_id)
    assert stored is not None and callable(make_data)
    answers = len(chat.api.callback_answers)

    chat.api.inject_callback_query(
        USER, message.message_id, make_data(stored.button_id), user_id=USER
    )
    await until(lambda: len(chat.api.callback_answers) > answers)

    assert expected in str(chat.api.callback_answers[answers].get("text", ""))
    assert await due_at(chat, vm_id) == warned_due


# --- reports about the process list -----------------------------------------------------------


async def test_missing_process_list_reported_once(
    api: FakeTelegramApi, market: SimulatedMarket, api_url: str, tmp_path: Path
) -> None:
    rule = IDLE.model_copy(update={"busy_processes": ["*train.py*"]})
    async with running_bot(api, market, api_url, tmp_path, rule) as chat:
        await seed_idle_vm(chat)
        count = len(chat.api.messages)

        first = await tick(chat, rule)
        await chat.api.wait_for_messages(count + 1, timeout_seconds=WAIT_SECONDS)
        second = await tick(chat, rule)
        reports = [shown(message) for message in chat.api.messages[count:]]

    assert first == ["Report"]
    assert second == ["Report"]
    assert len(reports) == 1
    assert "samples without a configured signal (processes)" in reports[0]
    assert market.vm(chat.vm_id(VM_NAME)).status is VmStatus.RUNNING


async def test_matching_process_prevents_warning(chat: Chat) -> None:
    rule = IDLE.model_copy(update={"busy_processes": ["*train.py*"]})
    chat.daemon.rules[:] = [rule]
    await seed_idle_vm(chat, processes=("/sbin/init", "python3 train.py --resume"))

    assert await tick(chat, rule) == []


async def test_two_warnings_name_their_vms(chat: Chat) -> None:
    chat.market.add_vm(
        hostnode_id="0b60f80c-e16a-4cda-a8cd-dbc01cc0512c",
        gpu_model="geforcertx4090-pcie-24gb",
        name="api-server-b",
    )
    now = chat.market.now()
    for name in (VM_NAME, "api-server-b"):
        vm_id = chat.vm_id(name)
        await chat.daemon.store.set_running_since(IDLE.name, vm_id, now - timedelta(hours=2))
        await add_quiet_samples(chat.daemon.store, vm_id, now)
    count = len(chat.api.messages)

    assert await tick(chat) == ["WarnIdle", "WarnIdle"]

    await chat.api.wait_for_messages(count + 1, timeout_seconds=WAIT_SECONDS)
    message = chat.api.messages[count]
    first = button_data(message, f"{VM_NAME}: Keep 1 h")
    second = button_data(message, "api-server-b: Keep 1 h")
    assert first != second
    assert button_data(message, "api-server-b: Stop now").endswith(":now")
