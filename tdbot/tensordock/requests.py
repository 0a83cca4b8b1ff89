"""Request models of the TensorDock v0 API and their form encoding.

Every v0 endpoint takes `application/x-www-form-urlencoded` fields, all of them
strings: port lists as a set-like "{a, b}", booleans as "true"/"false", and
cloud-init text with its newlines sent as the two characters backslash and n.
The models hold typed values, and `to_form()` produces the wire fields without the
credentials, which the client adds itself.

Fields that may carry secrets (password, cloud-init script, environment variables)
are left out of `repr()`, and pydantic errors never echo input values.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Operating systems accepted by `operating_system` and their minimum storage in GB,
# as TensorDock's white-label dashboard lists them. The API may accept others.
OS_MIN_STORAGE_GB: dict[str, int] = {
    "Ubuntu 20.04 LTS": 20,
    "Ubuntu 22.04 LTS": 20,
    "Ubuntu 24.04 LTS": 20,
    "TensorML 20 TensorFlow": 40,
    "TensorML 20 PyTorch": 40,
    "TensorML 20 Everything": 60,
    "TensorML 20 RAPIDS": 40,
    "TensorML 24 TensorFlow": 40,
    "TensorML 24 PyTorch": 40,
    "TensorML 24 Everything": 60,
    "Windows 10": 90,
}


class RequestModel(BaseModel):
    """Base of the request models: unknown fields are errors, and inputs stay out of errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def format_bool(value: bool) -> str:
    return "true" if value else "false"


def format_port_set(ports: list[int]) -> str:
    """Format ports as the API's set-like list, for example "{22, 8888}"."""
    return "{" + ", ".join(str(port) for port in ports) + "}"


def format_decimal(value: float) -> str:
    """Format a price without exponent or trailing zeros, for example 0.3 as "0.3"."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def escape_newlines(script: str) -> str:
    """Replace each line break by the two characters backslash and n, as the API expects."""
    return script.replace("\r\n", "\n").replace("\n", "\\n")


class DeployRequest(RequestModel):
    """A virtual machine to deploy with `client/deploy/single`.

    `external_ports[i]` on the hostnode forwards to `internal_ports[i]` in the VM, and the
    external ports must come from the hostnode's free `networking.ports`. A set
    `spot_bid_usd_per_hour` deploys a spot VM bidding that price for its compute.
    """

    name: str
    hostnode_id: str
    gpu_model: str
    gpu_count: int
    vcpus: int
    ram_gb: int
    storage_gb: int
    operating_system: str = "Ubuntu 22.04 LTS"
    external_ports: list[int] = Field(default_factory=list)
    internal_ports: list[int] = Field(default_factory=list)
    password: str | None = Field(default=None, repr=False)
    ssh_public_key: str | None = None
    cloudinit_script: str | None = Field(default=None, repr=False)
    spot_bid_usd_per_hour: float | None = None

    def problems(self) -> list[str]:
        """Return what the API would reject in this request, one sentence each."""
        found: list[str] = []
        if not self.name.strip():
            found.append("name is empty, so give the VM a name")
        if self.gpu_count < 1:
            found.append(f"gpu_count is {self.gpu_count}, but a deployment needs at least 1 GPU")
        found.extend(vcpu_problems(self.vcpus))
        if self.ram_gb < 1:
            found.append(f"ram_gb is {self.ram_gb}, but it must be at least 1")
        found.extend(self._storage_problems())
        found.extend(_port_problems(self.external_ports, self.internal_ports))
        if not self.password and not self.ssh_public_key:
            found.append("neither password nor ssh_public_key is set, so nobody could log in")
        if self.spot_bid_usd_per_hour is not None and self.spot_bid_usd_per_hour <= 0:
            found.append(
                f"spot_bid_usd_per_hour is {self.spot_bid_usd_per_hour}, but it must be positive"
            )
        return found

    def _storage_problems(self) -> list[str]:
        minimum = OS_MIN_STORAGE_GB.get(self.operating_system, 1)
        if self.storage_gb >= minimum:
            return []
        return [
            f"storage_gb is {self.storage_gb}, but {self.operating_system!r} needs at least "
            f"{minimum} GB"
        ]

    def to_form(self) -> dict[str, str]:
        """Encode the request as the API's form fields, without the credentials."""
        form = {
            "name": self.name,
            "hostnode": self.hostnode_id,
            "gpu_model": self.gpu_model,
            "gpu_count": str(self.gpu_count),
            "vcpus": str(self.vcpus),
            "ram": str(self.ram_gb),
            "storage": str(self.storage_gb),
            "operating_system": self.operating_system,
            "external_ports": format_port_set(self.external_ports),
            "internal_ports": format_port_set(self.internal_ports),
        }
        if self.password:
            form["password"] = self.password
        if self.ssh_public_key:
            form["ssh_key"] = self.ssh_public_key
        if self.cloudinit_script:
            form["cloudinit_script"] = escape_newlines(self.cloudinit_script)
        if self.spot_bid_usd_per_hour is not None:
            form["price_type"] = "spot"
            form["price"] = format_decimal(self.spot_bid_usd_per_hour)
        return form


