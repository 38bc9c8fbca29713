"""The custom task's typed `answer` column: a response_schema -> an Arrow type, real runs against
the local server written to real Parquet and read back with pyarrow and Polars, answers that do
not fit, `reparse`, a killed run's journal, and `conform` between schemas."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from pipeline import exits
from pipeline.commands.reparse import reparse
from pipeline.config import ConfigError, load_config
from pipeline.output import journal
from pipeline.output.compact import compact
from pipeline.output.parts import current_rows, part_entries, part_files
from pipeline.output.recovery import recover
from pipeline.output.stores import open_store
from pipeline.records import ROW_SCHEMA, SCHEMA_VERSION, conform, row_schema, to_table
from pipeline.tasks import get_task
from pipeline.tasks.base import TaskSettings
from pipeline.tasks.typed import JSON_TEXT, answer_field, field_of, schema_in, schema_of
from tests.conftest import make_config, result_row, run, save_scenes, write_rows
from tests.test_edges import replay

SHAPE = {
    "type": "object",
    "properties": {
        "label": {"type": "string"},
        "colour": {"type": "string"},
        "area": {"type": "integer"},
    },
    "required": ["label", "area"],
}
SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "background": {"type": "string"},
        "shapes": {"type": "array", "items": SHAPE},
        "notes": {"type": ["string", "null"]},
        "extra": {"type": "object"},  # free-form: kept as JSON text
    },
    "required": ["count", "shapes"],
}
SHAPE_TYPE = pa.struct([("label", pa.string()), ("colour", pa.string()), ("area", pa.int64())])
ANSWER_TYPE = pa.struct(
    [
        ("count", pa.int64()),
        ("background", pa.string()),
        ("shapes", pa.list_(SHAPE_TYPE)),
        ("notes", pa.string()),
        ("extra", pa.large_string()),
    ]
)
PROMPT = "Describe the shapes in the image as JSON."


def custom(tmp_path: Path, schema: dict[str, Any] = SCHEMA, **sections: Any) -> Any:
    task = {"kind": "custom", "prompt": PROMPT, "response_schema": schema}
    return make_config(tmp_path, task=task, **sections)


def parts_of(out: Path) -> list[pa.Table]:
    """Every committed part, read whole by pyarrow as any reader would."""
    return [pq.read_table(path) for path in part_files(out)]


def projected(value: Any, type_: pa.DataType) -> Any:
    """What the typed column should hold for a JSON value: the struct's fields only, JSON text
    for the free-form ones (the test's own statement of the rule, not the pipeline's code)."""
    if value is None:
        return None
    if type_ == pa.large_string():
        return json.dumps(value, separators=(",", ":"))
    if pa.types.is_struct(type_):
        return {f.name: projected(value.get(f.name), f.type) for f in type_}
    if pa.types.is_list(type_):
        return [projected(item, type_.value_type) for item in value]
    return value


# ------------------------------------------------------------------------ a run, end to end
async def test_a_custom_run_writes_the_answer_as_typed_columns(
    images_dir: Path, tmp_path: Path
) -> None:
    save_scenes(images_dir, 4, prefix="s", seed=10)
    summary = await run(custom(tmp_path))
    assert summary.exit_code == exits.OK
    (part,) = parts_of(tmp_path / "out")
    assert part.schema.field("answer").type == ANSWER_TYPE
    assert part.schema.metadata[b"gemini_vision_pipeline.schema_version"] == SCHEMA_VERSION.encode()
    assert schema_in(part.schema.field("answer")) == SCHEMA  # for a reparse without the config
    rows = part.to_pylist()
    assert len(rows) == 4 and {row["status"] for row in rows} == {"ok"}
    for row in rows:
        raw = json.loads(row["json"])  # the raw answer stays in every row
        assert row["answer"] == projected(raw, ANSWER_TYPE)
        answer = row["answer"]
        assert answer["count"] == 2 == len(answer["shapes"])  # save_scenes draws two shapes
        assert answer["background"] == "white" and answer["extra"] == "{}"
        assert all(
            shape["area"] > 0 and shape["colour"] in shape["label"] for shape in answer["shapes"]
        )
    # the typed column is what the project's own reader returns too
    current = current_rows(tmp_path / "out", ["image_path", "answer"])
    assert current.schema.field("answer").type == ANSWER_TYPE
    assert sorted(r["answer"]["count"] for r in current.to_pylist()) == [2, 2, 2, 2]


async def test_polars_reads_every_part_as_one_schema_after_other_tasks_wrote(
    images_dir: Path, tmp_path: Path
) -> None:
    """A later run of another task into the same output writes the output's answer type (its
    rows null), so a glob reader sees one schema across all parts."""
    save_scenes(images_dir, 3, prefix="s", seed=20)
    assert (await run(custom(tmp_path))).exit_code == exits.OK
    caption = make_config(tmp_path, task={"kind": "caption"})
    assert (await run(caption)).exit_code == exits.OK
    files = [str(path) for path in part_files(tmp_path / "out")]
    assert len(files) == 2
    assert all(pq.read_schema(f).field("answer").type == ANSWER_TYPE for f in files)
    frame = pl.read_parquet(files)
    assert frame.schema["answer"] == pl.Struct(
        {
            "count": pl.Int64,
            "background": pl.String,
            "shapes": pl.List(
                pl.Struct({"label": pl.String, "colour": pl.String, "area": pl.Int64})
            ),
            "notes": pl.String,
            "extra": pl.String,
        }
    )
    counts = duckdb.sql(
        f"SELECT task, sum(answer.count), count(answer) FROM read_parquet({files}) GROUP BY task"
    ).fetchall()
    assert sorted(counts) == [("caption", None, 0), ("custom", 6, 3)]
    captions = frame.filter(pl.col("task") == "caption")
    assert captions.height == 3 and captions["answer"].null_count() == 3
    shapes = frame.filter(pl.col("task") == "custom").select(
        pl.col("answer").struct.field("shapes").list.len()
    )
    assert shapes.to_series().to_list() == [2, 2, 2]


async def test_an_answer_that_does_not_fit_is_an_error_row_naming_the_field(
    images_dir: Path, tmp_path: Path
) -> None:
    paths = save_scenes(images_dir, 3, prefix="s", seed=30)
    misfit = {"count": 2, "shapes": [{"label": "a", "area": 4}, {"label": "b", "area": 5}]}
    misfit["shapes"].append({"label": "c", "area": "x"})
    config = custom(tmp_path, local={"replay": replay(tmp_path, {paths[1]: json.dumps(misfit)})})
    summary = await run(config)
    assert summary.exit_code == exits.ROWS_NOT_OK  # a row not ok: no crash, no stop
    rows = {row["image_path"]: row for row in current_rows(tmp_path / "out").to_pylist()}
    bad = rows["s001.png"]
    assert bad["status"] == "error"
    assert bad["error"] == (
        "answer does not fit response_schema at $.shapes[2].area: 'x' is not of type 'integer'"
    )
    assert bad["answer"] is None
    assert json.loads(bad["json"]) == misfit  # the raw answer is kept
    assert '\\"area\\": \\"x\\"' in bad["raw_response"]  # the body as received
    assert {rows[name]["status"] for name in ("s000.png", "s002.png")} == {"ok"}


def test_a_schema_that_is_no_json_schema_is_a_config_error_naming_key_and_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(
        "[task]\nkind = 'custom'\nprompt = 'Count.'\n"
        'response_schema = \'{"type": "object", "properties": {"n": {"type": "strin"}}}\'\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: [task] response_schema: not a valid JSON Schema")
    assert "properties.n.type" in message and "'strin'" in message


# ------------------------------------------------------------------------------- reparse
async def test_reparse_keeps_the_types_and_reads_stored_answers_under_a_new_schema(
    images_dir: Path, tmp_path: Path
) -> None:
    paths = save_scenes(images_dir, 3, prefix="s", seed=40)
    misfit = json.dumps({"count": 1, "shapes": [{"label": "c", "area": "large"}]})
    config = custom(tmp_path, local={"replay": replay(tmp_path, {paths[2]: misfit})})
    await run(config)
    out = tmp_path / "out"
    before = {r["image_path"]: r for r in current_rows(out).to_pylist()}
    # without a config: the schema the output's column carries types the answers again
    report = await asyncio.to_thread(reparse, str(out))
    assert report["reparsed"] == 3 and report["status_changes"] == {"ok->ok": 2, "error->error": 1}
    again = current_rows(out)
    assert again.schema.field("answer").type == ANSWER_TYPE
    for row in again.to_pylist():
        assert row["run_id"].split("-")[1] == "reparse"
        assert row["answer"] == before[row["image_path"]]["answer"]
    # a config whose schema takes the text: the stored answer now fits; the column changes
    loose = {**SCHEMA, "properties": {**SCHEMA["properties"]}}
    loose["properties"]["shapes"] = {
        "type": "array",
        "items": {
            **SHAPE,
            "properties": {**SHAPE["properties"], "area": {"type": ["integer", "string"]}},
        },
    }
    (tmp_path / "loose.toml").write_text(
        "[task]\nkind = 'custom'\n"
        f"prompt = {json.dumps(PROMPT)}\nresponse_schema = '{json.dumps(loose)}'\n"
    )
    report = await asyncio.to_thread(reparse, str(out), config_path=str(tmp_path / "loose.toml"))
    assert report["status_changes"] == {"ok->ok": 2, "error->ok": 1}
    # every row re-read: the old ones set aside, so `data/` holds the new answer type alone
    assert len({pq.read_schema(p).field("answer").type for p in part_files(out)}) == 1
    newest = current_rows(out)
    area_type = newest.schema.field("answer").type.field("shapes").type.value_type.field("area")
    assert area_type.type == JSON_TEXT
    rows = {r["image_path"]: r for r in newest.to_pylist()}
    assert rows["s002.png"]["answer"]["shapes"] == [
        {"label": "c", "colour": None, "area": '"large"'}
    ]
    first = before["s000.png"]["answer"]["shapes"][0]
    assert rows["s000.png"]["answer"]["shapes"][0]["area"] == str(first["area"])


async def test_parts_of_two_answer_types_read_as_the_newest_and_compact_into_one(
    tmp_path: Path,
) -> None:
    """After a schema change the output holds parts of two `answer` types until the run's end
    rewrites them (here: a run killed before its end): the project's readers conform the older
    to the newer meanwhile, and the next run's end (or a compaction) writes every part under
    the newest type, after which a plain glob reads them."""
    out = tmp_path / "out"
    out.mkdir()
    # (run ids after today's: the parts a run's end rewrites are named by today, and a part's
    # name orders it in time, so these runs must come after those rewrites, as they would)
    # a part of schema 4, before the column existed (written as that program wrote it)
    v4 = pa.schema(
        [f for f in ROW_SCHEMA if f.name != "answer"],
        metadata={"gemini_vision_pipeline.schema_version": "4"},
    )
    earliest = result_row("0.png", task="custom", json="{}")
    pq.write_table(
        pa.Table.from_pylist([earliest], v4), out / "part-20261231T000000Z-000000-00000.parquet"
    )
    old = [
        result_row(f"{name}.png", task="custom", answer=answer, json=json.dumps(answer))
        for name, answer in (
            ("a", {"count": 2, "shapes": [{"label": "x", "area": "7"}], "gone": "g"}),
            ("b", {"count": 3, "shapes": [{"label": "y", "area": "big"}], "gone": None}),
        )
    ]
    await write_rows(out, "20270101T000000Z-aaaaaa", old, answer=pa.field("answer", OLD))
    newer = {"count": 1.5, "shapes": [], "added": True}
    row = result_row("c.png", task="custom", answer=newer, json=json.dumps(newer))
    new = pa.field("answer", NEW)
    await write_rows(out, "20270102T000000Z-bbbbbb", [row], answer=new, settle=False)
    rows = current_rows(out, ["image_path", "json", "answer"])
    assert rows.schema.field("answer").type == NEW
    assert rows.to_pylist() == [
        {"image_path": "0.png", "json": "{}", "answer": None},
        {
            "image_path": "a.png",
            "json": old[0]["json"],
            "answer": {"count": 2.0, "shapes": [{"label": "x", "area": 7}], "added": None},
        },
        {
            "image_path": "b.png",
            "json": old[1]["json"],  # still holds the "big" the new type cannot
            "answer": {"count": 3.0, "shapes": [{"label": "y", "area": None}], "added": None},
        },
        {"image_path": "c.png", "json": row["json"], "answer": newer},
    ]
    with pytest.raises(pl.exceptions.PolarsError):  # what one schema per output is for
        pl.read_parquet([str(p) for p in part_files(out)])
    await write_rows(out, "20270103T000000Z-cccccc", [], answer=new)  # the next run's end
    frame = pl.read_parquet(out / "data")
    counts = frame["answer"].struct.field("count").to_list()
    assert sorted(counts, key=str) == [1.5, 2.0, 3.0, None]
    compact(str(out))  # merged into one part, still one schema
    frame = pl.read_parquet(out / "data")
    assert sorted(frame["answer"].struct.field("count").to_list(), key=str) == sorted(
        counts, key=str
    )
    assert len(part_files(out)) == 1


# -------------------------------------------------------------------- a killed run's journal
def test_a_killed_runs_journal_becomes_a_part_of_its_answer_type(out: str) -> None:
    """The segment's header names the run's answer field, so recovery writes that type even
    into an output with no part yet to take it from (on disk, and on S3 from its chunks)."""
    store = open_store(out)
    store.ensure()
    field = field_of(SCHEMA)
    name = journal.segment_name("20270101T000000Z-aaaaaa", 0)
    segment = journal.Segment(store, name, field)
    answer = {"count": 1, "background": "white", "shapes": [], "notes": None, "extra": "{}"}
    segment.append([result_row("a.png", task="custom", answer=answer, json="{}")])
    segment.close()  # the run was killed here: no part
    if not store.local:  # recovered on another machine: from the bucket's chunks alone
        (journal.spill_dir(store) / name).unlink()
    assert recover(out) == 1
    assert len(part_entries(out)) == 1
    rows = current_rows(out, ["image_path", "answer"])
    assert rows.schema.field("answer").type == ANSWER_TYPE
    assert rows.to_pylist() == [{"image_path": "a.png", "answer": answer}]


# ------------------------------------------------------------------ the type of a schema
@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string"}, pa.string()),
        ({"type": "integer"}, pa.int64()),
        ({"type": "number"}, pa.float64()),
        ({"type": "boolean"}, pa.bool_()),
        ({"enum": ["cat", "dog"]}, pa.string()),
        ({"type": "string", "enum": ["cat", None]}, pa.string()),
        ({"enum": [1, 2.5]}, pa.float64()),
        ({"enum": ["a", 1]}, JSON_TEXT),
        ({"type": ["integer", "null"]}, pa.int64()),
        ({"type": ["integer", "number"]}, pa.float64()),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, pa.string()),
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, JSON_TEXT),
        ({"type": "object"}, JSON_TEXT),
        ({"type": "object", "additionalProperties": {"type": "integer"}}, JSON_TEXT),
        ({"type": "array"}, pa.list_(JSON_TEXT)),
        ({"type": "array", "items": {"type": "number"}}, pa.list_(pa.float64())),
        (
            {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}},
            pa.struct([("b", pa.int64()), ("a", pa.string())]),  # the schema's order
        ),
        (
            {"$defs": {"p": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/p"}},
            pa.list_(pa.int64()),
        ),
        (  # recursive: a tree's children cannot be one finite type, so they are JSON text
            {
                "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}},
                "$ref": "#/$defs/n",
            },
            pa.struct([("c", JSON_TEXT)]),
        ),
        ({"$ref": "#/$defs/missing"}, JSON_TEXT),
        ({"$ref": "https://example.org/schema.json"}, JSON_TEXT),
    ],
)
def test_the_answer_type_of_a_schema(schema: dict[str, Any], expected: pa.DataType) -> None:
    assert field_of(schema).type == expected


def test_an_openapi_schema_sent_as_response_schema_types_the_same() -> None:
    """gemini-2.0-flash takes no JSON Schema: the user's schema is the OpenAPI subset, with
    upper-case types and `nullable`; its column is what the JSON Schema spelling gives."""
    openapi = {
        "type": "OBJECT",
        "properties": {
            "count": {"type": "INTEGER"},
            "labels": {"type": "ARRAY", "items": {"type": "STRING"}},
            "note": {"type": "STRING", "nullable": True},
        },
    }
    settings = TaskSettings(
        kind="custom", model="gemini-2.0-flash", prompt="x", response_schema=openapi
    )
    field = answer_field(settings)
    assert field is not None
    assert field.type == pa.struct(
        [("count", pa.int64()), ("labels", pa.list_(pa.string())), ("note", pa.string())]
    )
    parsed = get_task("custom").parse('{"count": 3, "labels": ["a"]}', "STOP", 1, 1, settings)
    assert parsed.answer == {"count": 3, "labels": ["a"], "note": None}
    assert answer_field(TaskSettings(kind="detect", response_schema=openapi)) is None
    assert answer_field(TaskSettings(kind="custom", prompt="x", response_schema={})) is None


def test_a_pydantic_model_is_a_response_schema() -> None:
    class Shape(BaseModel):
        label: str
        area: int

    class Scene(BaseModel):
        shapes: list[Shape]
        note: str | None = None

    schema = schema_of(Scene)
    assert schema_of(schema) is schema
    assert field_of(schema).type == pa.struct(
        [
            ("shapes", pa.list_(pa.struct([("label", pa.string()), ("area", pa.int64())]))),
            ("note", pa.string()),
        ]
    )
    with pytest.raises(TypeError, match="JSON Schema dict or a Pydantic model class"):
        schema_of(Scene(shapes=[]))


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ('{"count": 1.5, "shapes": []}', "at $.count: 1.5 is not of type 'integer'"),
        ('{"shapes": []}', "at $: 'count' is a required property"),
        ('{"count": 1, "shapes": {}}', "at $.shapes: {} is not of type 'array'"),
        ('{"count": 1, "shapes": [{"label": 3, "area": 1}]}', "at $.shapes[0].label: 3 is not"),
        ("[1]", "at $: [1] is not of type 'object'"),
    ],
)
def test_a_misfit_names_its_place(answer: str, error: str) -> None:
    settings = TaskSettings(kind="custom", prompt="x", response_schema=SCHEMA)
    parsed = get_task("custom").parse(answer, "STOP", 1, 1, settings)
    assert parsed.status == "error" and parsed.answer is None
    assert parsed.error is not None and parsed.error.startswith("answer does not fit")
    assert error in parsed.error
    assert parsed.json == json.dumps(json.loads(answer), separators=(",", ":"))


def test_an_integer_past_64_bits_is_a_misfit_not_a_lost_row() -> None:
    settings = TaskSettings(kind="custom", prompt="x", response_schema=SCHEMA)
    parsed = get_task("custom").parse('{"count": 1e400, "shapes": []}', "STOP", 1, 1, settings)
    assert parsed.status == "error"  # (1e400 is no JSON number Python keeps)
    parsed = get_task("custom").parse(f'{{"count": {2**70}, "shapes": []}}', "STOP", 1, 1, settings)
    assert parsed.status == "error" and "beyond a 64-bit integer" in str(parsed.error)


# ---------------------------------------------------------------------------- conform
OLD = pa.struct(
    [
        ("count", pa.int64()),
        ("shapes", pa.list_(pa.struct([("label", pa.string()), ("area", pa.string())]))),
        ("gone", pa.string()),
    ]
)
NEW = pa.struct(
    [
        ("count", pa.float64()),
        ("shapes", pa.list_(pa.struct([("label", pa.string()), ("area", pa.int64())]))),
        ("added", pa.bool_()),
    ]
)


def test_conform_casts_an_older_answer_type_to_a_newer() -> None:
    answers = [
        {
            "count": 2,
            "shapes": [{"label": "a", "area": "12"}, {"label": "b", "area": "x"}],
            "gone": "g",
        },
        None,
        {"count": None, "shapes": None, "gone": None},
    ]
    old = pa.table(
        {"key": ["k0", "k1", "k2"], "json": ["j0", None, "j2"], "answer": pa.array(answers, OLD)},
        schema=pa.schema([("key", pa.string()), ("json", pa.string()), ("answer", OLD)]),
    )
    schema = row_schema(pa.field("answer", NEW))
    table = conform(old, schema)
    assert table.schema == schema
    rows = table.to_pylist()
    assert [row["key"] for row in rows] == ["k0", "k1", "k2"]
    assert rows[0]["answer"] == {
        "count": 2.0,
        "shapes": [{"label": "a", "area": 12}, {"label": "b", "area": None}],  # "x": null
        "added": None,
    }
    assert rows[0]["json"] == "j0"  # the whole answer is still there
    assert rows[1]["answer"] is None
    assert rows[2]["answer"] == {"count": None, "shapes": None, "added": None}
    assert rows[0]["status"] is None and rows[0]["members"] is None  # columns it lacked


def test_conform_keeps_slices_chunks_and_free_form_values() -> None:
    values = pa.array([{"count": n, "shapes": [], "gone": str(n)} for n in range(6)], OLD)
    chunked = pa.chunked_array([values.slice(1, 2), values.slice(4, 2)])
    table = pa.table({"answer": chunked})
    free = conform(table, pa.schema([("answer", pa.large_string())]))
    assert [json.loads(v)["count"] for v in free.column("answer").to_pylist()] == [1, 2, 4, 5]
    typed = conform(table, pa.schema([("answer", NEW)]))
    assert [v["count"] for v in typed.column("answer").to_pylist()] == [1.0, 2.0, 4.0, 5.0]
    assert conform(table, pa.schema([("answer", OLD)])).column("answer").equals(chunked)


def test_to_table_stores_an_answer_of_another_shape_as_null_not_an_error_row() -> None:
    field = pa.field("answer", pa.struct([("count", pa.int64())]))
    rows = [
        result_row("a.png", answer={"count": 1}, json='{"count":1}'),
        result_row("b.png", answer=["not", "a", "struct"], json='["not","a","struct"]'),
    ]
    table, reasons = to_table(rows, field)
    assert reasons == []
    assert table.column("answer").to_pylist() == [{"count": 1}, None]
    assert table.column("json").to_pylist()[1] == '["not","a","struct"]'
    assert table.column("status").to_pylist() == ["ok", "ok"]
    assert to_table(rows[:1])[0].schema == ROW_SCHEMA  # no typed answer: the null column


def test_a_ref_to_elsewhere_is_an_error_row_not_a_fetch_or_a_crash() -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": "https://example.invalid/a.json"}}}
    settings = TaskSettings(kind="custom", prompt="x", response_schema=schema)
    assert answer_field(settings).type == pa.struct([("a", JSON_TEXT)])  # type: ignore[union-attr]
    parsed = get_task("custom").parse('{"a": 1}', "STOP", 1, 1, settings)
    assert parsed.status == "error" and parsed.json == '{"a":1}'
    assert parsed.error == (
        "answer does not fit response_schema at $: "
        "the schema's $ref 'https://example.invalid/a.json' cannot be resolved"
    )


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        (
            {"type": "OBJECT", "required": "count"},
            "which is not a valid JSON Schema at required: 'count' is not of type 'array' "
            "(read as JSON Schema, as answers are)",
        ),
        (
            {"type": "ARRAY", "minItems": "x"},
            "which cannot be read as JSON Schema (invalid literal for int() with base 10: 'x')",
        ),
    ],
)
def test_an_openapi_schema_is_held_to_the_meta_schema_too(
    tmp_path: Path, schema: dict[str, Any], problem: str
) -> None:
    """Sent as responseSchema (no JSON Schema on gemini-2.0-flash), a schema with a field of
    the subset but a wrong value is refused when the config is read: its answers could be
    neither checked nor typed."""
    path = tmp_path / "old.toml"
    path.write_text(
        "[api]\nmodel = 'gemini-2.0-flash'\n[task]\nkind = 'custom'\nprompt = 'Count.'\n"
        f"response_schema = '{json.dumps(schema)}'\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: [task] response_schema: sent as responseSchema (gemini-2.0-flash takes no "
        f"JSON Schema), {problem}"
    )


def test_a_lone_surrogate_in_a_typed_string_does_not_cost_the_row() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "object"}}}
    settings = TaskSettings(kind="custom", prompt="x", response_schema=schema)
    text = '{"a": "\\ud800x", "b": {"c": "\\ud800"}}'
    parsed = get_task("custom").parse(text, "STOP", 1, 1, settings)
    assert parsed.answer == {"a": "?x", "b": '{"c":"?"}'}
    table, reasons = to_table([result_row("a.png", **parsed.columns())], answer_field(settings))
    assert reasons == [] and table.column("answer").to_pylist() == [parsed.answer]
    assert json.loads(table.column("json")[0].as_py()) == {"a": "\ud800x", "b": {"c": "\ud800"}}
