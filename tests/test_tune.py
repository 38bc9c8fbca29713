"""`pipeline tune`: real runs of a sample against the local server (in process, or in a process
of its own that logs every answer it delivers), compared by `compare_outputs`; what the tune
should recommend is worked out from those runs' own comparisons and bills, never written in."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline import exits
from pipeline.cli import main
from pipeline.commands.compare import compare_outputs
from pipeline.commands.tune import parse_reference, parse_vary
from pipeline.commands.tune.core import TuneOptions, TuneReport
from pipeline.commands.tune.grid import Setting, reference_setting, richest
from pipeline.commands.tune.sample import SAMPLE, Sample
from pipeline.config import ConfigError, parse_config
from pipeline.cost import row_cost
from pipeline.localserver.server import LocalServer
from pipeline.localserver.simulation import PARAMETERS
from pipeline.output.parts import current_rows
from tests.conftest import REPO, child_env, draw_shapes
from tests.test_cli import wait_for
from tests.test_paid_answers import answers, audited_server

SAMPLES = REPO / "data" / "samples"


def write_config(tmp_path: Path, base_url: str = "local", **extra: str) -> Path:
    """A user's config file: the bundled scenes segmented, the output in `tmp_path`."""
    lines = {
        "api": f'base_url = "{base_url}"\nmodel = "gemini-2.5-flash"',
        "limits": "concurrency = 4",
        "input": f'paths = ["{SAMPLES}"]',
        "task": 'kind = "segment"',
        "output": f'dir = "{tmp_path / "out"}"',
    }
    lines.update(extra)
    path = tmp_path / "tune.toml"
    path.write_text("\n".join(f"[{name}]\n{body}" for name, body in lines.items()) + "\n")
    return path


def billed_per_1000(output: str) -> float:
    """The sample's bill per 1,000 images, row by row (pipeline/cost.py's row_cost)."""
    rows = pipeline.read(output)
    return sum(row_cost(row) or 0.0 for row in rows.to_pylist()) / rows.num_rows * 1000


def sample_paths(folder: Path) -> set[str]:
    table = current_rows(folder / "images.max_side=none", ["image_path"])
    return set(table.column("image_path").to_pylist())


# ------------------------------------------------------------------- the recommendation
def test_recommends_the_cheapest_size_that_still_agrees_on_the_bundled_scenes(
    tmp_path: Path,
) -> None:
    sides = [48, 64, 96, None]
    report = pipeline.tune(
        write_config(tmp_path), sample=8, vary={"images.max_side": sides}, repeat=2, seed=3
    )
    assert report.exit_code == exits.OK and report.stop_reason is None
    by_side = {trial.setting.as_dict()["images.max_side"]: trial for trial in report.trials}
    reference = report.trials[0]
    assert reference.role == "reference" and reference.setting.as_dict() == {
        "images.max_side": None
    }
    repeat = report.trials[1]
    assert repeat.role == "repeat" and report.noise_floor == pytest.approx(
        compare_outputs(reference.output, repeat.output).agreement
    )
    # what the runs themselves say: each size's agreement, and what its rows were billed
    agreement = {
        side: compare_outputs(reference.output, by_side[side].output).agreement for side in sides
    }
    cost = {side: billed_per_1000(by_side[side].output) for side in sides}
    threshold = 0.95 * report.noise_floor
    agreeing = [side for side in sides if side is None or agreement[side] >= threshold]
    expected = min(agreeing, key=lambda side: cost[side])
    assert agreement[48] < threshold, "the scenario: at 48 px the server slips labels"
    assert expected is not None, "the scenario: a smaller size still agrees"
    assert report.recommended is by_side[expected]
    assert by_side[expected].agreement == pytest.approx(agreement[expected])
    assert by_side[expected].cost_per_1000 == pytest.approx(
        cost[expected], rel=1e-3
    )  # a bill of 6 places
    assert tomllib.loads(report.recommended.setting.snippet()) == {"images": {"max_side": expected}}
    # every output answers the very same sample, of 8 of the 10 scenes
    assert len(sample_paths(Path(report.folder))) == report.sample.images == 8
    for trial in report.trials:
        assert pipeline.read(trial.output).num_rows == 8
        assert trial.role == "repeat" or trial.projected["images"] == 10


