"""Config loading: every shipped file is valid, every mistake names its key and file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, parse_config, settings_hash, with_overrides
from pipeline.gemini.content import build_generate_content_body
from pipeline.tasks import get_task

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))


def test_configs_folder_is_not_empty() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.toml", "production.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    request = get_task(config.task.kind).request(config.task)
    assert request.prompt
    assert config.task.model == config.api.model
    if config.api.base_url == "local":  # runnable here: its inputs exist
        assert all(Path(p).exists() for p in config.input.paths), config.input.paths


def test_demo_paths_resolve_against_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.toml")
    assert Path(config.input.paths[0]).is_dir()
    assert Path(config.output.dir).is_absolute()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nrpm = 'fast'\n", "[limits] rpm must be an integer"),
        ("[limits]\nconcurrency = 0\n", "[limits] concurrency must be a positive integer"),
        ("[limits]\nrmp = 10\n", "unknown key [limits] rmp"),
        ("[limts]\nrpm = 10\n", "unknown section [limts]"),
        ("[api]\nflavor = 'grpc'\n", "[api] flavor must be one of"),
        ("[api]\nbase_url = 'ftp://x'\n", "[api] base_url must be an http(s) URL"),
        ("[images]\nmode = 'fax'\n", "[images] mode must be one of"),
        ("[task]\nkind = 'classify'\n", "[task] labels is required"),
        ("[task]\nkind = 'custom'\n", "[task] prompt is required"),
        (
            "[task]\nmask_threshold = 300\n",
            "[task] mask_threshold must be an integer between 0 and 255",
        ),
        (
            "[task]\ntemperature = nan\n",
            "[task] temperature must be a number between 0 and 2, got nan",
        ),
        ("[api]\ntimeout = inf\n", "[api] timeout must be a positive finite number"),
        ("[output]\nflush_seconds = nan\n", "[output] flush_seconds must be a positive finite"),
        ("[api]\nversion = 'v2'\n", "[api] version must be one of"),
        (
            "[api]\nmodel = 'gemini-3.8-flash'\n[task]\nthinking_level = 'minimal'\n",
            "[task] thinking_level: 'minimal' is refused by gemini-3.8-flash: 'minimal' is not a "
            "supported thinking level for this model. Allowed values are: medium, low, high.",
        ),
        (
            "[api]\nmodel = 'gemini-2.5-pro'\n[task]\nthinking_budget = 0\n",
            "[task] thinking_budget: 0 is refused by gemini-2.5-pro",
        ),
        (
            "[api]\nmodel = 'gemini-2.5-flash'\n[task]\nthinking_level = 'low'\n",
            "[task] thinking_level: 'low' is refused by gemini-2.5-flash",
        ),
        (
            "[api]\nflavor = 'interactions'\n[task]\nthinking_budget = 0\n",
            "[task] thinking_budget: the Interactions API has no thinking budget",
        ),
        (
            "[api]\nmodel = 'gemini-3-flash-preview'\nversion = 'v1'\n"
            "[task]\nmedia_resolution = 'ultra_high'\n",
            "[task] media_resolution: 'ultra_high' is set per image, which gemini-3-flash-preview "
            "does not take on API version v1",
        ),
        (
            "[api]\nmodel = 'gemini-1.5-flash'\n[task]\nmedia_resolution = 'low'\n",
            "[task] media_resolution: 'low' is refused by gemini-1.5",
        ),
        (
            "[api]\nmodel = 'gemini-3-pro-preview'\n[task]\nkind = 'segment'\n",
            "[task] kind: gemini-3-pro-preview does not return segmentation masks",
        ),
        (
            "[api]\nmodel = 'gemini-2.0-flash'\nflavor = 'interactions'\n",
            '[api] flavor = "interactions": gemini-2.0-flash is not served',
        ),
        ('[models."gemini-9"]\ntokens = "tiles"\n', '[models."gemini-9"] generation is required'),
        ('[models."gemini-9"]\nlike = "gemini-8"\n', '[models."gemini-9"] like must name'),
        (
            '[models."gemini-9"]\nlike = "gemini-3.8-flash"\nthinking = {control = "level"}\n',
            '[models."gemini-9"] thinking must be a list of strings',
        ),
        ("[task]\nresponse_schema = '{nope'\n", "[task] response_schema must be a JSON schema"),
        (
            "[api]\ninline_limit_mb = 150\n",
            "[api] inline_limit_mb must be a number of MB above 0 and at most 100 (the live "
            "service's interactive limit), got 150",
        ),
        (
            "[task]\nkind = 'custom'\nprompt = 'Count.'\n"
            'response_schema = \'{"type": "array", "items": {"type": "strin"}}\'\n',
            "[task] response_schema: not a valid JSON Schema at items.type: 'strin' is not "
            "valid under any of the given schemas",
        ),
        (
            "[api]\nmodel = 'gemini-2.0-flash'\n[task]\nkind = 'custom'\nprompt = 'Count.'\n"
            'response_schema = \'{"type": "object", "properties": {"n": {"type": "int"}}}\'\n',
            "[task] response_schema: sent as responseSchema (gemini-2.0-flash takes no JSON "
            "Schema), which has no type 'int' at properties.n.type (types: STRING, NUMBER, "
            "INTEGER, BOOLEAN, ARRAY, OBJECT, NULL)",
        ),
        (
            "[api]\nmodel = 'gemini-2.0-flash'\n[task]\nkind = 'custom'\nprompt = 'Count.'\n"
            'response_schema = \'{"type": "object", "additionalProperties": false}\'\n',
            "[task] response_schema: sent as responseSchema (gemini-2.0-flash takes no JSON "
            "Schema), which has no field 'additionalProperties'",
        ),
        ("[local]\nfault_rate = 2\n", "[local] fault_rate must be within [0, 1], got 2"),
        ("[input]\npaths = [1, 2]\n", "[input] paths must be a list of strings"),
        ("[task\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_flags_override_and_are_validated(tmp_path: Path) -> None:
    config = parse_config({"task": {"kind": "detect"}}, "x.toml", tmp_path)
    changed = with_overrides(
        config, {"api.model": "gemini-3-flash-preview", "limits.rpm": 50, "task.kind": "segment"}
    )
    assert (changed.api.model, changed.task.model) == ("gemini-3-flash-preview",) * 2
    assert (changed.limits.rpm, changed.task.kind) == (50, "segment")
    assert changed.task.thinking_level is None  # defaults follow the new model ...
    assert get_task("segment").request(changed.task).thinking_level == "minimal"
    with pytest.raises(ConfigError, match="--concurrency must be a positive integer"):
        with_overrides(config, {"limits.concurrency": 0})
    with pytest.raises(ConfigError, match="--base-url must be an http"):
        with_overrides(config, {"api.base_url": "ftp://x"})
    # ... and a flag that makes the file's settings refused is caught like the file would be
    pinned = parse_config({"task": {"thinking_budget": 0}}, "x.toml", tmp_path)
    with pytest.raises(ConfigError, match=r"thinking_budget: 0 is refused by gemini-1\.5"):
        with_overrides(pinned, {"api.model": "gemini-1.5-flash"})


def test_user_model_entries_extend_the_table(tmp_path: Path) -> None:
    config = parse_config(
        {
            "api": {"model": "gemini-9-flash"},
            "task": {"kind": "segment"},
            "models": {
                "gemini-9-flash": {
                    "like": "gemini-3.8-flash",
                    "prices": {"input": 1.0, "output": 4.0},
                }
            },
        },
        "x.toml",
        tmp_path,
    )
    spec = config.task.spec
    assert (spec.name, spec.segmentation, spec.thinking.levels) == (
        "gemini-9-flash",
        "polygon",
        ("low", "medium", "high"),
    )
    price = spec.price()
    assert (price.input, price.batch_input) == (1.0, 0.5)
    assert get_task("segment").request(config.task).thinking_level == "low"


def test_every_setting_is_documented_in_the_readme() -> None:
    from pipeline.config import SECTIONS, declarations

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [
        f"[{section}] {key}"
        for section in SECTIONS
        for key in declarations(section)
        if f"[{section}] {key}" not in readme and f"`{key}`" not in readme
    ]
    assert not missing, f"settings missing from the README's configuration table: {missing}"


def test_settings_hash_tracks_what_changes_the_answer(tmp_path: Path) -> None:
    config = parse_config({"task": {"kind": "segment"}}, "x.toml", tmp_path)

    def digest(c) -> str:
        return settings_hash(c, get_task(c.task.kind).request(c.task))

    base = digest(config)
    assert digest(config) == base
    assert digest(replace(config, task=replace(config.task, prompt="Segment it."))) != base
    assert digest(with_overrides(config, {"api.model": "gemini-2.5-pro"})) != base
    assert digest(replace(config, images=replace(config.images, max_side=512))) != base
    assert digest(replace(config, api=replace(config.api, flavor="interactions"))) != base
    # parse-only settings are a reparse, not a new call
    assert digest(replace(config, task=replace(config.task, mask_threshold=200))) == base
    assert digest(replace(config, limits=replace(config.limits, rpm=5))) == base


def test_xhigh_is_expressible_through_a_users_model_entry(tmp_path: Path) -> None:
    """google-genai 3.6's ThinkingLevel has XHIGH; no page names a model taking it, so no entry
    lists it, and a user who knows better says so in their config."""
    plain = {"api": {"model": "gemini-3.8-flash"}, "task": {"thinking_level": "xhigh"}}
    with pytest.raises(ConfigError, match=r"\[task\] thinking_level: 'xhigh' is refused"):
        parse_config(plain, "x.toml", tmp_path)
    levels = {"control": "level", "levels": ["low", "medium", "high", "xhigh"]}
    config = parse_config(
        {**plain, "models": {"gemini-3.8-flash": {"thinking": levels}}}, "x.toml", tmp_path
    )
    request = get_task("detect").request(config.task)
    assert build_generate_content_body(request)["generationConfig"]["thinkingConfig"] == {
        "thinkingLevel": "XHIGH"
    }


def test_the_inline_limit_may_be_raised_to_the_live_services_100_mb(tmp_path: Path) -> None:
    """20 MB works everywhere (Batch Mode too); a Developer API user may go up to 100 MB."""
    assert parse_config({}, "x.toml", tmp_path).inline_limit_bytes == 20 * 2**20
    config = parse_config({"api": {"inline_limit_mb": 100}}, "x.toml", tmp_path)
    assert config.inline_limit_bytes == 100 * 2**20


def test_a_well_formed_custom_schema_is_sent_as_the_model_takes_it(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    task = {"kind": "custom", "prompt": "Count.", "response_schema": schema}
    for model, sent in (("gemini-2.5-flash", "response_json_schema"), ("gemini-2.0-flash", None)):
        config = parse_config({"api": {"model": model}, "task": task}, "x.toml", tmp_path)
        request = get_task("custom").request(config.task)
        if sent:
            assert request.response_json_schema == schema and request.response_schema is None
        else:  # the OpenAPI subset takes these lowercase names too (enum names in any case)
            assert request.response_schema == schema
