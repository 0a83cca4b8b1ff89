"""The chat commands: each takes a `CommandRequest` and returns the reply as a `Message`.

Nothing here touches Telegram types, so the commands read like the rest of tdbot and
the Telegram layer (`tdbot.bot.app`) only routes updates and sends replies. A command
with wrong arguments raises `UsageError`; the caller replies with its usage line.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime

from tdbot import history
from tdbot.actions.spot_bids import quote_spot_offers
from tdbot.alerts import silence
from tdbot.bot.access import Allowlist
from tdbot.bot.arguments import (
    UsageError,
    check_gpu_names_offered,
    find_vm,
    parse_duration_argument,
    parse_hostnode_spec,
)
from tdbot.bot.chat_actions import (
    CHAT_RULE,
    NotAllowedNow,
    ask_start,
    ask_stop,
    decision_kind,
    fresh_snapshot,
)
from tdbot.bot.confirmations import Confirmations, Question
from tdbot.bot.views import (
    PAUSED_UNTIL_RESUMED,
    IdleView,
    RuleStatus,
    alerts_message,
    balance_message,
    cheapest_message,
    error_message,
    moment,
    rules_message,
    status_message,
    vm_message,
    vms_message,
    why_message,
)
from tdbot.daemon.runner import Daemon
from tdbot.daemon.snapshot import ALL_PARTS
from tdbot.evaluation.idle import judge_vm
from tdbot.evaluation.model import MarketSnapshot
from tdbot.evaluation.pricing import count_rejections, rank_hostnodes
from tdbot.notify.base import Message
from tdbot.rules.schema import HostnodeSpec, IdleStopRule
from tdbot.spec import SpecError, parse_terms, spec_fields
from tdbot.store.tables import ActionRecord, AlertState, DecisionRecord
from tdbot.tensordock.errors import AuthenticationError
from tdbot.tensordock.models import Hostnode, VirtualMachine, VmStatus

logger = logging.getLogger("tdbot.bot.commands")

# /status waits this long for the API before it reports that the API timed out.
STATUS_API_TIMEOUT_SECONDS = 15.0
# Decisions read back to find the one behind an action; far more than a rule makes at once.
WHY_DECISION_LOOKBACK = 500
RELEASE_FLAG = "--release"
# /prices shows this many days without DAYS, and at most the default retention.
PRICES_DEFAULT_DAYS = 30.0
PRICES_MAX_DAYS = 400.0
# Telegram's limit on a photo caption, in characters.
PHOTO_CAPTION_LIMIT = 1024
# Offers /cheapest with the spot term checks for spot bids, cheapest on-demand first.
# Each takes up to 7 validation calls, and the reply waits for all of them.
CHEAPEST_SPOT_CHECKS = 5
# The spec terms /prices takes after the GPU and days, to size the priced deployment.
PRICES_SIZE_TERMS = ("count", "vcpus", "ram", "storage")


@dataclass(frozen=True)
class CommandSpec:
    """A command's name, arguments and one-line description, for /help and the menu."""

    name: str
    arguments: str
    description: str

    @property
    def usage(self) -> str:
        return f"/{self.name} {self.arguments}".rstrip()


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("help", "", "list the commands"),
    CommandSpec("status", "", "daemon health: uptime, rules, API"),
    CommandSpec("vms", "", "the account's VMs with their hourly cost"),
    CommandSpec("vm", "NAME_OR_ID", "one VM: price, spot bid, idle verdict"),
    CommandSpec("balance", "", "balance, burn rate and runway"),
    CommandSpec(
        "cheapest",
        "gpu=MODEL[,MODEL] [count=N] [vcpus=N] [ram=GB] [storage=GB] [price<USD] "
        "[country=NAME] [spot] [top=N]",
        "cheapest hostnodes for a spec",
    ),
    CommandSpec("rules", "", "rules with schedule and pause state"),
    CommandSpec("pause", "RULE [DURATION]", "pause a rule, until /resume without DURATION"),
    CommandSpec("resume", "RULE", "resume a paused rule"),
    CommandSpec("alerts", "", "open alerts"),
    CommandSpec("silence", "ALERT DURATION", "silence an alert (DURATION or 'resolved')"),
    CommandSpec("unsilence", "ALERT", "lift an alert's silence"),
    CommandSpec("why", "ACTION_ID", "a journal entry and the decision behind it"),
    CommandSpec(
        "prices",
        "GPU [DAYS] [count=N vcpus=N ram=N storage=N]",
        "best full price history of a GPU, 30 days by default",
    ),
    CommandSpec("start_vm", "NAME_OR_ID", "start a stopped VM, after a confirmation"),
    CommandSpec("stop_vm", "NAME_OR_ID [--release]", "stop a VM, after a confirmation"),
)
SPECS = {spec.name: spec for spec in COMMANDS}