def test_json_shape_and_a_rerun_pays_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path))
    args = ["tune", config, "--sample", "4", "--vary", "images.max_side=48,none", "--quiet"]
    assert main([*args, "--json"]) == exits.OK
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {
        "config", "folder", "sample", "target", "noise_floor", "threshold", "price",
        "settings", "recommendation", "spent_usd", "stop_reason", "exit_code",
    }  # fmt: skip
    assert report["sample"]["images"] == 4
    assert (report["noise_floor"], report["threshold"]) == (None, 0.95)  # no repeat: a floor of 1
    assert [s["role"] for s in report["settings"]] == ["reference", "candidate"]
    assert [s["setting"] for s in report["settings"]] == [
        {"images.max_side": None},
        {"images.max_side": 48},
    ]
    first = report["settings"][0]
    assert set(first) >= {"agreement", "cost_per_1000_usd", "projected", "qualifies", "run"}
    assert set(first["projected"]) == {"images", "cost_usd", "batch_cost_usd"}
    assert set(report["price"]) == {"runs", "mode", "cost_usd", "batch_cost_usd", "max_usd"}
    assert report["recommendation"]["snippet"].startswith("[images]\n")
    assert all(s["run"]["api_calls"] > 0 for s in report["settings"])

    assert main(args) == exits.OK  # the text report; a rerun resumes every run: no call
    text = capsys.readouterr()
    assert "recommended: " in text.out and "paste into" in text.out
    assert text.err.count("0 API calls") == 2, text.err


def test_a_setting_outside_the_grid_as_the_reference(tmp_path: Path) -> None:
    report = pipeline.tune(
        write_config(tmp_path),
        sample=3,
        vary={"images.max_side": [64]},
        reference={"images.max_side": None},
    )
    assert [t.role for t in report.trials] == ["reference", "candidate"]
    assert report.trials[0].setting.slug == "images.max_side=none"
    assert report.trials[1].agreement == pytest.approx(
        compare_outputs(report.trials[0].output, report.trials[1].output).agreement
    )


