"""The model table: one place that knows what each model takes, bills and answers."""

from __future__ import annotations

import logging
import re
from datetime import date

import pytest

from pipeline.cli import main
from pipeline.models import ModelTableError, default_table, describe_table, lookup


@pytest.mark.parametrize(
    ("model_id", "entry"),
    [
        ("gemini-2.5-flash", "gemini-2.5-flash"),
        ("models/gemini-2.5-flash", "gemini-2.5-flash"),
        ("gemini-2.5-flash-lite-preview-09-2025", "gemini-2.5-flash-lite"),  # longest prefix
        ("gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
        ("gemini-3-flash-preview", "gemini-3-flash-preview"),
        ("gemini-3.1-pro-preview", "gemini-3.1-pro-preview"),
        ("gemini-3.5-flash-lite", "gemini-3.5-flash-lite"),
        ("GEMINI-3.8-FLASH", "gemini-3.8-flash"),
        ("gemini-flash-latest", "gemini-3.8-flash"),
        ("gemini-pro-latest", "gemini-3.1-pro-preview"),
    ],
)
def test_ids_find_their_entry(model_id: str, entry: str) -> None:
    assert lookup(model_id).name == entry


def test_segmentation_shape_by_generation() -> None:
    """PNG masks on 2.5, polygons by schema on 3.6-3.8, none on 3.5 (its migration guide) and
    the Pros (issue 18's table)."""
    shapes = {
        m: lookup(m).segmentation
        for m in (
            "gemini-2.5-flash",
            "gemini-3.5-flash",
            "gemini-3.6-flash",
            "gemini-3.7-flash",
            "gemini-3.8-flash",
            "gemini-3-pro-preview",
            "gemini-3.1-pro-preview",
        )
    }
    assert shapes == {
        "gemini-2.5-flash": "png",
        "gemini-3.5-flash": None,
        "gemini-3.6-flash": "polygon",
        "gemini-3.7-flash": "polygon",
        "gemini-3.8-flash": "polygon",
        "gemini-3-pro-preview": None,
        "gemini-3.1-pro-preview": None,
    }


def test_unknown_models_get_conservative_settings_and_one_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        first = lookup("my-tuned-model-7")
        lookup("my-tuned-model-7")
    assert not first.known and first.thinking.control == "none"
    assert first.temperature is None and not first.json_schema and not first.media_resolution
    warnings = [r for r in caplog.records if "my-tuned-model-7" in r.getMessage()]
    assert len(warnings) == 1


def test_prices_follow_their_dates_and_batch_is_half() -> None:
    flash = lookup("gemini-3.8-flash")
    before, after = flash.price(date(2026, 12, 31)), flash.price(date(2027, 1, 1))
    assert (before.input, before.output) == (0.75, 3.75)
    assert (after.input, after.output) == (1.50, 7.50)
    assert (after.batch_input, after.batch_output) == (0.75, 3.75)
    assert after.cost(1_000_000, 1_000_000, batch=True) == pytest.approx(4.5)
    assert lookup("gemini-3-pro-preview").price() is None


def test_thinking_rules_use_the_services_words() -> None:
    assert lookup("gemini-3.8-flash").thinking.level_error("minimal") == (
        "'minimal' is not a supported thinking level for this model. "
        "Allowed values are: medium, low, high."
    )
    pro = lookup("gemini-2.5-pro").thinking
    assert pro.budget_error(0) is not None and pro.budget_error(128) is None
    assert pro.budget_error(-1) is None  # dynamic
    assert lookup("gemini-2.5-flash").thinking.budget_error(0) is None


def test_a_bad_entry_names_its_field() -> None:
    with pytest.raises(ModelTableError, match="tokens must be one of"):
        default_table().with_entries({"gemini-x": {"like": "gemini-2.5-flash", "tokens": "pixels"}})
    with pytest.raises(ModelTableError, match="unknown field tokenz"):
        default_table().with_entries({"gemini-x": {"like": "gemini-2.5-flash", "tokenz": "tiles"}})


def test_models_command_prints_the_table(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == describe_table()
    assert "gemini-3.8-flash" in out and "alias gemini-flash-latest -> gemini-3.8-flash" in out


DATED = re.compile(
    r"\b20\d\d-\d\d(-\d\d)?\b|google-genai \d+\.\d+|supervision \d|\bassumed\b|\bundated\b"
)


@pytest.mark.parametrize("model", default_table().models, ids=lambda m: m.name)
def test_every_fact_has_a_dated_claim_or_says_it_is_assumed(model) -> None:
    """Issue 18: the table with dates and sources for every fact. A claim without a date, an
    SDK version or an explicit "assumed"/"undated" is a claim no one can check later."""
    facts = {"tokens", "prices"}
    if model.generation != "1.5":
        facts |= {"thinking", "segmentation"}
    if model.status.shut_down is not None:
        facts.add("status")
    elif model.interactions:  # what a model is called through today
        facts.add("interactions")
    assert facts <= set(model.sources), f"{model.name} lacks {facts - set(model.sources)}"
    for fact, claims in model.sources.items():
        for claim in claims:
            assert DATED.search(claim), f"{model.name} {fact}: {claim!r} has no date"


def test_aliases_are_marked_as_guesses() -> None:
    table = default_table()
    assert table.aliases and set(table.alias_sources) == set(table.aliases)
    assert all("assumed" in source for source in table.alias_sources.values())


def test_where_sources_disagree_both_claims_are_kept() -> None:
    """3.x segmentation: the 3.5 migration checklist says none; the 2026-09 page sends a schema."""
    for name in ("gemini-3.6-flash", "gemini-3.8-flash", "gemini-3-flash-preview"):
        claims = " ".join(lookup(name).sources["segmentation"])
        assert "does not segment" in claims and ("schema" in claims or "PNG" in claims)
