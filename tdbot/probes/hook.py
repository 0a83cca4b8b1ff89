"""The rule engine's call into the probes, made before it evaluates a rule."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from tdbot.evaluation.model import Decision, MarketSnapshot
from tdbot.rules.schema import IdleStopRule, RuleBase
from tdbot.store.db import Store

if TYPE_CHECKING:
    from tdbot.config import SshSettings
    from tdbot.probes.ssh import SshProbe

logger = logging.getLogger("tdbot.probes")

SSH_SOURCE = "ssh"


class ProbeHook:
    """Probe the VMs of idle_stop rules with "ssh" in `sources`, once per tick of the rule.

    The `SshProbe` is built from `settings` the first time such a rule ticks, so a
    daemon without SSH rules never imports asyncssh, and a rule added by a reload still
    gets probed. Without either (SSH probing not set up), the rule's VMs get no SSH
    samples, so none of them is judged idle from SSH readings; a warning is logged once
    per rule.
    """

    def __init__(self, ssh: SshProbe | None, settings: SshSettings | None = None) -> None:
        self._ssh = ssh
        self._settings = settings
        self._warned_rules: set[str] = set()

    def _probe(self) -> SshProbe | None:
        if self._ssh is None and self._settings is not None:
            from tdbot.probes.ssh import SshProbe

            self._ssh = SshProbe(self._settings)
        return self._ssh

    async def before_evaluation(
        self, rule: RuleBase, snapshot: MarketSnapshot, store: Store, now: datetime
    ) -> list[Decision]:
        """Probe and store samples for `rule`'s VMs; return the alerts the rule should raise.

        Does nothing for other rules, and while the VM list is unknown, because the
        evaluation reports that itself.
        """
        if not isinstance(rule, IdleStopRule) or SSH_SOURCE not in rule.sources:
            return []
        if snapshot.vms is None:
            return []
        probe = self._probe()
        if probe is None:
            self._warn_once(rule.name)
            return []
        result = await probe.probe_vms(
            snapshot.vms.values(), store, now, rule=rule.name, matcher=rule.select.matches
        )
        return result.decisions

    def _warn_once(self, rule: str) -> None:
        if rule in self._warned_rules:
            return
        self._warned_rules.add(rule)
        logger.warning(
            "rule %s reads idle signals over SSH, but SSH probing is not set up in this "
            "daemon, so its VMs get no SSH samples and are not judged idle from them",
            rule,
        )
