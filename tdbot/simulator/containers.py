"""Minimal container state for the `client/container/*` endpoints.

NOTE: replicas take no stock, ports or money from the market; the endpoints only
need to respond in their documented shapes. Model them as VMs if a rule ever
acts on containers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tdbot.simulator.errors import bad_request
from tdbot.simulator.forms import (
    Form,
    optional_float,
    optional_int,
    parse_text_list,
    required_int,
    required_text,
)
from tdbot.simulator.hostnodes import SimHostnode
from tdbot.simulator.vms import price


@dataclass
class SimReplica:
    vm_uuid: str
    hostnode_id: str
    ip_address: str
    external_ports: list[int]
    internal_ports: list[int]
    rate_hourly: float
    hostnode_uptime_url: str | None

    def to_api(self) -> dict[str, Any]:
        return {
            "external_ports": list(self.external_ports),
            "hostnode_uptime_url": self.hostnode_uptime_url,
            "internal_ports": list(self.internal_ports),
            "ip_address": self.ip_address,
            "rate_hourly": price(self.rate_hourly),
            "vm_uuid": self.vm_uuid,
        }


@dataclass
class ContainerSpec:
    display_name: str
    image_name: str
    gpu_models: list[str]
    gpu_count: int
    vcpus: int
    ram: int
    storage: int
    networking_port: int | None
    max_vm_rate_hourly: float | None


@dataclass
class SimContainer:
    id: str
    spec: ContainerSpec
    replicas: list[SimReplica] = field(default_factory=list)
    stopped: bool = False

    def to_state(self) -> dict[str, Any]:
        """Return the container as the admin state endpoint shows it."""
        return {
            "display_name": self.spec.display_name,
            "image_name": self.spec.image_name,
            "replicas": [replica.to_api() for replica in self.replicas],
            "stopped": self.stopped,
        }


def parse_container_form(form: Form) -> tuple[ContainerSpec, int]:
    """Parse `client/container/deploy` into a spec and the replica count."""
    gpu_models = parse_text_list(form, "gpu_models")
    if not gpu_models:
        raise bad_request("Missing required field: gpu_models")
    spec = ContainerSpec(
        display_name=required_text(form, "display_name"),
        image_name=required_text(form, "image_name"),
        gpu_models=gpu_models,
        gpu_count=required_int(form, "gpu_count"),
        vcpus=required_int(form, "vcpus"),
        ram=required_int(form, "ram"),
        storage=required_int(form, "storage"),
        networking_port=optional_int(form, "networking_port"),
        max_vm_rate_hourly=optional_float(form, "max_vm_rate_hourly"),
    )
    replicas = required_int(form, "replicas")
    if replicas < 1:
        raise bad_request(f"Invalid replicas: {replicas}, expected at least 1")
    return spec, replicas


def _rate(spec: ContainerSpec, host: SimHostnode, model: str) -> float:
    return (
        host.gpus[model].price * spec.gpu_count
        + host.cpu_price * spec.vcpus
        + host.ram_price * spec.ram
        + host.storage_price * spec.storage
    )


def _offers(spec: ContainerSpec, hosts: Iterable[SimHostnode]) -> list[tuple[float, SimHostnode]]:
    offers: list[tuple[float, SimHostnode]] = []
    for host in hosts:
        if not host.deployable or len(host.ports) < 2:
            continue
        for model in spec.gpu_models:
            stock = host.gpus.get(model)
            if stock is None or stock.amount < spec.gpu_count:
                continue
            rate = _rate(spec, host, model)
            if spec.max_vm_rate_hourly is None or rate <= spec.max_vm_rate_hourly:
                offers.append((rate, host))
    offers.sort(key=lambda offer: (offer[0], offer[1].id))
    return offers


def place_replicas(
    spec: ContainerSpec, count: int, hosts: Iterable[SimHostnode]
) -> list[SimReplica]:
    """Place `count` replicas on the cheapest fitting hostnodes, spreading round-robin."""
    offers = _offers(spec, hosts)
    if not offers:
        raise bad_request("No hostnode can run this container within max_vm_rate_hourly")
    internal = [22] + ([spec.networking_port] if spec.networking_port else [])
    replicas: list[SimReplica] = []
    for index in range(count):
        rate, host = offers[index % len(offers)]
        replicas.append(
            SimReplica(
                vm_uuid=str(uuid.uuid4()),
                hostnode_id=host.id,
                ip_address=host.ip_address,
                external_ports=host.ports[: len(internal)],
                internal_ports=internal,
                rate_hourly=rate,
                hostnode_uptime_url=host.report.rstrip("/") if host.report else None,
            )
        )
    return replicas
