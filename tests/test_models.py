"""The model table: one place that knows what each model takes, bills and answers."""

from __future__ import annotations

import logging
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
