"""How the work of a run is spread: one process (the default), Batch Mode, or a Ray cluster.

Every engine runs the same per-image code (`pipeline.run.runner.ImageRunner`) and commits rows
through the same sink, so rows, keys, resume and exit codes do not depend on the engine.
"""
