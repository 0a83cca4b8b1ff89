"""Inhibition: drop alerts about a VM that is not running, before they are stored.

A VM whose latest stored observation (`Store.latest_vm_observations`) has the status
Outbid, Stopped, StoppedDisassociated or Terminated cannot be idle, and a price alert
about it would be about a machine that is not working. So, for such a VM:

- an `idle_stop` rule raises no alerts and no reports about it;
- a `cheapest_hostnode` rule raises no alerts and no reports that name it. Its current
  alerts name hostnodes and the market, not VMs, so none of them is dropped today.

The engine stores the observations of a tick's snapshot before it evaluates the rules,
so the latest observation is the VM's status in the same snapshot the rule decided on.
A decision names a VM through `evidence["vm_id"]`, or else through its subject, whose
part before the first ":" is the VM id (action failures use "<vm id>:stop-failed").

Some decisions are never dropped. Resolutions are kept, because an open alert must
still close. Critical alerts are kept, because they report failed or unknown actions.
Decisions of other rule kinds are kept too, such as the spot re-bid alerts that exist
because a VM is outbid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from tdbot.evaluation.model import Decision, FireAlert, Report, Severity
from tdbot.store.db import Store
from tdbot.tensordock.models import VmStatus

logger = logging.getLogger("tdbot.alerts.inhibit")

INHIBITING_STATUSES = frozenset(
    {
        VmStatus.OUTBID.value,
        VmStatus.STOPPED.value,
        VmStatus.STOPPED_DISASSOCIATED.value,
        VmStatus.TERMINATED.value,
    }
)

# Rule kinds whose alerts and reports about a VM are dropped while it is not running.
INHIBITED_KINDS = frozenset({"idle_stop", "cheapest_hostnode"})


def decision_vm_id(decision: Decision) -> str:
    """Return the VM a decision is about: `evidence["vm_id"]`, or its subject's first part."""
    vm_id = decision.evidence.get("vm_id")
    if isinstance(vm_id, str) and vm_id:
        return vm_id
    return decision.subject.split(":", 1)[0]


def inhibition_reason(
    decision: Decision, kind: str | None, statuses: Mapping[str, str]
) -> str | None:
    """Say why the decision is dropped, or return None to keep it.

    `statuses` maps VM ids to the status of their latest observation.
    """
    if kind not in INHIBITED_KINDS or not isinstance(decision, FireAlert | Report):
        return None
    if isinstance(decision, FireAlert) and decision.severity is Severity.CRITICAL:
        return None
    vm_id = decision_vm_id(decision)
    status = statuses.get(vm_id)
    if status not in INHIBITING_STATUSES:
        return None
    return f"VM {vm_id} is {status}"


async def drop_inhibited(
    store: Store, rule: str, kind: str | None, decisions: Sequence[Decision]
) -> list[Decision]:
    """Return the decisions without those inhibited because their VM is not running."""
    could_drop = kind in INHIBITED_KINDS and any(
        isinstance(decision, FireAlert | Report) for decision in decisions
    )
    if not could_drop:
        return list(decisions)

    observations = await store.latest_vm_observations()
    statuses = {vm_id: row.status for vm_id, row in observations.items()}
    kept: list[Decision] = []
    for decision in decisions:
        reason = inhibition_reason(decision, kind, statuses)
        if reason is None:
            kept.append(decision)
        else:
            # DEBUG, because the same decision comes back every tick while the VM is down.
            logger.debug("alert %s/%s inhibited: %s", rule, decision.subject, reason)
    return kept
