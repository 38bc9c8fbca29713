"""Checks a run makes of its inputs before it starts, each a usage error (exit 2) naming what is
wrong: every input path, manifest and reference exists (an object-store prefix can be listed,
its filesystem installed), and a grouped manifest lists each group's rows together."""

from __future__ import annotations

import os

from pipeline.config import Config, ConfigError
from pipeline.inputs.source import check_manifest_groups
from pipeline.locations import is_http_url, is_object_url, is_url
from pipeline.output.stores import MissingExtra, check_available, check_listable


def _check_listable(config: Config, url: str) -> None:
    """An input prefix that cannot be listed is a usage error naming it, as a missing folder."""
    where = f"{config.source}: [input] paths: {url}"
    try:
        check_listable(url)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such bucket") from None
    except PermissionError as exc:
        raise ConfigError(f"{where}: access denied ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be listed ({exc})") from None


def require_inputs(config: Config) -> None:
    """Every configured input path and the manifest exist (usage error, exit 2, otherwise);
    object-store paths need their filesystem installed (the `cloud` extra)."""
    for url in (p for p in config.input.paths if is_http_url(p)):
        raise ConfigError(
            f"{config.source}: [input] paths: {url}: a URL is not a folder to walk; list URLs "
            "in a manifest ([input] manifest, one a line)"
        )
    references = [reference.image for reference in config.task.reference_images]
    named = [*config.input.paths, config.input.manifest or "", config.output.dir, *references]
    for url in (p for p in named if is_url(p)):
        try:
            check_available(url)
        except (MissingExtra, ValueError) as exc:
            raise ConfigError(f"{config.source}: {exc}") from None
    for url in (p for p in config.input.paths if is_object_url(p)):
        _check_listable(config, url)
    missing = [p for p in config.input.paths if not is_url(p) and not os.path.lexists(p)]
    manifest = config.input.manifest
    if manifest and not is_url(manifest) and not os.path.exists(manifest):
        missing.append(manifest)
    if missing:
        raise ConfigError(f"{config.source}: [input] path does not exist: {missing[0]}")
    if not config.input.paths and not config.input.manifest:
        raise ConfigError(f"{config.source}: [input] paths (or manifest) is required to run")


def check_groups(config: Config) -> None:
    """A manifest grouped by its `group` column lists every group's rows together (the run
    streams it), or the run does not start: ConfigError naming the row. Reads that column."""
    if config.input.group_by != "manifest" or not config.input.manifest:
        return
    try:
        check_manifest_groups(config.input.manifest)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config.source}: [input] manifest: {exc}") from None