@dataclass(frozen=True)
class Photo:
    """A picture reply: PNG bytes and a plain-text caption."""

    png: bytes
    caption: str


@dataclass(frozen=True)
class CommandRequest:
    """One command as typed: who sent it where, and the text after the command."""

    chat_id: int
    user_id: int
    text: str = ""

    @property
    def words(self) -> list[str]:
        return self.text.split()


@dataclass
class TickLog:
    """When each rule last finished a scheduled tick, as the daemon reported it."""

    finished_at: dict[str, datetime] = field(default_factory=dict)


def usage_message(spec: CommandSpec, problem: str) -> Message:
    """Build the reply to invalid arguments: the usage line and what is wrong."""
    return Message(title=f"Usage: {spec.usage}", lines=(problem,), severity="warning")


class Commands:
    """Every chat command of the bot, bound to one running daemon."""

    def __init__(
        self,
        daemon: Daemon,
        *,
        allowlist: Allowlist,
        confirmations: Confirmations,
        ticks: TickLog,
    ) -> None:
        self._daemon = daemon
        self._allowlist = allowlist
        self._confirmations = confirmations
        self._ticks = ticks

    def _now(self) -> datetime:
        return self._daemon.clock.now()

    # --- help and status -----------------------------------------------------------

    async def help(self, request: CommandRequest) -> Message:
        lines = [f"{spec.usage}: {spec.description}" for spec in COMMANDS]
        lines.append("Durations are such as 30m, 2h or 1d.")
        return Message(title="tdbot commands", lines=tuple(lines))

    async def status(self, request: CommandRequest) -> Message:
        _no_arguments(request, "status")
        daemon = self._daemon
        snapshot, snapshot_error = await self._shared_snapshot()
        rules = [
            RuleStatus(
                rule=rule,
                last_tick_at=self._ticks.finished_at.get(rule.name),
                last_result=daemon.engine.last_results.get(rule.name),
                next_run_at=self._next_run(rule.name),
                paused_until=await daemon.store.paused_until(rule.name),
            )
            for rule in daemon.rules
        ]
        executor = daemon.executor
        return status_message(
            now=self._now(),
            started_at=daemon.started_at,
            dry_run=executor.dry_run if executor is not None else daemon.settings.safety.dry_run,
            rules=rules,
            snapshot=snapshot,
            snapshot_error=snapshot_error,
            rejected_updates=self._allowlist.rejected,
        )

    async def _shared_snapshot(self) -> tuple[MarketSnapshot | None, str | None]:
        # The rules' shared snapshot, fetched anew only when it is older than its max age.
        try:
            async with asyncio.timeout(STATUS_API_TIMEOUT_SECONDS):
                return await self._daemon.snapshots.get(), None
        except TimeoutError:
            return None, f"the API did not answer within {STATUS_API_TIMEOUT_SECONDS:.0f} s"

    def _next_run(self, rule_name: str) -> datetime | None:
        scheduler = self._daemon.scheduler
        if scheduler is None:
            return None
        job = scheduler.get_job(f"rule:{rule_name}")
        next_run: datetime | None = getattr(job, "next_run_time", None)
        return next_run

    # --- VMs, balance, hostnodes -----------------------------------------------------

    async def vms(self, request: CommandRequest) -> Message:
        _no_arguments(request, "vms")
        snapshot = await self._snapshot(frozenset({"vms"}))
        if snapshot.vms is None:
            return _load_failed(snapshot, "vms", "VM list")
        return vms_message(snapshot)

    async def vm(self, request: CommandRequest) -> Message:
        reference = _one_reference(request)
        snapshot = await self._snapshot(frozenset({"vms"}))
        if snapshot.vms is None:
            return _load_failed(snapshot, "vms", "VM list")
        vm = find_vm(snapshot.vms, reference)
        return vm_message(vm, await self._idle_views(vm))

    async def _idle_views(self, vm: VirtualMachine) -> list[IdleView]:
        """Judge the VM with every idle_stop rule that watches it, from the stored samples."""
        now = self._now()
        views = []
        for rule in self._daemon.rules:
            if not isinstance(rule, IdleStopRule) or not rule.select.matches(vm.id, vm.name):
                continue
            state = await self._daemon.store.load_rule_state(
                rule.name, idle_lookback=rule.window, now=now
            )
            warning = state.idle_warnings.get(vm.id)
            if vm.status is not VmStatus.RUNNING:
                note = f"not judged, because the VM is {vm.status.value}"
                views.append(IdleView(rule.name, None, warning, note))
                continue
            views.append(IdleView(rule.name, judge_vm(rule, vm.id, state, now), warning))
        return views

    async def balance(self, request: CommandRequest) -> Message:
        _no_arguments(request, "balance")
        snapshot = await self._snapshot(ALL_PARTS)
        if snapshot.balance is None:
            return _load_failed(snapshot, "balance", "balance")
        return balance_message(snapshot.balance, snapshot, self._now())

    async def cheapest(self, request: CommandRequest) -> Message:
        if not request.text.strip():
            raise UsageError("give a spec, such as gpu=4090 count=1 price<0.8")
        spec, top = parse_hostnode_spec(request.text)
        snapshot = await self._snapshot(frozenset({"hostnodes"}))
        if snapshot.hostnodes is None:
            return _load_failed(snapshot, "hostnodes", "hostnode list")
        offered = {model for node in snapshot.hostnodes.values() for model in node.specs.gpu}
        check_gpu_names_offered(request.text, offered)
        if spec.spot:
            return await self._cheapest_spot(spec, top, snapshot.hostnodes)
        offers = rank_hostnodes(snapshot.hostnodes, spec)[:top]
        rejections = {} if offers else count_rejections(snapshot.hostnodes, spec)
        return cheapest_message(spec, offers, rejections)

    async def _cheapest_spot(
        self, spec: HostnodeSpec, top: int, hostnodes: dict[str, Hostnode]
    ) -> Message:
        """Check the cheapest on-demand offers for spot bids and list the accepted ones.

        The price cap applies to the spot price (bid plus storage), so the on-demand
        ranking is taken without it.
        """
        uncapped = spec.model_copy(update={"max_usd_per_hour": None})
        candidates = rank_hostnodes(hostnodes, uncapped)[:CHEAPEST_SPOT_CHECKS]
        if not candidates:
            return cheapest_message(spec, [], count_rejections(hostnodes, uncapped))
        try:
            checks = await quote_spot_offers(
                self._daemon.client, candidates, ceiling_usd_per_hour=spec.max_usd_per_hour
            )
        except AuthenticationError as error:
            logger.warning("/cheapest: spot bids not checked: %s", error)
            return error_message(f"Spot bids could not be checked: {error}")
        return cheapest_message(
            spec, [], {}, spot_checks=checks, spot_check_limit=CHEAPEST_SPOT_CHECKS, top=top
        )

    async def _snapshot(self, parts: frozenset[str]) -> MarketSnapshot:
        return await fresh_snapshot(self._daemon.client, self._daemon.clock, parts)

    async def prices(self, request: CommandRequest) -> Message | Photo:
        """Reply with a chart of the price history, or text without the `charts` extra."""
        gpu, days, size = _prices_arguments(request)
        store = self._daemon.store
        try:
            gpu_model = history.resolve_gpu_model(gpu, await store.price_history_models())
        except ValueError as error:
            return error_message(f"{str(error)[:1].upper()}{str(error)[1:]}.")
        report = await history.load_report(store, gpu_model, size, days=days, until=self._now())
        if not history.has_prices(report):
            message = history.no_history_message(report, days)
            return error_message(f"{message[:1].upper()}{message[1:]}.")
        text = history.format_text(report)
        try:
            png = history.render_png(report)
        except ImportError:
            return Message(title=f"Prices of {gpu_model}", lines=tuple(text.splitlines()))
        return Photo(png=png, caption=text[:PHOTO_CAPTION_LIMIT])

    # --- rules -------------------------------------------------------------------------

    async def rules(self, request: CommandRequest) -> Message:
        _no_arguments(request, "rules")
        store = self._daemon.store
        paused = {}
        for rule in self._daemon.rules:
            until = await store.paused_until(rule.name)
            if until is not None:
                paused[rule.name] = until
        global_dry_run = self._daemon.executor is not None and self._daemon.executor.dry_run
        return rules_message(self._daemon.rules, paused, global_dry_run, self._now())

    async def pause(self, request: CommandRequest) -> Message:
        words = request.words
        if not 1 <= len(words) <= 2:
            raise UsageError("give a rule name and, optionally, a duration such as 2h")
        name = self._rule_name(words[0])
        duration = parse_duration_argument(words[1]) if len(words) == 2 else None
        until = PAUSED_UNTIL_RESUMED if duration is None else self._now() + duration
        await self._daemon.store.set_paused_until(name, until)
        logger.info("rule %s paused until %s by user %d", name, until.isoformat(), request.user_id)
        if duration is None:
            return Message(title=f"Rule {name} is paused until /resume {name}.")
        return Message(title=f"Rule {name} is paused until {moment(until)}.")

    async def resume(self, request: CommandRequest) -> Message:
        words = request.words
        if len(words) != 1:
            raise UsageError("give exactly one rule name")
        name = self._rule_name(words[0])
        was_paused = await self._daemon.store.paused_until(name)
        await self._daemon.store.set_paused_until(name, None)
        logger.info("rule %s resumed by user %d", name, request.user_id)
        if was_paused is None or was_paused <= self._now():
            return Message(title=f"Rule {name} was not paused; it runs on its schedule.")
        return Message(title=f"Rule {name} is resumed and runs at its next scheduled time.")

    def _rule_name(self, name: str) -> str:
        names = [rule.name for rule in self._daemon.rules]
        if name not in names:
            loaded = ", ".join(names) or "none"
            raise UsageError(f"no rule is named {name!r}; loaded rules: {loaded}")
        return name

    # --- alerts ------------------------------------------------------------------------

    async def alerts(self, request: CommandRequest) -> Message:
        _no_arguments(request, "alerts")
        alerts = await self._daemon.store.list_alerts(state=AlertState.FIRING)
        return alerts_message(alerts, self._now())

    async def silence(self, request: CommandRequest) -> Message:
        words = request.words
        if len(words) != 2:
            raise UsageError("give an alert (an id such as 12, or rule/subject) and a duration")
        try:
            duration = silence.parse_silence_duration(words[1])
            text = await silence.silence_alert_by_ref(
                self._daemon.store, words[0], duration, self._now()
            )
        except ValueError as error:
            raise UsageError(str(error)) from None
        logger.info("user %d: /silence %s %s: %s", request.user_id, words[0], words[1], text)
        return Message(title=text)

    async def unsilence(self, request: CommandRequest) -> Message:
        words = request.words
        if len(words) != 1:
            raise UsageError("give exactly one alert: an id such as 12, or rule/subject")
        try:
            text = await silence.unsilence_alert_by_ref(self._daemon.store, words[0], self._now())
        except ValueError as error:
            raise UsageError(str(error)) from None
        logger.info("user %d: /unsilence %s: %s", request.user_id, words[0], text)
        return Message(title=text)

    # --- journal -----------------------------------------------------------------------

    async def why(self, request: CommandRequest) -> Message:
        words = request.words
        if len(words) != 1 or not words[0].lstrip("#").isdigit():
            raise UsageError("give one action id, a number such as 12")
        action_id = int(words[0].lstrip("#"))
        action = await self._daemon.store.get_action(action_id)
        if action is None:
            return error_message(f"Action {action_id} is not in the journal.")
        return why_message(action, await self._decisions_behind(action))

    async def _decisions_behind(self, action: ActionRecord) -> list[DecisionRecord]:
        """Find the decision that led to the action.

        A rule run stores its decisions when it finishes, after its actions were
        journaled, so the first matching decision stored at or after the action is
        the one. A deploy confirmed later was decided before its action, so the
        latest matching decision before it is taken instead.
        """
        records = await self._daemon.store.recent_decisions(
            rule=action.rule, limit=WHY_DECISION_LOOKBACK
        )
        kind = decision_kind(action.kind)
        subjects = {action.subject, action.vm_id, action.params.get("hostnode_id")}
        matching = sorted(
            (r for r in records if r.kind == kind and r.subject in subjects),
            key=lambda record: record.id or 0,
        )
        after = [r for r in matching if r.created_at >= action.created_at]
        if after:
            return after[:1]
        return matching[-1:]

    # --- actions that ask first -----------------------------------------------------------

    async def start_vm(self, request: CommandRequest) -> Message:
        reference = _one_reference(request)
        snapshot = await self._snapshot(ALL_PARTS)
        vm = self._listed_vm(snapshot, reference)
        try:
            question = ask_start(vm, snapshot=snapshot)
        except NotAllowedNow as reason:
            return error_message(str(reason))
        return await self._ask(question, request)

    async def stop_vm(self, request: CommandRequest) -> Message:
        words = request.text.split()
        release = RELEASE_FLAG in words
        reference = " ".join(word for word in words if word != RELEASE_FLAG)
        flags = [word for word in words if word.startswith("--") and word != RELEASE_FLAG]
        if flags:
            raise UsageError(f"unknown option {flags[0]}; the only option is {RELEASE_FLAG}")
        if not reference:
            raise UsageError("give the name or id of a VM")
        snapshot = await self._snapshot(frozenset({"vms"}))
        vm = self._listed_vm(snapshot, reference)
        try:
            question = ask_stop(vm, release=release, snapshot=snapshot)
        except NotAllowedNow as reason:
            return error_message(str(reason))
        return await self._ask(question, request)

    def _listed_vm(self, snapshot: MarketSnapshot, reference: str) -> VirtualMachine:
        if snapshot.vms is None:
            error = snapshot.errors.get("vms", "no error recorded")
            raise UsageError(f"the VM list failed to load ({error}), so no VM can be chosen")
        return find_vm(snapshot.vms, reference)

    async def _ask(self, question: Question, request: CommandRequest) -> Message:
        record = await self._confirmations.create(
            question,
            origin=CHAT_RULE.name,
            now=self._now(),
            chat_id=request.chat_id,
            user_id=request.user_id,
        )
        logger.info(
            "user %d asked to %s %s; confirmation %s sent",
            request.user_id,
            question.action,
            question.subject,
            record.id,
        )
        return self._confirmations.question_message(record)


