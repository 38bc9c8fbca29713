"""A local Gemini-compatible HTTP server: tests, the demo and the benchmarks run against it.

It speaks the real API's protocol (generateContent, Interactions, Files) and answers by looking
at the image's pixels, so flat shapes on a plain background have exact known answers. It knows
nothing of the pipeline.
"""

from pipeline.localserver.app import LocalServer
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.serve import add_serve_arguments, serve_from_args

__all__ = ["LocalServer", "ServerOptions", "add_serve_arguments", "serve_from_args"]
