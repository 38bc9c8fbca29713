"""Where a run writes and readers read: stores (a folder or a bucket), the journal, the sink,
the parts readers see, recovery after a kill, the resume index and its cache, compaction, and
the output's state (uploads, the day's request count, Batch Mode jobs)."""
