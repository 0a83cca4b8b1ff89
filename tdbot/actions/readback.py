"""Read-back: poll a VM after a change until it shows the expected status."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass

from tdbot.actions.journal import JournalEntry
from tdbot.tensordock.client import TensorDockClient
from tdbot.tensordock.errors import NotFoundError, TensorDockError
from tdbot.tensordock.models import VirtualMachine, VmStatus


@dataclass(frozen=True)
class ReadBack:
    """Result of polling: the last VM read (None if none could be read) and the last error."""

    vm: VirtualMachine | None
    reached: bool
    checks: int
    last_error: str | None = None

    def describe(self, vm_id: str, expected: Collection[VmStatus]) -> str:
        """Say why the expected status was not seen, for a failed or unknown action."""
        expected_text = " or ".join(status.value for status in expected)
        if self.vm is None:
            return (
                f"VM {vm_id} could not be read back in {self.checks} checks "
                f"({self.last_error or 'no response'}), so whether it is {expected_text} is unknown"
            )
        return (
            f"VM {vm_id} is {self.vm.status.value}, not {expected_text}, after {self.checks} checks"
        )


async def read_back(
    client: TensorDockClient,
    entry: JournalEntry,
    vm_id: str,
    expected: Collection[VmStatus],
    *,
    attempts: int,
    interval_seconds: float,
) -> ReadBack:
    """Read the VM until its status is one of `expected`, at most `attempts` times."""
    vm: VirtualMachine | None = None
    last_error: str | None = None
    for check in range(1, attempts + 1):
        try:
            vm = await client.get_vm(vm_id)
        except NotFoundError as error:
            entry.note("client/get/single", vm_id, f"not found: {error}")
            last_error = str(error)
        except TensorDockError as error:
            entry.note("client/get/single", vm_id, f"{type(error).__name__}: {error}")
            last_error = str(error)
        else:
            entry.note("client/get/single", vm_id, f"ok: {vm.status.value}")
            if vm.status in expected:
                return ReadBack(vm=vm, reached=True, checks=check)

        if check < attempts:
            await asyncio.sleep(interval_seconds)
    return ReadBack(vm=vm, reached=False, checks=attempts, last_error=last_error)
