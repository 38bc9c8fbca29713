"""What a run's one models.get means: the cheap check before its first paid call.

`GET {base}/{version}/models/{model}` costs nothing and answers in one round trip what a wrong
model would otherwise cost: a 404 on every request. Its answer decides (the engines ask it once,
when the walk first finds work, in `engines/common.Preflight`):

- 404: the run stops before any call, exit 2, with "model X is not found for API version V (did
  you mean Y?)", the suggestion drawn with difflib from the model table's names (or, for an
  entry the table marks shut down, its replacement);
- a refused key, a redirect, a method the key may not call: the run's own failure as any call
  would have found it (`failures.judge`), the run stops;
- a passing failure (429, 5xx, a timeout, a reset): logged, and the run goes on; its calls meet
  the same trouble and the runner handles it there;
- for an alias (`ModelTable.alias_target`): a `baseModelId` (or a `version`) naming a model id
  the table knows is the service's word on the alias's target, and the run uses that entry. The
  live service's alias resources name only themselves, so the table's target stays a guess,
  named as one in the run summary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline import exits
from pipeline.config import Config, ConfigError, validate
from pipeline.gemini import GeminiError, ModelInfo
from pipeline.models import ModelTable, did_you_mean
from pipeline.run.failures import Action, Verdict, judge

SERVICE = "the service's answer"
NOT_FOUND_HINT = (
    "set [api] model to a model the service serves (`pipeline models` lists the model table), "
    "or check [api] version and base_url"
)


@dataclass(frozen=True, slots=True)
class Checked:
    """What the preflight learned: the model id the service names as the alias's target (an id
    the table knows), or None when it named none (or the model is no alias)."""

    stated: str | None = None


# ------------------------------------------------------------------------------ the failures
def verdict(error: GeminiError | ValueError, config: Config) -> Verdict | None:
    """How a failed models.get ends the run; None when it must not (a passing failure).

    A ValueError is the client refusing the id before sending it (the SDK's `t_model`): no
    service would find that model either."""
    if isinstance(error, ValueError) or error.kind == "not_found":
        return not_found(config)
    if error.retryable or error.code == 429:  # a 429 here is no verdict on the day's quota
        return None
    judged = judge(error, uploaded=False)
    return judged if judged.action == Action.RUN else None


def not_found(config: Config) -> Verdict:
    model, version = config.api.model, config.api.version
    why = f"model {model} is not found for API version {version} ({suggestion(config)})"
    return Verdict(Action.RUN, why, exits.USAGE, NOT_FOUND_HINT)


def suggestion(config: Config) -> str:
    """What to try instead: the replacement of an entry shut down, a close name of the table,
    or (for a name the table has) the endpoint."""
    name, table = model_name(config.api.model), config.models
    entry = table.lookup(name) if table.is_known(name) else None
    if entry is not None and entry.status.is_shut_down():
        instead = entry.status.replacement
        return f"shut down {entry.status.shut_down}" + (
            f": did you mean {instead}?" if instead else ""
        )
    if name in table.names():  # the service may have dropped it, but the endpoint is likelier
        return "the model table has it: is [api] base_url or version right?"
    close = did_you_mean(name, served(table)).strip(" ()")
    return close or "`pipeline models` lists the model table"


def served(table: ModelTable) -> list[str]:
    """The names a user may write that are not shut down today (entries, then aliases)."""
    known = [n for n in table.names() if table.is_known(n)]
    return [n for n in known if not table.lookup(n).status.is_shut_down()]


# ------------------------------------------------------------------------------ an alias
def stated_target(info: ModelInfo, config: Config) -> str | None:
    """The model id the answer names as the configured alias's target: its baseModelId, else
    its version, when that is an id the table knows that is neither an alias nor the alias
    itself. None for a model that is no alias, or an answer that names only itself."""
    alias, table = model_name(config.api.model), config.models
    if table.alias_target(alias) is None:
        return None
    for said in (info.base_model_id, info.version):
        name = model_name(said or "")
        if name and name != alias and table.alias_target(name) is None and table.is_known(name):
            return name
    return None


def moves(config: Config, checked: Checked) -> bool:
    """Whether the stated target is another entry than the table's guess (then the run's
    settings, its settings hash among them, follow the stated one)."""
    if checked.stated is None:
        return False
    return config.models.lookup(checked.stated).name != config.task.spec.name


def resolved(config: Config, checked: Checked) -> Config:
    """`config` with its alias pointing at the stated target; ConfigError naming the key when
    a setting of the config is one the stated model refuses."""
    alias, target = model_name(config.api.model), checked.stated or ""
    table = config.models
    models = dataclasses.replace(
        table,
        aliases={**table.aliases, alias: target},
        alias_sources={**table.alias_sources, alias: SERVICE},
    )
    moved = dataclasses.replace(
        config, models=models, task=dataclasses.replace(config.task, models=models)
    )
    try:
        validate(moved)
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({alias} is {target}: {SERVICE})") from None
    return moved


def resolution(config: Config, checked: Checked | None) -> str | None:
    """What the run summary says of an alias: "gemini-flash-latest → gemini-3.8-flash (the
    service's answer)", or "... (the table's guess: <its source>)"; None for a model id that is
    no alias."""
    alias, table = model_name(config.api.model), config.models
    guess = table.alias_target(alias)
    if guess is None:
        return None
    if checked is not None and checked.stated is not None:
        return f"{alias} → {checked.stated} ({SERVICE})"
    source = table.alias_sources.get(alias, "no source given")
    return f"{alias} → {guess} (the table's guess: {source})"


def model_name(model_id: str) -> str:
    """A model id as the table keys it ("models/" dropped, lower case)."""
    return model_id.removeprefix("models/").strip().lower()
