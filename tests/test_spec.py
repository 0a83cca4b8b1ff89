"""Tests of the hostnode spec language: parsing, errors, GPU names, and its three users."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tdbot.bot.arguments import UsageError, parse_hostnode_spec
from tdbot.evaluation.pricing import rank_hostnodes
from tdbot.rules import load_rules
from tdbot.rules.schema import CheapestHostnodeRule, HostnodeSpec
from tdbot.simulator.server import SimulatorServer
from tdbot.simulator.testing import make_test_market, running_simulator
from tdbot.spec import (
    SpecError,
    gpu_matches,
    known_gpu_models,
    parse_spec_fields,
    parse_terms,
    suggest_gpu_models,
)
from tests.test_bot import Chat, api, chat, market  # noqa: F401
from tests.test_cli import run_tdbot, write_config
from tests.test_evaluation_pricing import load_hostnodes

GPU_4090 = "geforcertx4090-pcie-24gb"
FULL_SPEC = (
    "gpu=4090 count>=2 vram>=24 vcpus>=8 ram>=32 storage>=200 price<0.8 "
    'country in [Canada,"United States"] city=Chicago uptime>=0.99 spot'
)


def spec_error(text: str, gpu_models: Any = None) -> SpecError:
    with pytest.raises(SpecError) as caught:
        parse_spec_fields(text, gpu_models)
    return caught.value


# --- valid specs -------------------------------------------------------------------


def test_full_example_sets_fields() -> None:
    spec = HostnodeSpec.model_validate(FULL_SPEC)

    assert spec.gpu == ["4090"]
    assert spec.gpu_count == 2
    assert spec.min_vram_gb == 24
    assert spec.max_vram_gb is None
    assert spec.vcpus == 8
    assert spec.ram_gb == 32
    assert spec.storage_gb == 200
    assert spec.max_usd_per_hour == pytest.approx(0.799999)
    assert spec.countries == ["Canada", "United States"]
    assert spec.cities == ["Chicago"]
    assert spec.min_uptime_percent == pytest.approx(99.0)
    assert spec.spot is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu=h100", {"gpu": ["h100"]}),
        ("gpu in [h100,a100-80gb]", {"gpu": ["h100", "a100-80gb"]}),
        ("gpu=4090,3090", {"gpu": ["4090", "3090"]}),
        ("gpu=4090 gpu!=sxm4", {"gpu": ["4090"], "exclude_gpu": ["sxm4"]}),
        ("gpu=4090 count=3", {"gpu": ["4090"], "gpu_count": 3}),
        ("gpu=4090 count>2", {"gpu": ["4090"], "gpu_count": 3}),
        ("gpu=4090 vram=24", {"gpu": ["4090"], "min_vram_gb": 24, "max_vram_gb": 24}),
        ("gpu=4090 vram>24", {"gpu": ["4090"], "min_vram_gb": 25}),
        ("gpu=4090 vram<=48", {"gpu": ["4090"], "max_vram_gb": 48}),
        ("gpu=4090 vram<48", {"gpu": ["4090"], "max_vram_gb": 47}),
        (
            "gpu=4090 vcpus=6 ram=16 storage=50",
            {"gpu": ["4090"], "vcpus": 6, "ram_gb": 16, "storage_gb": 50},
        ),
        ("gpu=4090 ram>16", {"gpu": ["4090"], "ram_gb": 17}),
        ("gpu=4090 price<=0.5", {"gpu": ["4090"], "max_usd_per_hour": 0.5}),
        ("gpu=4090 country!=Canada", {"gpu": ["4090"], "exclude_countries": ["Canada"]}),
        (
            "gpu=4090 city in ['New York',Chicago]",
            {"gpu": ["4090"], "cities": ["New York", "Chicago"]},
        ),
        ("gpu=4090 city!=Chicago", {"gpu": ["4090"], "exclude_cities": ["Chicago"]}),
        (
            "gpu=4090 city in [Montréal,Düsseldorf]",
            {"gpu": ["4090"], "cities": ["Montréal", "Düsseldorf"]},
        ),
        ("  GPU=RTX4090   SPOT ", {"gpu": ["rtx4090"], "spot": True}),
    ],
)
def test_spec_fields_per_operator(text: str, expected: dict[str, Any]) -> None:
    assert parse_spec_fields(text) == expected


def test_structured_match_still_valid() -> None:
    spec = HostnodeSpec.model_validate({"gpu": [GPU_4090], "gpu_count": 2})

    assert spec.gpu == [GPU_4090]
    assert spec.gpu_count == 2
    assert spec.max_usd_per_hour is None


# --- invalid specs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "column"),
    [
        ("gpu=4090 prise<1", "unknown key 'prise'; did you mean 'price'?", 10),
        ("gpu=4090 colour=red", "unknown key 'colour'; did you mean 'country'?", 10),
        ("gpu=4090 zzz=1", "unknown key 'zzz'; valid keys: gpu, count, vram", 10),
        ("gpu=4090 price>1", "price does not take >; use <, <=", 15),
        ("gpu=4090 count!=2", "count sets the size to deploy and has no upper bound", 15),
        ("gpu=4090 count<=4", "count sets the size to deploy and has no upper bound", 15),
        ("gpu=4090 ram<64", "ram sets the size to deploy and has no upper bound; use =, >=, >", 13),
        ("gpu=4090 spot=yes", "spot is a flag and takes no operator or value", 14),
        ("gpu=4090 count=0", "count=0 is out of range: count must be at least 1", 16),
        ("gpu=4090 count>8", "count>8 is out of range: count must be at most 8", 16),
        ("gpu=4090 storage=10", "storage=10 is out of range: storage must be at least 20", 18),
        ("gpu=4090 vcpus=1", "vcpus=1 is out of range: vcpus must be at least 2", 16),
        ("gpu=4090 vram<1", "vram<1 is out of range: vram must be at least 1", 15),
        ("gpu=4090 price<0", "price<0 leaves no price; give a cap above 0", 16),
        ("gpu=4090 price<=-1", "price<=-1 leaves no price", 17),
        ("gpu=4090 vram>=24 vram<=16", "vram from 24 GB and up to 16 GB leaves no GPU", 19),
        ("gpu=4090 ram", "ram needs an operator and a value, such as ram=…", 13),
        ("gpu=4090 ram 32", "ram needs an operator and a value, such as ram=…", 14),
        ("gpu=4090 ram>=", "a value is missing at the end", 15),
        ("gpu=4090 ram>=x", "ram needs a number, got 'x'", 15),
        ("gpu=4090 ram>=3.5", "ram needs a whole number, got '3.5'", 15),
        ("gpu=4090 price<cheap", "price needs a number, got 'cheap'", 16),
        ("gpu=4090 uptime>=99", "uptime is a fraction from 0 to 1, such as 0.99, got 99.0", 18),
        ("gpu=4090 country in Canada", "expected '[' after in, such as in [a,b]", 21),
        ("gpu=4090 country in [Canada", "the list is not closed; add ']'", 28),
        ("gpu=4090 country in [Canada Peru]", "expected ',' or ']' in the list, got 'Peru'", 29),
        ("gpu=4090 country in [,]", "expected a value, got ','", 22),
        ('gpu=4090 city="New York', 'the string starting with " is not closed', 15),
        ("gpu=4090 ram>=32 ram>=64", "ram is set twice", 18),
        ("gpu=4090 vram>=24 vram>=32", "vram is set twice", 19),
        ("gpu=4090 ; ram=3", "unexpected character ';'", 10),
        ("=4090", "expected a field name, such as gpu, got '='", 1),
    ],
)
def test_invalid_spec_message_and_column(text: str, message: str, column: int) -> None:
    error = spec_error(text)

    assert error.message.startswith(message)
    assert error.column == column
    assert str(error) == f"column {column}: {error.message}"


def test_error_pointer_marks_column() -> None:
    text = "gpu=4090 prise<1"

    pointer = spec_error(text).pointer(text)

    assert pointer == "  gpu=4090 prise<1\n           ^"


def test_unknown_gpu_suggests_model() -> None:
    misspelt = spec_error("count=1 gpu=rtx4900")

    assert misspelt.column == 13
    assert misspelt.message.startswith("no GPU model matches 'rtx4900'; did you mean")
    assert GPU_4090 in misspelt.message


def test_unknown_gpu_without_suggestion() -> None:
    error = spec_error("gpu=zzzz")

    assert error.message == "no GPU model matches 'zzzz'"
    assert error.column == 5


def test_gpu_check_uses_given_models() -> None:
    assert parse_spec_fields("gpu=b200", gpu_models=["b200-sxm-192gb"]) == {"gpu": ["b200"]}
    assert parse_spec_fields("gpu=b200", gpu_models=()) == {"gpu": ["b200"]}
    assert spec_error("gpu=4090", gpu_models=["b200-sxm-192gb"]).column == 5


def test_missing_gpu_rejected_by_schema() -> None:
    with pytest.raises(ValueError, match="gpu"):
        HostnodeSpec.model_validate("count=2")


def test_terms_accept_extra_field() -> None:
    terms = parse_terms("gpu=4090 top=3", ["gpu", "top"])

    assert [(term.field, term.operator, term.values) for term in terms] == [
        ("gpu", "=", ("4090",)),
        ("top", "=", ("3",)),
    ]


# --- GPU names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model", "expected"),
    [
        ("4090", GPU_4090, True),
        ("rtx4090", GPU_4090, True),
        (GPU_4090, GPU_4090, True),
        ("a100-80gb", "a100-pcie-80gb", True),
        ("a100-80gb", "a100-sxm4-80gb", True),
        ("a100-80gb", "a100-pcie-40gb", False),
        ("a100", "a100-pcie-40gb", True),
        ("h100", "a100-pcie-80gb", False),
        ("3080", "geforcertx3080ti-pcie-12gb", True),
        ("24gb", GPU_4090, False),
    ],
)
def test_gpu_name_matching(name: str, model: str, expected: bool) -> None:
    assert gpu_matches(name, model) is expected


def test_known_models_from_snapshot() -> None:
    models = known_gpu_models()

    assert GPU_4090 in models
    assert "h100-sxm5-80gb" in models


def test_suggestions_for_misspelt_names() -> None:
    models = known_gpu_models()

    assert suggest_gpu_models("rtx4900", models)[0] == GPU_4090
    assert suggest_gpu_models("h10", models) == ["h100-sxm5-80gb"]
    assert suggest_gpu_models("qqqq", models) == []


def test_ranking_filters_vram_price_exclusions() -> None:
    hostnodes = load_hostnodes()
    wide = rank_hostnodes(hostnodes, HostnodeSpec.model_validate("gpu=a100"))
    large = rank_hostnodes(hostnodes, HostnodeSpec.model_validate("gpu=a100 vram>=80"))
    no_sxm = rank_hostnodes(hostnodes, HostnodeSpec.model_validate("gpu=a100 gpu!=sxm4"))
    cheapest = wide[0].price.total_usd
    capped = rank_hostnodes(hostnodes, HostnodeSpec.model_validate(f"gpu=a100 price<={cheapest}"))

    assert {offer.gpu_model for offer in large} <= {"a100-pcie-80gb", "a100-sxm4-80gb"}
    assert large
    assert len(large) < len(wide)
    assert all("sxm4" not in offer.gpu_model for offer in no_sxm)
    assert [offer.price.total_usd for offer in capped] == [cheapest] * len(capped)
    assert capped


# --- rule files --------------------------------------------------------------------

RULE_TEMPLATE = """\
name: rtx4090-line
kind: cheapest_hostnode
every: 10m
match: "{spec}"
alert:
  below_usd_per_hour: 0.5
