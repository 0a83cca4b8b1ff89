"""The Telegram bot in the daemon, typed at as a user would.

The real PTB `Application` talks HTTP over 127.0.0.1 to `FakeTelegramApi`, and the
daemon talks to the TensorDock simulator on 127.0.0.1. A test injects a user's
message or button press into the fake and waits for the bot's reply.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tdbot.bot import ChatBot
from tdbot.bot.chat_actions import CHAT_RULE
from tdbot.config import (
    DaemonSettings,
    HeartbeatSettings,
    SafetySettings,
    Secrets,
    Settings,
    TelegramSettings,
    TensorDockSettings,
)
from tdbot.daemon.runner import Daemon, open_daemon, run_daemon
from tdbot.daemon.snapshot import ALL_PARTS
from tdbot.demo import outbid
from tdbot.evaluation.model import IdleSample
from tdbot.notify.base import MAX_CALLBACK_DATA_BYTES
from tdbot.notify.telegram import MESSAGE_LIMIT, TelegramNotifier
from tdbot.rules.schema import (
    CheapestHostnodeRule,
    IdleStopRule,
    LowBalanceRule,
    RuleBase,
    SpotRebidRule,
)
from tdbot.simulator.faults import FaultMode
from tdbot.simulator.market import SimulatedMarket
from tdbot.simulator.testing import (
    TEST_API_KEY,
    TEST_API_TOKEN,
    make_test_market,
    running_simulator,
)
from tdbot.store.tables import ActionState
from tdbot.tensordock.models import VmStatus
from tests.fakes.telegram_api import FakeTelegramApi, SentMessage

# PTB 22.8's own RetryAfter constructor reads retry_after as an int, which warns.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*retry_after.*:telegram.warnings.PTBDeprecationWarning"
)

USER = 1001
STRANGER = 6666
GROUP = -100200300
OTHER_GROUP = -100999999
SECRETS = Secrets(api_key=TEST_API_KEY, api_token=TEST_API_TOKEN)
HOSTILE_NAME = "train <b>&_*["
GPU_4090 = "geforcertx4090-pcie-24gb"
WAIT_SECONDS = 10.0

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
    }
)
LOW_BALANCE = LowBalanceRule.model_validate(
    {"name": "low-balance", "kind": "low_balance", "every": "15m", "fire_below_balance_usd": 150.0}
)
DEPLOYER = CheapestHostnodeRule.model_validate(
    {
        "name": "cheap-4090",
        "kind": "cheapest_hostnode",
        "every": "10m",
        "match": {"gpu": [GPU_4090], "vcpus": 4, "ram_gb": 16, "storage_gb": 100},
        "deploy": {"enabled": True, "max_usd_per_hour": 5.0, "confirm": True},
    }
)
RULES: list[RuleBase] = [IDLE, LOW_BALANCE]
# Every GPU model of at least two hostnodes in the packaged marketplace.
ALL_GPUS = (
    GPU_4090,
    "a100-pcie-80gb",
    "l40s-pcie-48gb",
    "geforcertx3090-pcie-24gb",
    "rtxa4000-pcie-16gb",
    "rtxa6000-pcie-48gb",
    "h100-sxm5-80gb",
    "rtxa5000-pcie-24gb",
)


@dataclass
class Chat:
    """The fake Telegram server, the simulator and the daemon with its bot."""

    api: FakeTelegramApi
    market: SimulatedMarket
    daemon: Daemon
    bot: ChatBot

    def vm_id(self, name: str) -> str:
        return next(vm.id for vm in self.market.vms.values() if vm.name == name)

    def status(self, name: str) -> VmStatus:
        return self.market.vm(self.vm_id(name)).status

    async def say(
        self, text: str, *, chat: int = USER, user: int = USER, replies: int = 1
    ) -> list[SentMessage]:
        """Send `text` as the user and return the bot's next `replies` messages."""
        count = len(self.api.messages)
        self.api.inject_message(chat, text, user_id=user)
        await self.api.wait_for_messages(count + replies, timeout_seconds=WAIT_SECONDS)
        return self.api.messages[count:]

    async def reply(self, text: str, **options: Any) -> str:
        """Send `text` and return the first reply as the user reads it."""
        (first, *_) = await self.say(text, **options)
        return shown(first)

    async def press(self, question: SentMessage, label: str, *, user: int = USER) -> str:
        """Press the button labelled `label` under `question`; return the callback answer."""
        data = button_data(question, label)
        answers = len(self.api.callback_answers)
        self.api.inject_callback_query(question.chat_id, question.message_id, data, user_id=user)
        await until(lambda: len(self.api.callback_answers) > answers)
        return str(self.api.callback_answers[answers].get("text", ""))

    async def next_message(self, count: int) -> str:
        """Wait for message number `count` (from 0) and return it as the user reads it."""
        await self.api.wait_for_messages(count + 1, timeout_seconds=WAIT_SECONDS)
        return shown(self.api.messages[count])


