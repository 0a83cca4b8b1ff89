"""Trust on first use for the SSH host keys of VMs.

The first probe of a VM stores the host key the VM presents (`Store.trust_host_key`). Each
later probe passes the stored key to asyncssh as the only trusted key, so a VM that
presents any other key fails the handshake, and `HostKeyCheck` keeps the presented
key for the message. The stored key's algorithms are offered first, so a server with
keys of several types keeps presenting the stored one.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncssh

from tdbot.store.tables import SshHostKeyRecord

# Host key algorithms offered to the server, strongest first. A fixed list, so the
# type of key a server presents does not change when asyncssh changes its own order.
PREFERRED_HOST_KEY_ALGORITHMS = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
)

# Subject suffix of the critical alert about a changed host key: "<vm id>:ssh-host-key".
HOST_KEY_SUBJECT_SUFFIX = ":ssh-host-key"


@dataclass(frozen=True)
class HostKey:
    """An SSH host key as tdbot stores and reports it."""

    key_type: str
    fingerprint: str
    public_key: str

    @classmethod
    def from_ssh_key(cls, key: asyncssh.SSHKey) -> HostKey:
        return cls(
            key_type=key.get_algorithm(),
            fingerprint=key.get_fingerprint("sha256"),
            public_key=key.export_public_key("openssh").decode("ascii").strip(),
        )

    @classmethod
    def from_record(cls, record: SshHostKeyRecord) -> HostKey:
        return cls(record.key_type, record.fingerprint, record.public_key)

    def describe(self) -> str:
        return f"{self.key_type} {self.fingerprint}"


class HostKeyCheck(asyncssh.SSHClient):
    """asyncssh client that accepts an unknown host key only when none is stored.

    asyncssh calls `validate_host_public_key` for a key that is not in the trusted list
    it was given. The key is kept in `presented` for the error message.
    """

    def __init__(self, trust_first_key: bool) -> None:
        self._trust_first_key = trust_first_key
        self.presented: HostKey | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = HostKey.from_ssh_key(key)
        return self._trust_first_key


def trusted_keys(
    stored: HostKey | None,
) -> tuple[list[asyncssh.SSHKey], list[object], list[object]]:
    """Return asyncssh's `known_hosts` lists (host keys, CA keys, revoked keys).

    Empty lists, rather than None, keep asyncssh from reading ~/.ssh/known_hosts and
    make it ask `HostKeyCheck` about the key.
    """
    if stored is None:
        return [], [], []
    return [asyncssh.import_public_key(stored.public_key)], [], []


def host_key_algorithms(stored: HostKey | None) -> list[str]:
    """Return the host key algorithms to offer: the stored key's first, then the rest."""
    first: list[str] = []
    if stored is not None:
        key = asyncssh.import_public_key(stored.public_key)
        first = [algorithm.decode("ascii") for algorithm in key.sig_algorithms]
    rest = [name for name in PREFERRED_HOST_KEY_ALGORITHMS if name not in first]
    return first + rest


def host_key_subject(vm_id: str) -> str:
    return vm_id + HOST_KEY_SUBJECT_SUFFIX


def forget_hint(vm_id: str) -> str:
    """Say how to make tdbot trust a VM's new host key."""
    # Text for the user to run by hand; tdbot never executes it.
    statement = f"DELETE FROM ssh_host_key WHERE vm_id = '{vm_id}'"  # noqa: S608
    return (
        f"if the VM was reinstalled, check the new key and forget the old one with "
        f"Store.forget_host_key('{vm_id}'), or in the database with {statement}; "
        "the next probe trusts the new key"
    )