"""


def test_rule_file_string_match(tmp_path: Path) -> None:
    path = tmp_path / "rule.yaml"
    path.write_text(RULE_TEMPLATE.format(spec="gpu=4090 count=1 vcpus=8 ram>=32"), "utf-8")

    ruleset = load_rules(path)

    assert [str(error) for error in ruleset.errors] == []
    rule = ruleset.rules[0].rule
    assert isinstance(rule, CheapestHostnodeRule)
    assert rule.match.gpu == ["4090"]
    assert rule.match.ram_gb == 32


def test_rule_file_spec_error_positioned(tmp_path: Path) -> None:
    path = tmp_path / "rule.yaml"
    path.write_text(RULE_TEMPLATE.format(spec="gpu=4090 prise<0.6"), "utf-8")

    ruleset = load_rules(path)

    assert [str(error) for error in ruleset.errors] == [
        f"{path}:4:8: match: column 10: unknown key 'prise'; did you mean 'price'?"
    ]
    assert ruleset.rules == []


# --- tdbot hostnodes ---------------------------------------------------------------


@pytest.fixture
async def simulator() -> AsyncIterator[SimulatorServer]:
    async with running_simulator(make_test_market()) as server:
        yield server


async def test_hostnodes_spec_json(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot("hostnodes", "gpu=4090 price<0.6", "--json", "--config", str(config))

    assert result.code == 0, result.output
    offers = json.loads(result.stdout)
    prices = [offer["price"]["total_usd_per_hour"] for offer in offers]
    assert offers
    assert prices == sorted(prices)
    assert all(price < 0.6 for price in prices)
    assert {offer["gpu_model"] for offer in offers} == {GPU_4090}


async def test_hostnodes_sort_by_uptime(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(
        "hostnodes", "gpu=4090", "--sort", "uptime", "--json", "--config", str(config)
    )

    assert result.code == 0, result.output
    uptimes = [offer["uptime_percent"] or -1.0 for offer in json.loads(result.stdout)]
    assert uptimes == sorted(uptimes, reverse=True)


async def test_hostnodes_option_overrides_spec(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url)

    result = await run_tdbot(
        "hostnodes", "gpu=4090 vcpus=4", "--vcpus", "6", "--json", "--config", str(config)
    )

    assert result.code == 0, result.output
    assert {offer["vcpus"] for offer in json.loads(result.stdout)} == {6}


async def test_hostnodes_spec_error_column(tmp_path: Path, simulator: SimulatorServer) -> None:
    config = write_config(tmp_path, simulator.api_url)

    typo = await run_tdbot("hostnodes", "gpu=4090 prise<0.6", "--config", str(config))
    unknown_gpu = await run_tdbot("hostnodes", "gpu=rtx4900", "--config", str(config))

    assert typo.code == 1
    assert typo.stdout == ""
    assert "invalid spec, column 10: unknown key 'prise'; did you mean 'price'?" in typo.stderr
    assert "  gpu=4090 prise<0.6\n           ^" in typo.stderr
    assert unknown_gpu.code == 1
    assert "column 5: no GPU model matches 'rtx4900'; did you mean" in unknown_gpu.stderr
    assert GPU_4090 in unknown_gpu.stderr
    assert "Traceback" not in typo.output + unknown_gpu.output


# --- /cheapest ---------------------------------------------------------------------


def test_cheapest_arguments_take_top() -> None:
    spec, top = parse_hostnode_spec("gpu=4090 price<0.8 top=3")

    assert spec.gpu == ["4090"]
    assert spec.max_usd_per_hour == pytest.approx(0.799999)
    assert top == 3


def test_cheapest_arguments_report_column() -> None:
    with pytest.raises(UsageError, match=r"column 10: unknown key 'prise'; did you mean 'price'\?"):
        parse_hostnode_spec("gpu=4090 prise<1")


async def test_cheapest_gpu_name_in_bot(chat: Chat) -> None:  # noqa: F811
    text = await chat.reply("/cheapest gpu=4090 price<0.8 top=2")

    assert "Cheapest hostnodes for 1x 4090" in text
    assert "1. $" in text
    assert GPU_4090 in text


async def test_cheapest_unknown_gpu_in_bot(chat: Chat) -> None:  # noqa: F811
    text = await chat.reply("/cheapest gpu=rtx4900")

    assert text.startswith("⚠️ Usage: /cheapest")
    assert "column 5: no GPU model matches 'rtx4900'; did you mean" in text
