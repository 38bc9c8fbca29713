"""`python -m pipeline.localserver --port 0`: the same as `pipeline serve-local`."""

import argparse

from pipeline.localserver.arguments import add_serve_arguments
from pipeline.localserver.serve import serve_from_args

parser = argparse.ArgumentParser(
    prog="python -m pipeline.localserver", description="Run the local Gemini-compatible server."
)
add_serve_arguments(parser)
raise SystemExit(serve_from_args(parser.parse_args()))
