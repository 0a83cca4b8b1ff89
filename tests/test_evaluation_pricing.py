"""Sizing, full hourly prices and ranking of the fixture marketplace's hostnodes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tdbot.evaluation import Offer, rank_hostnodes
from tdbot.evaluation.pricing import (
    check_fit,
    count_rejections,
    full_price,
    price_at,
    price_total,
    size_deployment,
)
from tdbot.rules.schema import HostnodeSpec
from tdbot.tensordock.models import Hostnode

FIXTURES = Path(__file__).parent / "fixtures" / "tensordock-v0"
RAW_HOSTNODES: dict[str, Any] = json.loads((FIXTURES / "marketplace.json").read_text())["hostnodes"]

RTX4090 = "geforcertx4090-pcie-24gb"
LAS_VEGAS_4090 = "0b60f80c-e16a-4cda-a8cd-dbc01cc0512c"
TOKYO_4090 = "58ab3969-87c2-4228-a9ca-0c9fe191f0ef"
PRAGUE_4090_STRINGS = "9cd81ba3-dd17-4a09-81a7-4f0625eb3351"
EYGELSHOVEN_4090 = "b9ee75b9-b341-4482-a250-86597475ffae"
HELSINKI_4090 = "e75b9240-1b3f-4d62-9281-36d58dad5201"
MANCHESTER_MIXED = "7465c75f-7448-4c75-a955-730553935977"


def load_hostnodes(raw: dict[str, Any] | None = None) -> dict[str, Hostnode]:
    raw = RAW_HOSTNODES if raw is None else raw
    return {key: Hostnode.model_validate({"id": key, **value}) for key, value in raw.items()}


HOSTNODES = load_hostnodes()


def spec(**fields: Any) -> HostnodeSpec:
    values: dict[str, Any] = {"gpu": [RTX4090], "vcpus": 8, "ram_gb": 32, "storage_gb": 200}
    values.update(fields)
    return HostnodeSpec.model_validate(values)


def ranked(offers: list[Offer]) -> list[tuple[str, str, float]]:
    return [(o.hostnode_id, o.gpu_model, o.price_usd_per_hour) for o in offers]


def test_rank_4090_by_full_price() -> None:
    offers = rank_hostnodes(HOSTNODES, spec())

    # 1x 4090, 8 vCPUs, 32 GB RAM, 200 GB storage at each host's unit prices:
    # Tokyo        0.33 + 8*0.003  + 32*0.002  + 200*0.00005 = 0.33 + 0.024 + 0.064 + 0.01 = 0.428
    # Eygelshoven  0.37 + 8*0.0025 + 32*0.002  + 200*0.00005 = 0.37 + 0.020 + 0.064 + 0.01 = 0.464
    # Las Vegas    0.37 + 8*0.003  + 32*0.002  + 200*0.00005 = 0.37 + 0.024 + 0.064 + 0.01 = 0.468
    # Prague       0.45 + 8*0.004  + 32*0.002  + 200*0.00005 = 0.45 + 0.032 + 0.064 + 0.01 = 0.556
    # Helsinki allows at most 6 vCPUs and 30 GB RAM with one GPU, so it cannot host.
    assert ranked(offers) == [
        (TOKYO_4090, RTX4090, 0.428),
        (EYGELSHOVEN_4090, RTX4090, 0.464),
        (LAS_VEGAS_4090, RTX4090, 0.468),
        (PRAGUE_4090_STRINGS, RTX4090, 0.556),
    ]


def test_price_breakdown_by_part() -> None:
    hostnode = HOSTNODES[LAS_VEGAS_4090]
    sizing = size_deployment(hostnode, RTX4090, spec(gpu_count=2))
    assert sizing is not None

    price = full_price(hostnode, sizing)

    # 2 * 0.37 = 0.74; 8 * 0.003 = 0.024; 32 * 0.002 = 0.064; 200 * 0.00005 = 0.01
    assert price.gpu_usd == pytest.approx(0.74)
    assert price.cpu_usd == pytest.approx(0.024)
    assert price.ram_usd == pytest.approx(0.064)
    assert price.storage_usd == pytest.approx(0.01)
    assert price.total_usd == 0.838


def test_numeric_string_host_priced() -> None:
    hostnode = HOSTNODES[PRAGUE_4090_STRINGS]
    sizing = size_deployment(hostnode, RTX4090, spec())
    assert sizing is not None

    price = full_price(hostnode, sizing)

    # Every number of this host arrives as a string: "0.45", "0.004", "0.002", "0.00005".
    assert price.gpu_usd == pytest.approx(0.45)
    assert price.cpu_usd == pytest.approx(8 * 0.004)
    assert price.ram_usd == pytest.approx(32 * 0.002)
    assert price.storage_usd == pytest.approx(200 * 0.00005)
    assert price.total_usd == 0.556


@pytest.mark.parametrize(
    ("gpu", "hostnode_id", "reason"),
    [
        ("l40s-pcie-48gb", "0c64ff1c-5b38-42ff-a641-e8db5f976178", "offline"),
        ("l4-pcie-24gb", "7e6b8b9a-7ad7-4ee4-815c-cb78402f22cb", "unlisted"),
        ("l40-pcie-48gb", "d353b6c9-32f8-43ad-ab7a-e3e92bbae931", "reserved"),
        ("geforcertx3090-pcie-24gb", "e5d7e9c6-63db-4713-9ca4-100b77c5ba5b", "too_few_ports"),
        ("geforcertx3080-pcie-10gb", "8d8411cc-5df7-44d4-9424-5a3833689094", "too_few_gpus"),
        ("a100-pcie-80gb", HELSINKI_4090, "no_gpu_model"),
        (RTX4090, HELSINKI_4090, "vcpus_above_max"),
    ],
)
def test_unfit_hosts_excluded(gpu: str, hostnode_id: str, reason: str) -> None:
    request = spec(gpu=[gpu], vcpus=8, ram_gb=16, storage_gb=100)

    result = check_fit(HOSTNODES[hostnode_id], gpu, request)
    offers = rank_hostnodes(HOSTNODES, request)

    assert result == reason
    assert hostnode_id not in {offer.hostnode_id for offer in offers}


def test_unfit_hosts_leave_others() -> None:
    # 1x 3090, 4 vCPUs, 16 GB, 100 GB. Orlando (no free ports) is skipped:
    # Joplin    0.18 + 4*0.003 + 16*0.002 + 100*0.00005 = 0.18 + 0.012 + 0.032 + 0.005 = 0.229
    # Winnipeg  0.23 + 4*0.003 + 16*0.002 + 100*0.00004 = 0.23 + 0.012 + 0.032 + 0.004 = 0.278
    request = spec(gpu=["geforcertx3090-pcie-24gb"], vcpus=4, ram_gb=16, storage_gb=100)

    offers = rank_hostnodes(HOSTNODES, request)

    assert ranked(offers) == [
        ("3eed78e7-25ea-41a4-b111-186a9f980de9", "geforcertx3090-pcie-24gb", 0.229),
        ("bd6f3b15-acf5-457f-a848-a88e0186c72b", "geforcertx3090-pcie-24gb", 0.278),
    ]


def test_zero_amount_gpu_leaves_2022_host() -> None:
    # The 2022-shaped Winnipeg host has no restrictions and no `reserved` key:
    # 0.13 + 4*0.003 + 16*0.002 + 40*0.00005 = 0.13 + 0.012 + 0.032 + 0.002 = 0.176
    request = spec(gpu=["geforcertx3080-pcie-10gb"], vcpus=4, ram_gb=16, storage_gb=40)

    offers = rank_hostnodes(HOSTNODES, request)

    assert ranked(offers) == [
        ("40730580-35d7-404d-be34-493f36436e6c", "geforcertx3080-pcie-10gb", 0.176)
    ]


def test_more_gpus_than_free() -> None:
    request = spec(gpu=["geforcertx3070-pcie-8gb"], gpu_count=2, vcpus=4, ram_gb=16)

    assert rank_hostnodes(HOSTNODES, request) == []


def test_low_uptime_host_excluded() -> None:
    a100 = "a100-pcie-80gb"
    helsinki = "e3f7d887-e2d9-4796-951e-546598f82da9"
    request = spec(gpu=[a100], vcpus=8, ram_gb=32, storage_gb=100)

    all_offers = rank_hostnodes(HOSTNODES, request)
    reliable = rank_hostnodes(HOSTNODES, request.model_copy(update={"min_uptime_percent": 99.0}))

    # Helsinki  1.17 + 8*0.003  + 32*0.002  + 100*0.00005 = 1.17 + 0.024 + 0.064 + 0.005 = 1.263
    # Chicago   1.24 + 8*0.003  + 32*0.002  + 100*0.00005 = 1.24 + 0.024 + 0.064 + 0.005 = 1.333
    # Manchester 1.27 + 8*0.0025 + 32*0.0025 + 100*0.00005 = 1.27 + 0.02 + 0.08 + 0.005 = 1.375
    # Prague    1.30 + 8*0.003  + 32*0.0015 + 100*0.00005 = 1.30 + 0.024 + 0.048 + 0.005 = 1.377
    assert [(o.hostnode_id, o.price_usd_per_hour) for o in all_offers] == [
        (helsinki, 1.263),
        ("812220ef-2c8a-4e7f-8aed-910153cd1f95", 1.333),
        ("7affc44a-6bf2-4c99-b497-790d6af9d0ba", 1.375),
        ("77af9b92-784b-4d23-89bb-6adfb4b4eedd", 1.377),
    ]
    assert helsinki not in {offer.hostnode_id for offer in reliable}
    assert len(reliable) == 3


def test_uptime_minimum_in_percent() -> None:
    # Uptimes: Las Vegas 0.99994, Prague "0.9987", Tokyo 0.9983, Eygelshoven 0.9978.
    offers = rank_hostnodes(HOSTNODES, spec(min_uptime_percent=99.8))

    assert [offer.hostnode_id for offer in offers] == [
        TOKYO_4090,
        LAS_VEGAS_4090,
        PRAGUE_4090_STRINGS,
    ]


def test_unknown_uptime_with_minimum() -> None:
    raw = copy.deepcopy(RAW_HOSTNODES)
    del raw[TOKYO_4090]["status"]["uptime"]
    hostnodes = load_hostnodes(raw)

    without_minimum = rank_hostnodes(hostnodes, spec())
    with_minimum = rank_hostnodes(hostnodes, spec(min_uptime_percent=50.0))

    assert without_minimum[0].hostnode_id == TOKYO_4090
    assert without_minimum[0].uptime_percent is None
    assert TOKYO_4090 not in {offer.hostnode_id for offer in with_minimum}
    assert count_rejections(hostnodes, spec(min_uptime_percent=50.0))["uptime_unknown"] == 1


def test_location_filters_ignore_case() -> None:
    by_country = rank_hostnodes(HOSTNODES, spec(countries=["united STATES"]))
    by_city = rank_hostnodes(HOSTNODES, spec(cities=[" tokyo", "PRAGUE"]))

    assert [offer.hostnode_id for offer in by_country] == [LAS_VEGAS_4090]
    assert [offer.hostnode_id for offer in by_city] == [TOKYO_4090, PRAGUE_4090_STRINGS]


def test_mixed_gpu_host_two_offers() -> None:
    request = spec(
        gpu=["rtxa4000-pcie-16gb", "rtxa5000-pcie-24gb"], vcpus=4, ram_gb=16, storage_gb=100
    )

    offers = rank_hostnodes(HOSTNODES, request)

    # Each (hostnode, GPU model) pair is an offer, so Manchester appears twice:
    # Manchester A4000 0.15 + 4*0.003 + 16*0.0015 + 100*0.00005 = 0.15+0.012+0.024+0.005 = 0.191
    # Stockholm A4000  0.15 + 4*0.003 + 16*0.002  + 100*0.00005 = 0.15+0.012+0.032+0.005 = 0.199
    # Winnipeg A4000   0.17 + 4*0.003 + 16*0.002  + 100*0.00005 = 0.17+0.012+0.032+0.005 = 0.219
    # Manchester A5000 0.26 + 4*0.003 + 16*0.0015 + 100*0.00005 = 0.26+0.012+0.024+0.005 = 0.301
    # Tokyo A5000      0.25 + 4*0.004 + 16*0.002  + 100*0.00004 = 0.25+0.016+0.032+0.004 = 0.302
    assert ranked(offers) == [
        (MANCHESTER_MIXED, "rtxa4000-pcie-16gb", 0.191),
        ("6f904419-73ad-4188-8f79-ee03f1bc5651", "rtxa4000-pcie-16gb", 0.199),
        ("ba48764f-e010-4e89-9172-ddc4b7202787", "rtxa4000-pcie-16gb", 0.219),
        (MANCHESTER_MIXED, "rtxa5000-pcie-24gb", 0.301),
        ("17f4aa77-c593-4dd0-aca4-1a6d2a631b1f", "rtxa5000-pcie-24gb", 0.302),
    ]


def test_odd_vcpus_rounded_up() -> None:
    sizing = size_deployment(HOSTNODES[TOKYO_4090], RTX4090, spec(vcpus=7))

    assert sizing is not None
    assert sizing.vcpus == 8
    assert sizing.adjustments == ("vcpus rounded up from 7 to 8",)


def test_odd_vcpus_priced_even() -> None:
    offers = rank_hostnodes(HOSTNODES, spec(vcpus=7, cities=["Tokyo"]))

    # Priced with 8 vCPUs: 0.33 + 8*0.003 + 32*0.002 + 200*0.00005 = 0.428
    assert offers[0].price_usd_per_hour == 0.428


def test_odd_vcpus_against_restriction_max() -> None:
    # The Helsinki 4090 host allows 2 to 6 vCPUs with one GPU: 5 rounds up to 6 and
    # fits, 7 rounds up to 8 and does not.
    helsinki = HOSTNODES[HELSINKI_4090]

    fits = size_deployment(helsinki, RTX4090, spec(vcpus=5, ram_gb=16, storage_gb=100))
    over = check_fit(helsinki, RTX4090, spec(vcpus=7, ram_gb=16, storage_gb=100))

    assert fits is not None
    assert fits.vcpus == 6
    assert over == "vcpus_above_max"


def test_restriction_minimum_raises_request() -> None:
    # The Las Vegas host needs at least 4 GB RAM with one GPU; 2 GB is raised to 4.
    hostnode = HOSTNODES[LAS_VEGAS_4090]

    sizing = size_deployment(hostnode, RTX4090, spec(ram_gb=2))

    assert sizing is not None
    assert sizing.ram_gb == 4
    assert sizing.adjustments == ("ram_gb raised from 2 to the hostnode minimum 4",)
    assert full_price(hostnode, sizing).ram_usd == pytest.approx(4 * 0.002)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"ram_gb": 59}, "ram_above_max"),
        ({"storage_gb": 951}, "storage_above_max"),
        ({"vcpus": 14}, "vcpus_above_max"),
    ],
)
def test_restriction_maximum_rejects(fields: dict[str, Any], reason: str) -> None:
    # With one GPU the Las Vegas host allows 2-12 vCPUs, 4-58 GB RAM and 20-950 GB storage.
    assert check_fit(HOSTNODES[LAS_VEGAS_4090], RTX4090, spec(**fields)) == reason


def test_restriction_for_gpu_count() -> None:
    # Two GPUs on the Las Vegas host allow up to 24 vCPUs, one GPU only 12.
    request = spec(gpu_count=2, vcpus=20)

    sizing = size_deployment(HOSTNODES[LAS_VEGAS_4090], RTX4090, request)

    assert sizing is not None
    assert sizing.vcpus == 20


def test_free_resources_limit_request() -> None:
    # The Prague A100 host has 28 vCPUs free and no restriction below that.
    hostnode = HOSTNODES["77af9b92-784b-4d23-89bb-6adfb4b4eedd"]
    raw = copy.deepcopy(RAW_HOSTNODES["77af9b92-784b-4d23-89bb-6adfb4b4eedd"])
    raw["specs"]["restrictions"] = None
    unrestricted = Hostnode.model_validate({"id": hostnode.id, **raw})

    result = check_fit(unrestricted, "a100-pcie-80gb", spec(gpu=["a100-pcie-80gb"], vcpus=30))

    assert result == "too_few_vcpus"


def test_ports_needed_for_deploy() -> None:
    # The Chicago L40S host has five free external ports.
    hostnode = HOSTNODES["1eeff984-08c1-43eb-aceb-1ed904e63fd6"]
    request = spec(gpu=["l40s-pcie-48gb"])

    assert size_deployment(hostnode, "l40s-pcie-48gb", request, ports_needed=5) is not None
    assert check_fit(hostnode, "l40s-pcie-48gb", request, ports_needed=6) == "too_few_ports"


def test_cpu_only_host_never_offered() -> None:
    request = spec(gpu=["h100-sxm5-80gb"])

    result = check_fit(HOSTNODES["efcbd58f-a28c-4f49-8696-5e4d3688c7ff"], "h100-sxm5-80gb", request)

    assert result == "no_gpu_model"


def test_ties_broken_by_uptime_then_id() -> None:
    raw = {
        "b-low-uptime": copy.deepcopy(RAW_HOSTNODES[TOKYO_4090]),
        "c-high-uptime": copy.deepcopy(RAW_HOSTNODES[TOKYO_4090]),
        "a-high-uptime": copy.deepcopy(RAW_HOSTNODES[TOKYO_4090]),
    }
    raw["b-low-uptime"]["status"]["uptime"] = 0.95
    raw["c-high-uptime"]["status"]["uptime"] = 0.999
    raw["a-high-uptime"]["status"]["uptime"] = 0.999

    offers = rank_hostnodes(load_hostnodes(raw), spec())

    assert [offer.hostnode_id for offer in offers] == [
        "a-high-uptime",
        "c-high-uptime",
        "b-low-uptime",
    ]


def test_rejections_counted_by_reason() -> None:
    rejections = count_rejections(HOSTNODES, spec(gpu=["l40-pcie-48gb"]))

    assert rejections["reserved"] == 1
    assert rejections["no_gpu_model"] == len(HOSTNODES) - 1


def test_offer_evidence_is_plain_json() -> None:
    offer = rank_hostnodes(HOSTNODES, spec())[0]

    evidence = offer.to_evidence()

    assert json.loads(json.dumps(evidence)) == evidence
    assert evidence["hostnode_id"] == TOKYO_4090
    assert evidence["price"]["total_usd_per_hour"] == 0.428


def test_price_total_equals_breakdown() -> None:
    # Every offer of the fixture, so that many float sums are compared exactly.
    for offer in rank_hostnodes(HOSTNODES, spec(gpu=["4090", "a100", "h100", "3090"])):
        hostnode = HOSTNODES[offer.hostnode_id]
        units = {
            "gpu": hostnode.specs.gpu[offer.gpu_model].price,
            "vcpu": hostnode.specs.cpu.price,
            "ram_gb": hostnode.specs.ram.price,
            "storage_gb": hostnode.specs.storage.price,
        }

        assert price_total(offer.sizing, **units) == price_at(offer.sizing, **units).total_usd