def vcpu_problems(vcpus: int) -> list[str]:
    """Return the reason the API would reject this vCPU count: it must be even and positive."""
    if vcpus >= 2 and vcpus % 2 == 0:
        return []
    return [
        f"vcpus is {vcpus}, but the API accepts only an even vCPU count, "
        f"so use {max(2, vcpus + vcpus % 2)}"
    ]


def _port_problems(external: list[int], internal: list[int]) -> list[str]:
    found: list[str] = []
    if len(external) != len(internal):
        found.append(
            f"external_ports and internal_ports differ in length ({len(external)} and "
            f"{len(internal)}), but each external port needs exactly one internal port"
        )
    invalid = [port for port in (*external, *internal) if not 1 <= port <= 65535]
    if invalid:
        found.append(f"ports {invalid} are outside 1-65535")
    if len(set(external)) != len(external):
        found.append(f"external_ports {external} contains a port twice")
    return found


class ContainerDeployRequest(RequestModel):
    """A container deployment for `client/container/deploy`, with the SDK's fields.

    Sizes are per replica: `ram_gb`, `vcpus` and `storage_gb` for each replica, and
    `max_vm_rate_hourly` caps each replica's VM price in USD per hour.
    """

    display_name: str
    project_id: str
    image_name: str
    registry_type: Literal["public", "private"] = "public"
    gpu_count: int
    gpu_models: list[str]
    replicas: int = 1
    ram_gb: int
    vcpus: int
    storage_gb: int
    networking_port: int
    environment_variables: dict[str, str] = Field(default_factory=dict, repr=False)
    volumes: list[str] = Field(default_factory=list)
    arguments: list[str] = Field(default_factory=list)
    max_vm_rate_hourly: float

    def to_form(self) -> dict[str, str]:
        """Encode the request as form fields, without the credentials."""
        # NOTE: how the API expects lists and dicts in a form is undocumented, because
        # the only known client passes Python objects to its HTTP library. They are sent
        # as JSON text until the API documentation or a working client shows otherwise.
        return {
            "display_name": self.display_name,
            "project_id": self.project_id,
            "image_name": self.image_name,
            "registry_type": self.registry_type,
            "gpu_count": str(self.gpu_count),
            "gpu_models": json.dumps(self.gpu_models),
            "replicas": str(self.replicas),
            "ram": str(self.ram_gb),
            "vcpus": str(self.vcpus),
            "storage": str(self.storage_gb),
            "networking_port": str(self.networking_port),
            "environment_variables": json.dumps(self.environment_variables),
            "volumes": json.dumps(self.volumes),
            "arguments": json.dumps(self.arguments),
            "max_vm_rate_hourly": format_decimal(self.max_vm_rate_hourly),
        }
