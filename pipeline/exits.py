"""Exit codes of the `pipeline` command, in one place (the README and `--help` print them)."""

from __future__ import annotations

OK = 0  # every row of the run is ok
ROWS_NOT_OK = 1  # some rows are error, blocked or partial (see `pipeline status`)
USAGE = 2  # bad config, key or usage (a wrong model, a damaged part...): fix it, then run again
STOPPED = 3  # stopped early (Ctrl-C, a quota, a full disk, a lost lease...): rerun to resume
# not started: the run would redo more committed rows than `[limits] max_redo` allows because
# settings changed; rerun with --yes (or a higher max_redo) to go on. Not 2: nothing is wrong,
# the spending needs a yes; not 3: rerunning the same command would refuse again.
CONFIRM = 4


class NotStarted(Exception):
    """A run that refuses to start until the user says so (RedoRefused, pipeline/run/plan.py):
    the command line prints "not started: " and the message and exits with `exit_code`. Here,
    beside the codes, so that the CLI catches it without importing the plan's pyarrow."""

    exit_code = CONFIRM


class StoppedEarly(Exception):
    """A run stopped by a failure outside it that a rerun may get past (the inputs' store timed
    out while they were listed): the command line prints "stopped: " and the message and exits
    with `exit_code`; what was answered before it is committed, as for any stop."""

    exit_code = STOPPED


EPILOG = f"""exit codes:
  {OK}  every row of the run is ok
  {ROWS_NOT_OK}  some rows are error, blocked or partial (see `pipeline status`)
  {USAGE}  bad config, key or usage (a wrong key or model, a missing extra, a damaged part, a
     bucket that cannot be used): the message says what to fix; fix it, then run again
  {STOPPED}  stopped early (Ctrl-C, SIGTERM, a quota, a full disk, a lost lease on a bucket, an
     outage): the message says why; rerun the same command to resume
  {CONFIRM}  not started: a settings change would redo more committed rows than [limits]
     max_redo allows; the message says what and why; rerun with --yes to go on"""