def shown(message: SentMessage) -> str:
    """Return a message's text without HTML tags and entities, as the user reads it."""
    return html.unescape(re.sub(r"<[^>]+>", "", message.text or ""))


async def until(condition: Callable[[], bool], timeout_seconds: float = WAIT_SECONDS) -> None:
    # The fake has no event for callback answers, so this polls; the timeout bounds it.
    async with asyncio.timeout(timeout_seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def button_data(message: SentMessage, label: str) -> str:
    markup = message.reply_markup or {}
    for row in markup.get("inline_keyboard", []):
        for button in row:
            if button["text"] == label:
                return str(button["callback_data"])
    raise AssertionError(f"no button {label!r} under message {message.message_id}")


def settings_for(api: FakeTelegramApi, api_url: str, folder: Path, **telegram: Any) -> Settings:
    options: dict[str, Any] = {
        "chat_ids": [USER],
        "base_url": api.base_url,
        "allowed_user_ids": [USER],
        "allowed_chat_ids": [GROUP],
        **telegram,
    }
    return Settings(
        tensordock=TensorDockSettings(base_url=api_url, timeout_seconds=10, read_retries=1),
        safety=SafetySettings(fleet_max_usd_per_hour=50.0),
        daemon=DaemonSettings(rules_dir=folder / "rules", database=str(folder / "tdbot.db")),
        heartbeat=HeartbeatSettings(enabled=False),
        telegram=TelegramSettings(**options),
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
async def chat(
    api: FakeTelegramApi, market: SimulatedMarket, tmp_path: Path
) -> AsyncIterator[Chat]:
    async with running_simulator(market) as simulator:
        settings = settings_for(api, simulator.api_url, tmp_path)
        notifier = TelegramNotifier(api.token, [USER], base_url=api.base_url)
        async with open_daemon(
            settings, SECRETS, clock=market.clock, notifier=notifier, rules=list(RULES)
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


async def ask_stop(chat: Chat, name: str, *options: str) -> SentMessage:
    (question,) = await chat.say(" ".join(["/stop_vm", name, *options]))
    assert question.reply_markup is not None, question.text
    return question


# --- start-up ----------------------------------------------------------------------------


async def test_start_sets_command_menu(chat: Chat) -> None:
    names = [command["command"] for command in chat.api.commands]

    assert "status" in names
    assert "stop_vm" in names
    assert "start_vm" in names


async def test_help_lists_commands(chat: Chat) -> None:
    text = await chat.reply("/help")

    assert "/stop_vm NAME_OR_ID [--release]" in text
    assert "/why ACTION_ID" in text


async def test_unknown_command_answered(chat: Chat) -> None:
    text = await chat.reply("/frobnicate now")

    assert "Unknown command /frobnicate" in text


# --- read-only commands --------------------------------------------------------------------


async def test_status_shows_rules_and_api(chat: Chat) -> None:
    result = await chat.daemon.engine.run_rule(LOW_BALANCE)
    await chat.bot.on_tick(LOW_BALANCE, result)

    text = await chat.reply("/status")

    assert "Up for" in text
    assert "Dry run: off" in text
    assert "• low-balance: last tick 2024-11-04 12:00:00 UTC, ok, 1 decisions" in text
    assert "• idle: last tick never, no result yet" in text
    assert "no errors" in text
    assert "allowlist: 0" in text


async def test_database_outage_announced_once(chat: Chat) -> None:
    engine = chat.daemon.store.engine
    # A damaged database: the table every tick writes first is gone.
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE rule_run RENAME TO rule_run_moved"))
    sent = len(chat.api.messages)

    first = await chat.daemon.engine.run_rule(LOW_BALANCE)
    second = await chat.daemon.engine.run_rule(LOW_BALANCE)
    outage = await chat.next_message(sent)
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE rule_run_moved RENAME TO rule_run"))
    third = await chat.daemon.engine.run_rule(LOW_BALANCE)
    # The recovered tick's own alert comes first, then the all-clear.
    await chat.next_message(sent + 2)
    texts = [shown(message) for message in chat.api.messages[sent:]]

    assert first.error is not None
    assert first.error.startswith("database unavailable: ")
    assert second.error is not None
    assert outage.startswith("🚨 Database unavailable")
    assert "no such table: rule_run" in outage
    assert texts[-1].startswith("ℹ️ Database available again")
    assert third.error is None
    assert sum("Database unavailable" in message for message in texts) == 1


async def test_status_usage_error(chat: Chat) -> None:
    text = await chat.reply("/status now")

    assert text.startswith("⚠️ Usage: /status")
    assert "takes no arguments" in text


async def test_vms_lists_costs(chat: Chat) -> None:
    text = await chat.reply("/vms")

    assert "3 VMs" in text
    assert "api-server-4090" in text
    assert "whisper-2x3090" in text
    assert "spot, bid $0.3000/h" in text
    assert "Total: $" in text


async def test_vms_usage_error(chat: Chat) -> None:
    text = await chat.reply("/vms all")

    assert text.startswith("⚠️ Usage: /vms")


async def test_vm_shows_idle_evidence(chat: Chat) -> None:
    vm_id = chat.vm_id("api-server-4090")
    now = chat.market.now()
    store = chat.daemon.store
    await store.set_running_since(IDLE.name, vm_id, now - timedelta(hours=2))
    for minutes_ago in (20, 12, 4):
        at = now - timedelta(minutes=minutes_ago)
        await store.add_idle_sample(IdleSample(vm_id=vm_id, at=at, gpu_util_percent=1))

    text = await chat.reply("/vm api-server-4090")

    assert f"Id: {vm_id}" in text
    assert "Status: Running" in text
    assert "Spot bid: none (on-demand)" in text
    assert "Idle (idle): idle; 3 samples (at least 3)" in text
    assert "gpu_util_percent max 1 (idle below 5.0)" in text


async def test_vm_by_spot_id_prefix(chat: Chat) -> None:
    vm_id = chat.vm_id("whisper-2x3090")

    text = await chat.reply(f"/vm {vm_id[:8]}")

    assert "VM whisper-2x3090" in text
    assert "Spot bid: $0.3000/h" in text
    assert "Idle: no idle_stop rule watches this VM." in text


async def test_vm_usage_errors(chat: Chat) -> None:
    missing = await chat.reply("/vm")
    unknown = await chat.reply("/vm no-such-vm")

    assert missing.startswith("⚠️ Usage: /vm NAME_OR_ID")
    assert "no VM has the name or id 'no-such-vm'" in unknown


async def test_balance_shows_runway(chat: Chat) -> None:
    text = await chat.reply("/balance")

    assert "Balance: $100.00" in text
    assert "Burn rate of the VM list: $" in text
    assert "Stopped, billed in full: 1 VMs" in text
    assert "Runway:" in text
    assert "The money runs out at 2024-11-" in text


async def test_balance_usage_error(chat: Chat) -> None:
    text = await chat.reply("/balance please")

    assert text.startswith("⚠️ Usage: /balance")


async def test_cheapest_shows_price_split(chat: Chat) -> None:
    text = await chat.reply(f"/cheapest gpu={GPU_4090} count=1 vcpus=8 ram=32 storage=200 top=2")

    assert f"Cheapest hostnodes for 1x {GPU_4090}" in text
    assert "1. $" in text
    assert "2. $" in text
    assert "3. $" not in text
    assert "8 vCPUs $" in text
    assert "200 GB storage $" in text


async def test_cheapest_usage_errors(chat: Chat) -> None:
    unknown_key = await chat.reply("/cheapest gpu=x colour=red")
    no_gpu = await chat.reply("/cheapest vcpus=8")
    bad_count = await chat.reply(f"/cheapest gpu={GPU_4090} count=99")

    assert "unknown key 'colour'" in unknown_key
    assert "gpu= is required" in no_gpu
    assert bad_count.startswith("⚠️ Usage: /cheapest gpu=MODEL")
    assert "count=99 is out of range: count must be at most 8" in bad_count


async def test_long_reply_split_under_limit(chat: Chat) -> None:
    gpus = ",".join(ALL_GPUS)

    messages = await chat.say(f"/cheapest gpu={gpus} vcpus=2 ram=4 storage=20 top=20", replies=2)

    assert len(messages) == 2
    assert all(len(message.text or "") <= MESSAGE_LIMIT for message in messages)
    assert "20. $" in "".join(shown(message) for message in messages)


async def test_rules_lists_schedule(chat: Chat) -> None:
    text = await chat.reply("/rules")

    assert "2 rules" in text
    assert "• idle: idle_stop, every 2m; active" in text
    assert "• low-balance: low_balance, every 15m; active" in text


async def test_pause_and_resume_rule(chat: Chat) -> None:
    paused = await chat.reply("/pause low-balance 2h")
    skipped = await chat.daemon.engine.run_rule(LOW_BALANCE)
    listed = await chat.reply("/rules")
    resumed = await chat.reply("/resume low-balance")
    ran = await chat.daemon.engine.run_rule(LOW_BALANCE)

    assert "Rule low-balance is paused until 2024-11-04 14:00:00 UTC." in paused
    assert skipped.skipped is not None
    assert "low-balance: low_balance, every 15m; paused until 2024-11-04 14:00:00 UTC" in listed
    assert "Rule low-balance is resumed" in resumed
    assert ran.skipped is None


async def test_pause_without_duration(chat: Chat) -> None:
    text = await chat.reply("/pause idle")

    assert "Rule idle is paused until /resume idle." in text
    assert await chat.daemon.store.paused_until("idle") is not None


async def test_pause_usage_errors(chat: Chat) -> None:
    unknown = await chat.reply("/pause nope 1h")
    bad_duration = await chat.reply("/pause idle soon")
    no_rule = await chat.reply("/resume")

    assert "no rule is named 'nope'; loaded rules: idle, low-balance" in unknown
    assert bad_duration.startswith("⚠️ Usage: /pause RULE [DURATION]")
    assert "DURATION:" in bad_duration
    assert no_rule.startswith("⚠️ Usage: /resume RULE")


async def test_alerts_silence_unsilence(chat: Chat) -> None:
    alert = await chat.daemon.store.upsert_alert(
        "low-balance", "account", severity="warning", message="Low balance: $12"
    )

    listed = await chat.reply("/alerts")
    silenced = await chat.reply(f"/silence {alert.id} 1h")
    listed_silenced = await chat.reply("/alerts")
    lifted = await chat.reply("/unsilence low-balance/account")

    assert f"#{alert.id} low-balance/account (warning" in listed
    assert "Low balance: $12" in listed
    assert "is silenced for 1h" in silenced
    assert "silenced until 2024-11-04 13:00:00 UTC" in listed_silenced
    assert "is no longer silenced" in lifted


async def test_silence_usage_errors(chat: Chat) -> None:
    missing = await chat.reply("/silence 1")
    bad_duration = await chat.reply("/silence 1 forever")
    bad_ref = await chat.reply("/unsilence nonsense")

    assert missing.startswith("⚠️ Usage: /silence ALERT DURATION")
    assert bad_duration.startswith("⚠️ Usage: /silence ALERT DURATION")
    assert "not an alert id or rule/subject" in bad_ref


async def test_why_usage_errors(chat: Chat) -> None:
    not_number = await chat.reply("/why latest")
    unknown = await chat.reply("/why 999")

    assert not_number.startswith("⚠️ Usage: /why ACTION_ID")
    assert "Action 999 is not in the journal." in unknown


# --- confirmations ---------------------------------------------------------------------


async def test_stop_confirmed_stops_vm(chat: Chat) -> None:
    question = await ask_stop(chat, "api-server-4090")
    text = shown(question)
    sent = len(chat.api.messages)

    answer = await chat.press(question, "Confirm")
    result = await chat.next_message(sent)

    assert "Stop VM api-server-4090 (Running, $" in text
    assert "A plain stop keeps billing the GPU at the same rate" in text
    assert "--release frees it" in text
    assert answer == "Confirmed; working on it."
    assert result.startswith("ℹ️ Done: VM")
    assert chat.status("api-server-4090") is VmStatus.STOPPED
    (action,) = await chat.daemon.store.recent_actions()
    assert action.rule == CHAT_RULE.name
    assert action.state == ActionState.VERIFIED.value
    assert f"/why {action.id}" in result


async def test_stop_buttons_fit_callback_limit(chat: Chat) -> None:
    question = await ask_stop(chat, "api-server-4090")

    for label in ("Confirm", "Cancel"):
        data = button_data(question, label)
        assert data.startswith("c:")
        assert len(data.encode()) <= MAX_CALLBACK_DATA_BYTES


async def test_why_shows_journal_and_evidence(chat: Chat) -> None:
    question = await ask_stop(chat, "api-server-4090", "--release")
    sent = len(chat.api.messages)
    await chat.press(question, "Confirm")
    await chat.next_message(sent)
    (action,) = await chat.daemon.store.recent_actions()

    text = await chat.reply(f"/why {action.id}")

    assert f"Action {action.id}" in text
    assert "Rule: chat" in text
    assert "State: verified" in text
    assert "release=True" in text
    assert "client/stop/single" in text
    assert f"confirmed_by_user={USER}" in text
    assert "status_when_asked=Running" in text


async def test_stop_release_asks_with_storage(chat: Chat) -> None:
    question = await ask_stop(chat, "api-server-4090", "--release")
    sent = len(chat.api.messages)

    await chat.press(question, "Confirm")
    await chat.next_message(sent)

    assert "and release its GPU, vCPUs and RAM" in shown(question)
    assert "only its storage is billed" in shown(question)
    assert chat.status("api-server-4090") is VmStatus.STOPPED_DISASSOCIATED


async def test_stop_cancelled_does_nothing(chat: Chat) -> None:
    question = await ask_stop(chat, "api-server-4090")

    answer = await chat.press(question, "Cancel")

    assert answer == "Cancelled; nothing was done."
    assert chat.status("api-server-4090") is VmStatus.RUNNING
    assert await chat.daemon.store.recent_actions() == []
    (edit,) = chat.api.edits
    assert "Cancelled by user" in edit.params["text"]
    assert "reply_markup" not in edit.params


async def test_stop_expired_does_nothing(chat: Chat) -> None:
    question = await ask_stop(chat, "api-server-4090")
    chat.market.advance(timedelta(minutes=11))

    answer = await chat.press(question, "Confirm")

    assert "has expired" in answer
    assert chat.status("api-server-4090") is VmStatus.RUNNING
    assert await chat.daemon.store.recent_actions() == []


async def test_expired_pressed_twice_quietly(chat: Chat, caplog: pytest.LogCaptureFixture) -> None:
    question = await ask_stop(chat, "api-server-4090")
    chat.market.advance(timedelta(minutes=11))
    await chat.press(question, "Confirm")

    edits = len(chat.api.calls_of("editMessageText"))
    with caplog.at_level(logging.WARNING, logger="tdbot.bot"):
        again = await chat.press(question, "Confirm")
        # The bot edits the question after answering the press, so wait for the edit.
        for _ in range(100):
            if len(chat.api.calls_of("editMessageText")) > edits:
                break
            await asyncio.sleep(0.02)

    assert "has expired" in again
    assert chat.api.calls_of("editMessageText")[-1].status == 400
    assert "could not edit" not in caplog.text
    assert chat.status("api-server-4090") is VmStatus.RUNNING


async def test_stop_pressed_twice_acts_once(chat: Chat) -> None:
    question = await ask_stop(chat, "api-server-4090")
    sent = len(chat.api.messages)
    await chat.press(question, "Confirm")
    await chat.next_message(sent)

    second = await chat.press(question, "Confirm")
    third = await chat.press(question, "Cancel")

    assert "already used" in second
    assert "already used" in third
    assert len(await chat.daemon.store.recent_actions()) == 1
    assert len(list(chat.market.events_of("stopped"))) == 1


async def test_stop_after_state_change_refused(chat: Chat) -> None:
    question = await ask_stop(chat, "api-server-4090")
    chat.market.stop(chat.vm_id("api-server-4090"))
    sent = len(chat.api.messages)

    await chat.press(question, "Confirm")
    result = await chat.next_message(sent)

    assert "Nothing was done: VM api-server-4090 is now Stopped, not Running" in result
    assert await chat.daemon.store.recent_actions() == []


async def test_stop_of_stopped_vm_rejected(chat: Chat) -> None:
    (reply,) = await chat.say("/stop_vm dev-box-a4000")

    assert reply.reply_markup is None
    assert "VM dev-box-a4000 is Stopped, so it cannot be stopped" in shown(reply)


async def test_stop_usage_errors(chat: Chat) -> None:
    no_vm = await chat.reply("/stop_vm")
    bad_flag = await chat.reply("/stop_vm api-server-4090 --force")

    assert no_vm.startswith("⚠️ Usage: /stop_vm NAME_OR_ID [--release]")
    assert "unknown option --force" in bad_flag


async def test_start_confirmed_starts_vm(chat: Chat) -> None:
    (question,) = await chat.say("/start_vm dev-box-a4000")
    sent = len(chat.api.messages)

    await chat.press(question, "Confirm")
    result = await chat.next_message(sent)

    assert "Start VM dev-box-a4000 (Stopped, $" in shown(question)
    assert result.startswith("ℹ️ Done: VM")
    assert chat.status("dev-box-a4000") is VmStatus.RUNNING
    (action,) = await chat.daemon.store.recent_actions()
    assert action.kind == "start"
    assert action.state == ActionState.VERIFIED.value


async def test_start_usage_errors(chat: Chat) -> None:
    missing = await chat.reply("/start_vm")
    running = await chat.reply("/start_vm api-server-4090")

    assert missing.startswith("⚠️ Usage: /start_vm NAME_OR_ID")
    assert "only a stopped VM can be started" in running


async def test_other_user_cannot_confirm(chat: Chat) -> None:
    settings = chat.daemon.settings.telegram
    chat.bot.allowlist = type(chat.bot.allowlist).of([USER, 1002], settings.command_chat_ids)
    question = await ask_stop(chat, "api-server-4090")

    answer = await chat.press(question, "Confirm", user=1002)

    assert answer == "Only the user who asked can answer this confirmation."
    assert chat.status("api-server-4090") is VmStatus.RUNNING


async def test_deploy_awaiting_confirmation_asks(chat: Chat) -> None:
    chat.daemon.rules.append(DEPLOYER)
    chat.daemon.snapshots.parts = ALL_PARTS
    result = await chat.daemon.engine.run_rule(DEPLOYER)
    sent = len(chat.api.messages)
    await chat.bot.on_tick(DEPLOYER, result)
    question_text = await chat.next_message(sent)
    question = chat.api.messages[sent]
    await chat.bot.on_tick(DEPLOYER, result)
    vms_before = len(chat.market.vms)

    sent = len(chat.api.messages)
    await chat.press(question, "Confirm")
    outcome = await chat.next_message(sent)

    assert [o.status.value for o in result.outcomes] == ["awaiting_confirmation"]
    assert question_text.startswith("⚠️ Deploy cheap-4090-1 on hostnode")
    assert "sets deploy.confirm: true" in question_text
    assert len(chat.api.messages) == sent + 1
    assert outcome.startswith("ℹ️ Done:"), outcome
    assert len(chat.market.vms) == vms_before + 1


async def test_spot_redeploy_confirmed_deploys(chat: Chat) -> None:
    spot_vm = next(vm for vm in chat.market.vms.values() if vm.is_spot)
    outbid(chat.market, spot_vm)
    rule = SpotRebidRule.model_validate(
        {
            "name": "spot-redeploy",
            "kind": "spot_rebid",
            "every": "1m",
            # A cap at the current bid leaves no step, so the ladder is exhausted at once.
            "bid": {"step_usd": 0.03, "max_usd_per_hour": spot_vm.compute_price},
            "on_exhausted": "redeploy",
            "redeploy_max_usd_per_hour": 5.0,
        }
    )
    chat.daemon.rules.append(rule)
    chat.daemon.snapshots.parts = ALL_PARTS
    result = await chat.daemon.engine.run_rule(rule)
    sent = len(chat.api.messages)
    await chat.bot.on_tick(rule, result)
    question_text = await chat.next_message(sent)
    question = chat.api.messages[sent]
    vms_before = len(chat.market.vms)

    sent = len(chat.api.messages)
    await chat.press(question, "Confirm")
    outcome = await chat.next_message(sent)

    assert "sets redeploy_confirm: true" in question_text
    assert outcome.startswith("ℹ️ Done:"), outcome
    assert len(chat.market.vms) == vms_before + 1
    names = {vm.name for vm in chat.market.vms.values()}
    assert f"{spot_vm.name}-redeploy" in names


# --- allowlist -------------------------------------------------------------------------


async def test_stranger_rejected_and_counted(chat: Chat, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tdbot.bot.access"):
        refusal = await chat.reply("/stop_vm api-server-4090", chat=STRANGER, user=STRANGER)
    status = await chat.reply("/status")

    assert refusal == "You are not allowed to command this bot."
    assert chat.status("api-server-4090") is VmStatus.RUNNING
    assert (
        await chat.daemon.store.open_confirmation(
            origin="chat",
            action="stop",
            subject=chat.vm_id("api-server-4090"),
            now=chat.market.now(),
        )
        is None
    )
    assert f"from user {STRANGER} in chat {STRANGER}" in caplog.text
    assert "allowlist: 1." in status


async def test_stranger_button_rejected(chat: Chat) -> None:
    (question,) = await chat.say("/stop_vm api-server-4090", chat=GROUP)

    answer = await chat.press(question, "Confirm", user=STRANGER)

    assert answer == "You are not allowed to command this bot."
    assert chat.status("api-server-4090") is VmStatus.RUNNING
    assert chat.bot.allowlist.rejected == 1


async def test_group_unlisted_user_rejected(chat: Chat) -> None:
    refusal = await chat.reply("/vms", chat=GROUP, user=STRANGER)
    allowed = await chat.reply("/vms", chat=GROUP, user=USER)
    other_group = await chat.reply("/vms", chat=OTHER_GROUP, user=USER)

    assert refusal == "You are not allowed to command this bot."
    assert "3 VMs" in allowed
    assert other_group == "You are not allowed to command this bot."
    assert chat.bot.allowlist.rejected == 2


# --- delivery --------------------------------------------------------------------------


async def test_flood_limit_reply_retried(chat: Chat) -> None:
    chat.api.rate_limit_next("sendMessage", retry_after=1)
    started = time.monotonic()

    text = await chat.reply("/help")

    assert time.monotonic() - started >= 1.0
    assert "tdbot commands" in text
    assert [call.status for call in chat.api.calls_of("sendMessage")] == [429, 200]


async def test_hostile_vm_name_escaped(chat: Chat) -> None:
    chat.market.add_vm(
        hostnode_id="0b60f80c-e16a-4cda-a8cd-dbc01cc0512c",
        gpu_model=GPU_4090,
        name=HOSTILE_NAME,
    )

    (listing,) = await chat.say("/vms")
    question = await ask_stop(chat, HOSTILE_NAME)

    escaped = "train &lt;b&gt;&amp;_*["
    assert escaped in (listing.text or "")
    assert f"Stop VM {escaped} (Running" in (question.text or "")


async def test_handler_failure_answered(
    chat: Chat, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # No real part fails inside a command on demand, so the command is replaced.
    async def broken(request: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(chat.bot.commands, "rules", broken)

    with caplog.at_level(logging.ERROR, logger="tdbot.bot"):
        text = await chat.reply("/rules")

    assert "Sorry, that failed (RuntimeError)" in text
    assert "disk on fire" in caplog.text
    assert chat.api.token not in caplog.text


async def test_daemon_runs_bot(
    api: FakeTelegramApi, market: SimulatedMarket, tmp_path: Path
) -> None:
    stop = asyncio.Event()
    replies: list[str] = []

    async def talk(daemon: Daemon) -> None:
        count = len(api.messages)
        api.inject_message(USER, "/help", user_id=USER)
        await api.wait_for_messages(count + 1, timeout_seconds=WAIT_SECONDS)
        replies.append(api.messages[count].text or "")
        stop.set()

    async with running_simulator(market) as simulator:
        settings = settings_for(api, simulator.api_url, tmp_path)
        secrets = Secrets(TEST_API_KEY, TEST_API_TOKEN, telegram_bot_token=api.token)
        code = await run_daemon(settings, secrets, stop=stop, rules=[], started=talk)

    assert code == 0
    assert "tdbot commands" in replies[0]
    assert api.calls_of("getUpdates")
    assert api.commands


# --- spot searches and deploys -------------------------------------------------------------

# A 4090 hostnode in the United States whose 8 vCPU, 32 GB, 100 GB size costs $0.463/h.
HOST_US_4090 = "0b60f80c-e16a-4cda-a8cd-dbc01cc0512c"


async def test_cheapest_spot_under_cap(chat: Chat) -> None:
    # Bids from 0.188 USD/h win on the US hostnode, whose on-demand price is above the cap.
    chat.market.set_spot_price(HOST_US_4090, GPU_4090, 0.10)

    text = await chat.reply("/cheapest gpu=4090 vcpus=8 ram=32 storage=100 spot price<0.40")

    assert "Cheapest spot hostnodes for 1x 4090" in text
    assert "1. $0.19" in text
    assert f"spot on {HOST_US_4090}" in text
    assert "on-demand $0.4630/h" in text
    assert "checked for spot bids." in text


async def test_cheapest_spot_unchecked_note(chat: Chat) -> None:
    # Every validation call fails, the daemon client's one resend included.
    chat.market.inject_fault("client/spot/validate/new", FaultMode.HTTP_500, count=100)

    text = await chat.reply("/cheapest gpu=4090 vcpus=8 ram=32 storage=100 spot")

    assert "All 4 offers" not in text
    assert "No hostnode accepted" not in text
    assert (
        "Of the 4 offers that can host the spec, 0 were checked for spot bids and 4 could "
        "not be checked." in text
    )
    assert text.count("Not checked: ") == 4
    assert "HTTP 500" in text


async def test_cheapest_spot_bad_credentials(chat: Chat) -> None:
    # The hostnode list needs no credentials, so only the spot validation fails with 401.
    chat.market.api_token = "rotated-token-4c1e77d2"

    text = await chat.reply("/cheapest gpu=4090 vcpus=8 ram=32 storage=100 spot")

    assert text.startswith("⚠️ Spot bids could not be checked")
    assert "the API key and token were rejected" in text
    assert "Not checked" not in text


async def test_cheapest_spot_no_offers(chat: Chat) -> None:
    text = await chat.reply("/cheapest gpu=4090 count=8 spot")

    assert "No hostnode can host this spec (" in text
    assert "checked for spot bids" not in text


async def confirm_spot_deploy(
    chat: Chat, max_usd_per_hour: float, *, country: str = " country='United States'"
) -> tuple[str, str]:
    """Run a spot deploy rule for the 4090 hostnodes of `country` (a spec term, or "" for
    all), confirm its question, and return the question and the outcome message."""
    chat.market.set_spot_price(HOST_US_4090, GPU_4090, 0.10)
    rule = CheapestHostnodeRule.model_validate(
        {
            "name": "spot-4090",
            "kind": "cheapest_hostnode",
            "every": "10m",
            "match": f"gpu={GPU_4090} vcpus=8 ram=32 storage=100{country} spot",
            "deploy": {"enabled": True, "max_usd_per_hour": max_usd_per_hour, "confirm": True},
        }
    )
    chat.daemon.rules.append(rule)
    chat.daemon.snapshots.parts = ALL_PARTS
    result = await chat.daemon.engine.run_rule(rule)
    sent = len(chat.api.messages)
    await chat.bot.on_tick(rule, result)
    question_text = await chat.next_message(sent)
    question = chat.api.messages[sent]

    sent = len(chat.api.messages)
    await chat.press(question, "Confirm")
    return question_text, await chat.next_message(sent)


async def test_spot_deploy_confirmed_bids(chat: Chat) -> None:
    question_text, outcome = await confirm_spot_deploy(chat, 0.50)

    assert question_text.startswith(
        f"⚠️ Deploy spot-4090-1 on hostnode {HOST_US_4090} (spot, bid up to $0.4580/h)"
    )
    assert outcome.startswith("ℹ️ Done: deployed spot-4090-1 (spot, bid $0.1"), outcome
    [vm] = [vm for vm in chat.market.vms.values() if vm.name == "spot-4090-1"]
    assert vm.is_spot
    assert 0.188 <= vm.compute_price < 0.20


async def test_spot_deploy_cap_under_on_demand(chat: Chat) -> None:
    # The cap is under the on-demand $0.463/h, but bids from 0.188 USD/h plus $0.005/h
    # storage fit under it.
    question_text, outcome = await confirm_spot_deploy(chat, 0.30)

    assert "(spot, bid up to $0.2950/h)" in question_text
    assert outcome.startswith("ℹ️ Done: deployed spot-4090-1 (spot, bid $0.1"), outcome
    [vm] = [vm for vm in chat.market.vms.values() if vm.name == "spot-4090-1"]
    assert vm.is_spot
    assert vm.compute_price + 0.005 <= 0.30


async def test_spot_question_names_fallbacks(chat: Chat) -> None:
    # Tokyo is the cheapest on demand, but its lowest bid, 0.40 + 0.088, is above the
    # $0.295/h the cap leaves for a bid, so the VM goes to the next hostnode that accepts.
    host_jp = "58ab3969-87c2-4228-a9ca-0c9fe191f0ef"
    host_nl = "b9ee75b9-b341-4482-a250-86597475ffae"
    chat.market.set_spot_price(host_jp, GPU_4090, 0.40)

    question_text, outcome = await confirm_spot_deploy(chat, 0.30, country="")

    assert question_text.startswith(
        f"⚠️ Deploy spot-4090-1 on hostnode {host_jp}, or on the next of 2 other hostnodes "
        "if it rejects the bid (spot, at most $0.3000/h with storage)"
    )
    assert outcome.startswith("ℹ️ Done: deployed spot-4090-1 (spot, bid $0.2"), outcome
    assert f"on hostnode {host_nl} as VM" in outcome
    [vm] = [vm for vm in chat.market.vms.values() if vm.name == "spot-4090-1"]
    assert vm.hostnode_id == host_nl
    assert vm.compute_price + 0.005 <= 0.30