def _prices_arguments(request: CommandRequest) -> tuple[str, float, history.DeploymentSize]:
    words = request.words
    if not words:
        raise UsageError(
            "give a GPU, such as 4090 or geforcertx4090-pcie-24gb, optional days, and "
            "optional sizes such as count=2 vcpus=16"
        )
    days = PRICES_DEFAULT_DAYS
    rest = words[1:]
    if rest and "=" not in rest[0]:
        days = _prices_days(rest[0])
        rest = rest[1:]
    return words[0], days, _prices_size(" ".join(rest))


def _prices_days(word: str) -> float:
    try:
        days = float(word)
    except ValueError:
        raise UsageError(f"DAYS must be a number, not {word!r}") from None
    if not 0 < days <= PRICES_MAX_DAYS:
        raise UsageError(f"DAYS must be over 0 and at most {PRICES_MAX_DAYS:g}, not {days:g}")
    return days


def _prices_size(text: str) -> history.DeploymentSize:
    """Read size terms such as "count=2 vcpus=16"; the terms not given keep the rule defaults."""
    try:
        fields = spec_fields(parse_terms(text, PRICES_SIZE_TERMS))
    except SpecError as error:
        # The column would count from the first size term, not from the command, so
        # the message goes without it.
        raise UsageError(f"size: {error.message}") from None
    return history.DeploymentSize.of(HostnodeSpec(gpu=["any"], **fields))


def _no_arguments(request: CommandRequest, name: str) -> None:
    if request.text.strip():
        raise UsageError(f"/{name} takes no arguments, but got {request.text.strip()!r}")


def _one_reference(request: CommandRequest) -> str:
    # The whole text is the reference, so VM names with spaces need no quotes.
    reference = request.text.strip()
    if not reference:
        raise UsageError("give the name or id of a VM; /vms lists them")
    return reference


def _load_failed(snapshot: MarketSnapshot, part: str, what: str) -> Message:
    error = snapshot.errors.get(part, "no error recorded")
    return error_message(f"The {what} failed to load: {error}")