# ------------------------------------------------------------------------ money and resume
async def test_refuses_before_any_call_when_the_experiment_passes_max_usd(
    tmp_path: Path,
    server: LocalServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    config = write_config(tmp_path, server.base_url)
    args = ["tune", str(config), "--sample", "5", "--vary", "images.max_side=48,none"]
    code = await asyncio.to_thread(main, [*args, "--max-usd", "0.001", "--quiet"])
    assert code == exits.STOPPED
    out = capsys.readouterr().out
    assert "over --max-usd $0.0010: nothing was run" in out
    assert server.stats()["requests_total"] == 0  # not even the preflight
    assert sorted(p.name for p in (tmp_path / "out" / "_tune").iterdir()) == [SAMPLE]

    cap = 1.0  # enough for the estimate: every run goes, and the bill stays within it
    code = await asyncio.to_thread(main, [*args, "--max-usd", str(cap), "--quiet", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == exits.OK and report["price"]["cost_usd"] <= cap
    assert 0 < report["spent_usd"] <= cap
    assert report["spent_usd"] == pytest.approx(
        sum(s["run"]["cost_usd"] for s in report["settings"])
    )


def test_each_run_is_held_to_what_is_left_of_the_cap(tmp_path: Path) -> None:
    """The engine keeps the cap request by request: each run's own [limits] max_usd is what
    the runs before it left (its summary's spend says what it was held to)."""
    cap = 1.0
    vary = {"images.max_side": [48, 96, None]}
    report = pipeline.tune(write_config(tmp_path), sample=3, vary=vary, max_usd=cap)
    spent = 0.0
    for trial in report.trials:
        assert trial.summary.spend["max_usd"] == pytest.approx(cap - spent)
        spent += trial.summary.cost_usd
    assert report.spent_usd == pytest.approx(spent) and 0 < spent <= cap


def tune_child(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "tune", str(config), "--sample", "6",
         "--vary", "images.max_side=48,96,none", "--quiet", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(GEMINI_API_KEY="test-key"), cwd=REPO,
    )  # fmt: skip


def test_resumes_after_a_kill_without_re_paying(tmp_path: Path) -> None:
    """A kill -9 in the second setting's run: the rerun asks the server only for what no run
    was answered (the calls in flight at the kill at most), and ends with the recommendation."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(9):  # 160 px: both 48 and 96 shrink every image (three requests apiece)
        draw_shapes(160, 120, seed=500 + i, count=2)[0].save(images / f"s{i}.png")
    log, concurrency, runs, sample = tmp_path / "answers.jsonl", 2, 3, 6
    with audited_server(log) as url:
        config = write_config(
            tmp_path,
            url,
            input=f'paths = ["{images}"]',
            task='kind = "detect"',
            limits=f"concurrency = {concurrency}",
        )
        child = tune_child(config)
        wait_for(lambda: len(answers(log)) >= sample + 2)  # into the second run
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        before = len(answers(log))
        assert before < runs * sample, "the kill came after the last run: nothing was tested"
        rerun = tune_child(config)
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == exits.OK, err
    report = json.loads(out)
    calls = Counter(sha for entry in answers(log) for sha in entry["sha256"])
    assert len(calls) == runs * sample  # every image at every setting answered ...
    re_paid = sum(n - 1 for n in calls.values())
    assert re_paid <= concurrency, f"{re_paid} answers bought twice"  # ... once, but in flight
    assert sum(s["run"]["api_calls"] for s in report["settings"]) == len(answers(log)) - before
    assert all(pipeline.read(s["output"]).num_rows == sample for s in report["settings"])
    assert report["recommendation"] is not None


# ------------------------------------------------------------------------------- usage
@pytest.mark.parametrize(
    ("vary", "named"),
    [
        ("images.max_sid=48", "--vary images.max_sid: unknown key [images] max_sid"),
        ("image.max_side=48", "--vary image.max_side: not a setting"),
        ("images.max_side=big", "images.max_side must be an integer"),
        ("api.model=none", "--vary api.model: cannot be none"),
        ("output.dir=a,b", "--vary output.dir: tune sets [output] itself"),
        ("task.temperature=0.2,1.0", "--vary task.temperature: no richest value"),
        ("images.max_side", "write KEY=VALUE"),
        ("api.model=gemini-2.5-flash,gemini-2.5-pro", "gemini-2.5-pro was shut down on"),
    ],
)
def test_a_bad_vary_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], vary: str, named: str
) -> None:
    config = str(write_config(tmp_path))
    assert main(["tune", config, "--sample", "2", "--vary", vary, "--quiet"]) == exits.USAGE
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing drawn, nothing run


def test_a_value_that_does_not_go_with_the_model_is_refused_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """thinking_level is Gemini 3's: on 2.5 the config's own cross-key check names it."""
    config = str(write_config(tmp_path))
    args = ["tune", config, "--sample", "2", "--vary", "task.thinking_level=low", "--quiet"]
    assert main(args) == exits.USAGE
    assert "thinking_level" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_options_out_of_range_and_another_draw_in_the_same_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(write_config(tmp_path))
    base = ["tune", config, "--vary", "images.max_side=48", "--quiet"]
    for extra, named in (
        (["--sample", "0"], "--sample must be"),
        (["--sample", "2", "--target", "1.5"], "--target must be"),
        (["--sample", "2", "--repeat", "0"], "--repeat must be"),
    ):
        assert main([*base, *extra]) == exits.USAGE
        assert named in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = write_config(empty, input=f'paths = ["{empty}"]')
    assert main(["tune", str(nothing), "--sample", "2", "--vary", "images.max_side=48"]) == 2
    assert "holds no usable image to sample" in capsys.readouterr().err
    assert main([*base, "--sample", "2"]) == exits.OK
    assert main([*base, "--sample", "3"]) == exits.USAGE
    assert "holds a sample of 2 drawn with seed 0, not --sample 3" in capsys.readouterr().err


# -------------------------------------------------------------------------- the pure parts
def loaded(tmp_path: Path) -> Any:
    return parse_config(
        {"api": {"base_url": "local"}, "input": {"paths": [str(SAMPLES)]}}, "t.toml", tmp_path
    )


def test_richest_per_key(tmp_path: Path) -> None:
    config = loaded(tmp_path)
    assert richest("images.max_side", [48, None, 96], config) is None
    assert richest("images.max_side", [48, 768, 96], config) == 768
    assert richest("task.media_resolution", ["low", "high", "medium"], config) == "high"
    assert richest("task.thinking_level", ["minimal", "high", None], config) == "high"
    assert richest("task.thinking_budget", [0, 1024, -1], config) == -1
    models = ["gemini-2.5-flash-lite", "gemini-2.5-pro", "gemini-2.5-flash"]
    assert richest("api.model", models, config) == "gemini-2.5-pro"
    with pytest.raises(ConfigError, match=r"task\.temperature"):
        richest("task.temperature", [0.1, 0.5], config)


def test_values_are_read_as_toml_and_checked(tmp_path: Path) -> None:
    assert parse_vary(["images.max_side=48,0,none,48"]) == {"images.max_side": (48, None)}
    assert parse_vary(["api.model=gemini-2.5-flash-lite, gemini-2.5-pro"]) == {
        "api.model": ("gemini-2.5-flash-lite", "gemini-2.5-pro")
    }
    assert parse_reference(["images.max_side=none,api.model=gemini-2.5-pro"]) == {
        "images.max_side": None,
        "api.model": "gemini-2.5-pro",
    }
    varied = parse_vary(["images.max_side=48,96", "task.media_resolution=low,high"])
    reference = reference_setting(varied, {}, loaded(tmp_path))
    assert reference.as_dict() == {"images.max_side": 96, "task.media_resolution": "high"}
    assert reference.applied(loaded(tmp_path)).task.media_resolution == "high"


def test_slugs_are_paths_of_one_component_and_never_collide() -> None:
    plain = Setting((("images.max_side", 96), ("api.model", "gemini-2.5-flash-lite")))
    assert plain.slug == "images.max_side=96+api.model=gemini-2.5-flash-lite"
    odd = [Setting((("task.prompt", text),)) for text in ("a/b c", "a b/c", "../..", "x" * 300)]
    slugs = [setting.slug for setting in odd]
    assert len(set(slugs)) == len(slugs)
    assert all("/" not in s and " " not in s and s not in (".", "..") for s in slugs)
    assert all(len(s) <= 110 for s in slugs)


def test_an_output_on_a_bucket(tmp_path: Path, out: str) -> None:
    """The sample's manifest and every setting's output under `OUT/_tune` of a bucket output
    (the `out` fixture: on disk, then on the local S3)."""
    config = write_config(tmp_path, output=f'dir = "{out}"')
    report = pipeline.tune(config, sample=3, vary={"images.max_side": [48, None]})
    assert report.sample.manifest == f"{out}/_tune/{SAMPLE}"
    assert [t.output for t in report.trials] == [
        f"{out}/_tune/images.max_side=none",
        f"{out}/_tune/images.max_side=48",
    ]
    assert all(pipeline.read(t.output).num_rows == 3 for t in report.trials)
    assert report.recommended is not None and report.trials[1].agreement is not None


def test_the_target_is_read_against_the_noise_floor() -> None:
    """A reference that agrees with its own repeat at 0.90: a setting needs 0.95 x 0.90."""
    options = TuneOptions(sample=4, vary={"images.max_side": (48,)}, target=0.95, repeat=2)
    report = TuneReport("c.toml", "out/_tune", Sample("m", 0, 4, 4), options, [], {}, 0.9)
    assert report.threshold == pytest.approx(0.855)
    assert report.as_dict()["threshold"] == pytest.approx(0.855)


def test_on_the_settings_simulation_tune_recommends_what_its_documented_rates_predict(
    tmp_path: Path,
) -> None:
    """Under `[local] simulate = "settings"` a lite model misses and slips more than a flash
    one, a pro one not at all (pipeline/localserver/simulation.py's PARAMETERS). Large shapes
    on 384-px scenes keep resolution out of it, and 2.5 models at their lowest thinking (budget
    0) do not think, so each tier's expected agreement with the pro reference follows from its
    rates alone: B's objects are the (1 - miss) share of A's, (1 - slip) of them labelled
    alike, so precision 1 - slip, recall (1 - miss)(1 - slip), and the F1 of the two."""
    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(40):
        draw_shapes(384, 384, seed=500 + i, count=3)[0].save(folder / f"s{i:03d}.png")
    config = write_config(
        tmp_path,
        input=f'paths = ["{folder}"]',
        task='kind = "detect"',
        local='simulate = "settings"',
    )
    models = ["gemini-2.5-flash-lite", "gemini-2.5-flash", "gemini-3.1-pro-preview"]
    report = pipeline.tune(config, sample=40, vary={"api.model": models}, target=0.87)

    def expected(tier: str) -> float:
        rates = PARAMETERS.tiers[tier]
        precision = 1 - rates.slip_rate
        recall = (1 - rates.miss_rate) * precision
        return 2 * precision * recall / (precision + recall)

    by_model = {trial.setting.as_dict()["api.model"]: trial for trial in report.trials}
    assert by_model["gemini-3.1-pro-preview"].role == "reference"  # the dearest model
    for model, tier in (("gemini-2.5-flash-lite", "lite"), ("gemini-2.5-flash", "flash")):
        assert by_model[model].agreement == pytest.approx(expected(tier), abs=0.06), model
    assert expected("lite") < 0.87 < expected("flash")  # the scenario: the target between them
    assert report.recommended is by_model["gemini-2.5-flash"]
