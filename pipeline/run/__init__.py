"""One unit in, one row out, whatever spreads the work: a run's identity, the runner (prepare,
key, reuse, buy, row), the interactive call with its limits, deadlines and retries, whose fault
a failure is, how a run stops, uploads, the rows, the progress line and the run's summary."""
