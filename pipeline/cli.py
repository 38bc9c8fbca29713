"""The `pipeline` command: run, status, estimate, reparse, compact, prune, export, render, compare,
tune, models, serve-local, batch."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import importlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from pipeline import __version__, exits
from pipeline.commands.exports.errors import ExportError
from pipeline.config import ConfigError, flags, load_config, with_overrides
from pipeline.localserver.arguments import add_serve_arguments
from pipeline.output.stores import MissingExtra, OutputDirBusy, UnreadablePart

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.run.summary import RunSummary

EPILOG = exits.EPILOG


def _config(args: argparse.Namespace) -> Config:
    """The config file with the command line's setting flags applied (each checked by its
    declaration in pipeline/config.py)."""
    overrides = {dest: getattr(args, dest, None) for dest in _flag_dests()}
    return with_overrides(load_config(args.config), overrides)


def _flag_dests() -> list[str]:
    return [f"{section}.{key}" for section, key, _ in flags()]


@contextlib.contextmanager
def _collecting_less() -> Iterator[None]:
    """While the run lasts, the objects that exist before it (every import's) leave the cyclic
    garbage collector's sight (`gc.freeze`), and its youngest generation is collected after
    10,000 allocations instead of 700. A run allocates answers' dicts by the hundred thousand and
    frees them by reference counting; the collector's passes over them and over the import-time
    objects took ~0.18 s of a 1,500-image segment run's ~4.5 s of CPU, ~0.09 s with this
    (`gc.callbacks` timing, the throughput benchmark's replay run). Undone afterwards: a caller
    of `main()` (a test, a notebook) keeps its own collector; one that froze objects itself is
    left its frozen set (`gc.unfreeze` would thaw them all), nothing more frozen."""
    thresholds = gc.get_threshold()
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    gc.set_threshold(10_000, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if freeze:
            gc.unfreeze()


def _run(args: argparse.Namespace) -> int:
    from pipeline.engines import RunOptions, check_run, run
    from pipeline.records import skip_pandas_probe

    skip_pandas_probe()
    config = _config(args)
    if args.plan:
        return _plan(config, args)
    options = RunOptions(
        retry_errors=args.retry_errors,
        limit=args.limit,
        progress=not args.quiet,
        submit_only=args.submit_only,
        ask_before_redo=not args.yes,
    )
    check_run(config, options)
    with _collecting_less():
        summary = run(config, options)
    if args.json:
        _print(summary.to_json())
    _say(f"run {summary.run_id}: {_run_line(summary)} -> {config.output.dir}")
    if summary.abandoned:
        _say(summary.abandoned_line())
    if summary.model_resolution:
        _say(f"model {summary.model_resolution}")
    if line := summary.spend_line():
        _say(line)
    if line := summary.context_cache_line():
        _say(line)
    _say_batch(summary)
    if summary.stop_reason:
        _say(f"stopped: {summary.stop_reason}. {summary.resume_hint}")
    elif summary.resume_hint:
        _say(summary.resume_hint)
    return summary.exit_code


def _run_line(summary: RunSummary) -> str:
    """What a run did, as a person reads it: rows by status, then what it passed by."""
    recovered = f", {summary.recovered} recovered from a killed run" if summary.recovered else ""
    ignored = f", {summary.ignored} ignored (not in [input] include)" if summary.ignored else ""
    return (
        f"{_rows_line(summary.rows)}, {summary.skipped} skipped ({_skipped(summary)}){ignored}"
        f"{recovered}, {summary.api_calls} API calls, {summary.throttled} 429s, "
        f"${summary.cost_usd:,.4f}"
    )


def _skipped(summary: RunSummary) -> str:
    """Why the skipped files were skipped: done, or in a Batch Mode job in flight."""
    if not summary.in_batch_jobs:
        return "already done"
    done = summary.skipped - summary.in_batch_jobs
    return f"{done} already done, {summary.in_batch_jobs} in a Batch Mode job in flight"


def _rows_line(rows: Mapping[str, int]) -> str:
    """`5 rows (4 ok, 1 error)`; `0 rows`."""
    total = sum(rows.values())
    detail = ", ".join(f"{count} {status}" for status, count in sorted(rows.items()) if count)
    return f"{total} rows ({detail})" if detail else f"{total} rows"


def _print(text: str) -> None:
    """The machine-readable report (`--json`): stdout, which a reader may close early."""
    print(text, flush=True)


def _say_batch(summary: RunSummary) -> None:
    batch = summary.batch
    if batch:
        owed = len(batch.get("jobs_awaiting_output") or ())
        unreadable = batch.get("result_lines_unreadable") or 0
        lost = batch.get("prediction_lines_never_arrived") or 0
        _say(
            f"batch: {batch['jobs_created']} jobs created ({batch['requests_submitted']} "
            f"requests), {batch['jobs_collected']} collected, {len(batch['jobs_ended'])} ended "
            f"without results, {batch['jobs_in_flight']} in flight"
            + (f" ({owed} succeeded, output not attached yet)" if owed else "")
            + (f"; {unreadable} result lines unreadable" if unreadable else "")
            + (f"; {lost} prediction lines answered never arrived" if lost else "")
        )


def _say(text: str) -> None:
    """A message on stderr; a closed stderr (a cron job's) must not change the exit code."""
    if sys.stderr is None:  # started with fd 2 closed
        return
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


def _recover(output_dir: str) -> None:
    """Readers first check the output is there (a typo is exit 2 naming it, not an empty
    report), then commit a killed run's journal (answers already paid for) into parts."""
    from pipeline.output.recovery import recover

    _existing_output(output_dir)
    rows = recover(output_dir)
    if rows:
        _say(f"recovered {rows} answered rows of a killed run from its journal")


def _existing_output(output_dir: str) -> None:
    from pipeline.commands.outputs import require_output

    require_output(output_dir)


def _status(args: argparse.Namespace) -> int:
    from pipeline.commands.status import format_status, status

    _recover(args.output_dir)
    report = status(args.output_dir)
    if args.config:
        from pipeline.commands.status import pending

        config = with_overrides(load_config(args.config), {"output.dir": args.output_dir})
        report["pending"] = pending(config, retry_errors=args.retry_errors)
    print(json.dumps(report, indent=2, default=str) if args.json else format_status(report))
    # a part that cannot be read hides its rows from every count above: a cron check must see it
    return exits.USAGE if report["unreadable_parts"] else exits.OK


# `export FORMAT`: the options each format takes beyond the common ones (argparse dest -> the
# export function's keyword)
EXPORT_OPTIONS = {
    "coco": {"captions": "captions_path"},
    "yolo": {"copy": "copy", "allow_host": "allow_hosts"},
    "voc": {"copy": "copy", "allow_host": "allow_hosts"},
    "hf": {"copy": "copy", "allow_host": "allow_hosts"},
    "labelstudio": {"label_config": "config_path", "image_prefix": "image_prefix"},
}


def _export(args: argparse.Namespace) -> int:
    from pipeline.commands.exports.dataset import RootMap

    export = getattr(
        importlib.import_module(f"pipeline.commands.exports.{args.format}"),
        f"export_{args.format}",
    )
    options = {kw: getattr(args, dest) for dest, kw in EXPORT_OPTIONS[args.format].items()}
    if "allow_hosts" in options:
        options["allow_hosts"] = tuple(options["allow_hosts"])
    roots = RootMap.parse(args.images_root)
    _recover(args.output_dir)
    summary = export(args.output_dir, args.out, task=args.task, roots=roots, **options)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        _say(summary.line())
    return 0


def _render(args: argparse.Namespace) -> int:
    from pipeline.commands.exports.dataset import RootMap
    from pipeline.commands.render import render

    _recover(args.output_dir)
    if args.compare:
        _recover(args.compare)
    report = render(
        args.output_dir,
        args.out,
        limit=args.limit,
        roots=RootMap.parse(args.images_root),
        allow_hosts=tuple(args.allow_host),
        compare=args.compare,
    )
    if args.json:
        _print(json.dumps(report, indent=2))
    missing = report["missing_sources"]
    _say(
        f"wrote {report['index']}: {report['entries']} images, {report['labels']} labels"
        + (f", {missing} with their source image missing" if missing else "")
        + (f", {report['problems']} problems (listed on the page)" if report["problems"] else "")
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pipeline.commands.compare import compare_outputs, format_report
    from pipeline.commands.render import COLUMNS, render

    _recover(args.output_a)
    _recover(args.output_b)
    report = compare_outputs(
        args.output_a,
        args.output_b,
        iou=args.iou,
        labels=args.labels,
        radius=args.radius,
        task=args.task,
        columns=COLUMNS if args.out else (),  # the gallery draws from the rows read here
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    if args.out:
        from pipeline.commands.exports.dataset import RootMap

        gallery = render(
            args.output_a,
            args.out,
            compare=report,
            roots=RootMap.parse(args.images_root),
            allow_hosts=tuple(args.allow_host),
        )
        _say(f"wrote {gallery['index']}: {gallery['entries']} images that disagree, A beside B")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from pipeline.commands.tune import TuneOptions, format_tune, parse_reference, parse_vary, tune

    options = TuneOptions(
        sample=args.sample,
        vary=parse_vary(args.vary),
        reference=parse_reference(args.reference),
        target=args.target,
        max_usd=args.max_usd,
        repeat=args.repeat,
        seed=args.seed,
    )
    report = tune(_config(args), options, lambda config, label: _tune_run(args, config, label))
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_tune(report))
    return report.exit_code


def _tune_run(args: argparse.Namespace, config: Config, label: str) -> RunSummary:
    """One setting of a tune, as `pipeline run` runs it; its line as the run's own."""
    from pipeline.engines import RunOptions, check_run, run

    options = RunOptions(progress=not args.quiet, seed=args.seed)
    check_run(config, options)
    with _collecting_less():
        summary = run(config, options)
    _say(f"tune {label}: {_run_line(summary)}")
    return summary


def _plan(config: Config, args: argparse.Namespace) -> int:
    """`run --plan`: the estimate's plan and cost of this run, printed; no call, no key."""
    from pipeline.commands.estimate import estimate, format_estimate
    from pipeline.inputs.checks import require_inputs

    require_inputs(config)
    report = estimate(config, limit=args.limit, retry_errors=args.retry_errors, exact=args.exact)
    if args.json:
        _print(json.dumps(report, indent=2))
    _say(format_estimate(report))
    return exits.OK


def _estimate(args: argparse.Namespace) -> int:
    from pipeline.commands.estimate import estimate, format_estimate
    from pipeline.inputs.checks import require_inputs

    config = _config(args)
    require_inputs(config)
    report = estimate(config, limit=args.limit, retry_errors=args.retry_errors, exact=args.exact)
    print(json.dumps(report, indent=2) if args.json else format_estimate(report))
    return 0


def _reparse(args: argparse.Namespace) -> int:
    from pipeline.commands.reparse import reparse

    _existing_output(args.output_dir)
    report = reparse(args.output_dir, config_path=args.config, mask_threshold=args.mask_threshold)
    if args.json:
        _print(json.dumps(report, indent=2))
    changes = ", ".join(
        f"{count} {change.replace('->', ' -> ')}"
        for change, count in sorted(report["status_changes"].items())
    )
    _say(
        f"reparse {report['run_id']}: {report['reparsed']} stored answers parsed again"
        + (f" ({changes})" if changes else "")
    )
    return 0


def _prune(args: argparse.Namespace) -> int:
    from pipeline.commands.prune import format_prune, prune

    _recover(args.output_dir)
    config = with_overrides(load_config(args.config), {"output.dir": args.output_dir})
    report = prune(config, args.output_dir, apply=args.apply)
    print(json.dumps(report, indent=2) if args.json else format_prune(report))
    return 0


def _compact(args: argparse.Namespace) -> int:
    from pipeline.output.compact import compact

    _recover(args.output_dir)
    report = compact(args.output_dir)
    _say(
        f"compacted {args.output_dir}: {report['rows_before']:,} rows in "
        f"{report['parts_before']} parts -> {report['rows_after']:,} current rows in "
        f"{report['parts_after']} parts (superseded rows set aside in .superseded/)"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from pipeline.models import describe_sources, describe_table

    table = load_config(args.config).models if args.config else None
    print("\n".join(describe_sources(table) if args.sources else describe_table(table)))
    return 0


def _batch_config(args: argparse.Namespace) -> Config | None:
    """`--config` of a `pipeline batch` command, if given: its [api] endpoint, timeout and http
    permission and its [batch] settings (the endpoint is never read from the output)."""
    return load_config(args.config) if args.config else None


def _batch_status(args: argparse.Namespace) -> int:
    from pipeline.engines.batch import jobs as batchjobs

    report = asyncio.run(
        batchjobs.status(args.output_dir, _batch_config(args), base_url=args.base_url)
    )
    print(json.dumps(report, indent=2) if args.json else batchjobs.format_status(report))
    return 0


def _batch_wait(args: argparse.Namespace) -> int:
    from pipeline.engines.batch import jobs as batchjobs

    summary = asyncio.run(
        batchjobs.wait(
            args.output_dir, _batch_config(args), base_url=args.base_url, progress=not args.quiet
        )
    )
    _say(f"{summary.run_id}: {_rows_line(summary.rows)}, ${summary.cost_usd:,.4f}")
    _say_batch(summary)
    if summary.stop_reason:
        _say(f"stopped: {summary.stop_reason}. {summary.resume_hint}")
    return summary.exit_code


def _batch_cancel(args: argparse.Namespace) -> int:
    from pipeline.engines.batch import jobs as batchjobs

    cancelled = asyncio.run(
        batchjobs.cancel(args.output_dir, _batch_config(args), base_url=args.base_url)
    )
    for job in cancelled:
        print(f"{job['name']}: {job.get('state') or job.get('error')}")
    if not cancelled:
        print(f"{args.output_dir}: no batch job in flight")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipeline.localserver.serve import serve_from_args

    return serve_from_args(args)


def _export_parser(
    formats: argparse._SubParsersAction, name: str, about: str, out: str
) -> argparse.ArgumentParser:
    c = formats.add_parser(name, help=about)
    c.add_argument("output_dir")
    c.add_argument("--out", required=True, metavar=out)
    c.add_argument("--task", help="only this task's rows (detect, segment, caption, ...)")
    _images_root(c)
    c.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    c.set_defaults(func=_export)
    return c


def _images_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images-root",
        action="append",
        metavar="ROOT=DIR",
        help="the images of ROOT are now in DIR (repeatable); a bare DIR: every root's",
    )


def _allow_host(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="fetch URL images from this internal host too (as [input] allow_hosts); repeatable",
    )


_JSON_HELP = "also print the report as JSON on stdout (the human lines stay on stderr)"


# estimate, run --plan: a large new input is priced from its headers past the first GB read
_EXACT_HELP = "read every file to buy whole, to tell copies (default: up to 1 GB, then a bound)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Turn folders of images into Parquet datasets with Gemini.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="process new images of a config into Parquet", epilog=EPILOG)
    p.add_argument("config", help="TOML config file")
    _add_setting_flags(p)
    p.add_argument("--limit", type=int, metavar="N", help="at most N new images")
    p.add_argument("--retry-errors", action="store_true", help="redo rows that ended in error")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.add_argument(
        "--plan",
        action="store_true",
        help="print what the run would do now and its cost (as `estimate`), then exit: no call",
    )
    p.add_argument("--exact", action="store_true", help=_EXACT_HELP)
    p.add_argument(
        "--yes",
        action="store_true",
        help="go on when a settings change would redo more committed rows than [limits] "
        "max_redo allows",
    )
    _add_batch_run_flags(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("status", help="counts by status, tokens and what remains")
    p.add_argument("output_dir")
    p.add_argument("--config", help="also count the files a run of this config would still do")
    p.add_argument("--retry-errors", action="store_true", help="with --config: count errors too")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "estimate", help="dry run: what a run now would do, its tokens, cost and time, no API call"
    )
    p.add_argument("config")
    _add_setting_flags(p)
    p.add_argument("--limit", type=int, metavar="N")
    p.add_argument("--retry-errors", action="store_true", help="as run --retry-errors")
    p.add_argument("--exact", action="store_true", help=_EXACT_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_estimate)

    p = sub.add_parser("reparse", help="re-read stored raw answers with new parse settings")
    p.add_argument("output_dir")
    p.add_argument("--config", help="config whose [task] settings to parse with")
    p.add_argument("--mask-threshold", type=int)
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(func=_reparse)

    p = sub.add_parser("prune", help="set aside rows whose input file no longer exists")
    p.add_argument("output_dir")
    p.add_argument("--config", required=True, help="the config whose inputs are walked")
    p.add_argument("--apply", action="store_true", help="do it (without: only count)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_prune)

    p = sub.add_parser(
        "compact", help="merge the output's small parts into big ones (current rows only)"
    )
    p.add_argument("output_dir")
    p.set_defaults(func=_compact)

    p = sub.add_parser(
        "export", help="export a dataset (COCO, YOLO, VOC, Hugging Face, Label Studio)"
    )
    fmt = p.add_subparsers(dest="format", required=True)
    c = _export_parser(fmt, "coco", "COCO instances JSON (+ a COCO captions JSON)", "FILE.json")
    c.add_argument("--captions", metavar="FILE.json", help="captions file (FILE_captions.json)")
    for name, about in (
        ("yolo", "a YOLO dataset folder: images, labels, data.yaml"),
        ("voc", "a Pascal VOC folder: JPEGImages, Annotations"),
        ("hf", "a Hugging Face image folder: images, metadata.parquet"),
    ):
        c = _export_parser(fmt, name, about, "DIR")
        c.add_argument("--copy", action="store_true", help="copy the images (default: symlinks)")
        _allow_host(c)
    c = _export_parser(fmt, "labelstudio", "Label Studio tasks with predictions", "FILE.json")
    c.add_argument("--label-config", metavar="FILE.xml", help="labelling config (FILE.xml)")
    c.add_argument(
        "--image-prefix",
        default="/data/local-files/?d=",
        metavar="URL",
        help="put before each image's relative name (default: Label Studio's local files)",
    )

    p = sub.add_parser("render", help="overlays and an index.html gallery")
    p.add_argument("output_dir")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--limit", type=int, help="at most N images")
    _images_root(p)
    _allow_host(p)
    p.add_argument(
        "--compare",
        metavar="OTHER",
        help="another output of the same task: each image beside "
        "OTHER's answer, marked by agreement, worst first (see `pipeline compare`)",
    )
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(func=_render)

    _add_compare(sub)
    _add_tune(sub)

    p = sub.add_parser("models", help="what each model takes, bills and answers")
    p.add_argument("--config", help="include this config's [models] entries")
    p.add_argument("--sources", action="store_true", help="every fact's dated claims")
    p.set_defaults(func=_models)

    _add_batch_commands(sub)

    p = sub.add_parser("serve-local", help="the local Gemini-compatible server")
    add_serve_arguments(p)
    p.set_defaults(func=_serve)
    return parser


def _add_compare(sub: argparse._SubParsersAction) -> None:
    """`pipeline compare OUT_A OUT_B`: B's answers against A's, read from both outputs."""
    p = sub.add_parser("compare", help="how far two outputs' answers agree (B against A)")
    p.add_argument("output_a", help="the reference output")
    p.add_argument("output_b", help="the output compared with it")
    p.add_argument("--iou", type=float, default=0.5, help="IoU to pair objects (default 0.5)")
    p.add_argument(
        "--labels",
        choices=("strict", "loose"),
        default="strict",
        help="labels equal as stored, or case-, spacing- and plural-insensitively",
    )
    p.add_argument(
        "--radius",
        type=float,
        default=20.0,
        metavar="PX",
        help="point tasks: points within PX pixels pair (default 20)",
    )
    p.add_argument("--task", help="the task to compare when both outputs hold several")
    p.add_argument("--json", action="store_true", help="the whole report, every image, as JSON")
    p.add_argument("--out", metavar="DIR", help="a gallery of the images that disagree, A beside B")
    _images_root(p)
    _allow_host(p)
    p.set_defaults(func=_compare)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    """`pipeline tune CONFIG --sample N --vary KEY=V1,V2`: the cheapest setting that agrees."""
    p = sub.add_parser(
        "tune",
        help="run a sample under several settings; the cheapest that agrees with the richest",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="TOML config file (its inputs are sampled, OUT/_tune written)")
    p.add_argument("--sample", type=int, required=True, metavar="N", help="images to run")
    p.add_argument(
        "--vary",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a config key (images.max_side, api.model, task.media_resolution, ...) and the "
        "values to try (none: unset); repeatable: every combination is run",
    )
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="KEY=V,...",
        help="the setting the others are compared with (default: the richest varied values)",
    )
    p.add_argument("--target", type=float, default=0.95, help="agreement to reach (0.95)")
    p.add_argument(
        "--max-usd",
        type=float,
        metavar="USD",
        help="refuse before any call if the experiment's estimate is more; each run is held to "
        "what is left",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of the reference (2: noise floor)")
    p.add_argument("--seed", type=int, default=0, help="the sample's draw (0)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    p.set_defaults(func=_tune)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting declared with one (see pipeline/config.py)."""
    for section, key, declared in flags():
        meta = declared.metadata
        parser.add_argument(
            meta["flag"],
            dest=f"{section}.{key}",
            type=meta["type"],
            action="append" if meta["many"] else "store",
            help=f"[{section}] {key}: {meta['doc']}",
        )


def _add_batch_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch",
        action="store_const",
        const="batch",
        dest="api.mode",
        help='[api] mode = "batch": Batch Mode jobs, half the price, results within 24 h',
    )
    parser.add_argument(
        "--submit-only",
        action="store_true",
        help="Batch Mode: collect the jobs that ended, submit the new files, exit without "
        "waiting (a later run collects)",
    )


def _add_batch_commands(sub: argparse._SubParsersAction) -> None:
    """`pipeline batch status|wait|cancel OUTPUT_DIR`: the Batch Mode jobs of an output."""
    p = sub.add_parser("batch", help="the Batch Mode jobs of an output folder")
    commands = p.add_subparsers(dest="batch_command", required=True)
    for name, func, text in (
        ("status", _batch_status, "the jobs, and the state of those in flight"),
        ("wait", _batch_wait, "follow the jobs in flight until they end; commit their rows"),
        ("cancel", _batch_cancel, "cancel the jobs in flight (the next run sends their images)"),
    ):
        c = commands.add_parser(name, help=text, epilog=EPILOG if name == "wait" else None)
        c.add_argument("output_dir")
        c.add_argument(
            "--config",
            help="its [api] base_url, version, timeout, allow_insecure_http, [batch] settings "
            "(optional)",
        )
        c.add_argument(
            "--base-url",
            metavar="URL",
            help="the endpoint to ask (default: --config's [api] base_url, else the official "
            "one); jobs recorded at another endpoint are refused, never contacted",
        )
        if name == "status":
            c.add_argument("--json", action="store_true")
        if name == "wait":
            c.add_argument("--quiet", action="store_true", help="no messages while waiting")
        c.set_defaults(func=func)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        return _reader_left()
    finally:
        _quiet_closed_streams()


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left


def _reader_left() -> int:
    """`pipeline status OUT | head -1`: the reader took what it wanted and closed the pipe.
    Python's recipe: point stdout at devnull so the exit's flush cannot fail again, and exit
    as a killed-by-SIGPIPE writer would (no traceback)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):
        os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_EXIT


def _quiet_closed_streams() -> None:
    """Python exits 120 when it cannot flush a closed stdout/stderr at shutdown: a finished
    run must exit with its own code, so streams that fail to flush are swapped for devnull."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 - lives until exit


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (ConfigError, UnreadablePart, MissingExtra, ExportError) as exc:
        _say(f"error: {exc}")
        return exits.USAGE
    except OutputDirBusy as exc:
        another = ", or choose another --output" if args.command == "run" else ""
        _say(f"error: {exc}{another}")
        return exits.USAGE
    except exits.NotStarted as exc:
        _say(f"not started: {exc}")
        return exc.exit_code
    except exits.StoppedEarly as exc:
        _say(f"stopped: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted")
        return exits.STOPPED
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        _say(f"error: {exc}: {_NO_SPACE_HINT}")
        return exits.STOPPED


# A full disk (or quota, or a file-size limit) stops a run as Ctrl-C does: what was committed
# stays, and a rerun resumes once there is room; the message says so instead of a traceback.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_SPACE_HINT = (
    "no room to write (the disk is full, or a quota or file-size limit was reached); "
    "free the disk and rerun the same command to resume"
)
