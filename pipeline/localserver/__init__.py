"""A local Gemini-compatible HTTP server: tests, the demo and the benchmarks run against it.

It speaks the real API's protocol (generateContent, Interactions, Files, Batch Mode, models.get
and models.list) and answers by looking at the image's pixels, so flat shapes on a plain
background have exact known answers.
It is a strict double: it refuses what the service refuses, with the service's errors (every
rule and its source: rules.py). It knows nothing of the pipeline.

Layout: server.py wires the surfaces (batches.py, generate.py, interactions.py, files_api.py,
models_api.py) over the shared core.py (transport, image_input, billing, quotas, answering,
faults, stats); fields.py declares the accepted request bodies as data, spec.py walks them,
model_checks.py checks settings against the model table; answers.py and vision.py are the
local "model". options.py declares the server's options once (a config's [local] section,
serve.py's flags).
"""
