"""A local S3 for the bucket benchmarks: moto's server in its own process, filled before it
answers (objects are put straight into moto's backend, not over HTTP: 100k PUTs over HTTP would
take minutes), reached by the pipeline through the standard AWS environment (`S3Server.env`).

    with S3Server(logs, load={"tiny": folder}, synthetic={"list-bench/objects": 100_000}) as s3:
        run_measured(cmd, logs, name, env=s3.env)

Run as a script it is that server process: `python s3server.py SPEC.json` loads what the JSON
names, prints its URL, and serves until it is terminated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """moto's S3 in a child process. `load`: bucket/prefix -> a local folder whose files are put
    under it (relative paths kept); `synthetic`: bucket/prefix -> a number of small objects
    (`d<nnnn>/obj-<nnnnnnn>.png`, 1000 a folder, 3 bytes each)."""

    def __init__(
        self,
        logs: Path,
        *,
        load: dict[str, Path] | None = None,
        synthetic: dict[str, int] | None = None,
    ) -> None:
        self.logs = logs
        self.spec = {
            "load": {target: str(folder) for target, folder in (load or {}).items()},
            "synthetic": dict(synthetic or {}),
        }
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._err: TextIO | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, **CREDENTIALS}

    def __enter__(self) -> S3Server:
        self.logs.mkdir(parents=True, exist_ok=True)
        spec = self.logs / "s3server.json"
        spec.write_text(json.dumps(self.spec))
        self._err = open(self.logs / "s3server.stderr", "a")  # closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(spec)],
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("http://"):
            self.__exit__()
            raise RuntimeError(f"s3server printed {line!r}; see {self.logs}/s3server.stderr")
        self.url = line.strip()
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU of the local S3 so far (its requests compete with the client's
        on this machine's cores; a real store's do not)."""
        assert self.proc
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self._err:
            self._err.close()


def _serve(spec_path: str) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for target, folder in spec["load"].items():
        bucket, _, prefix = target.partition("/")
        _bucket(backend, bucket)
        root = Path(folder)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                key = "/".join(filter(None, [prefix, path.relative_to(root).as_posix()]))
                backend.put_object(bucket, key, path.read_bytes())
    for target, count in spec["synthetic"].items():
        bucket, _, prefix = target.partition("/")
        _bucket(backend, bucket)
        for n in range(count):
            backend.put_object(bucket, f"{prefix}/d{n // 1000:04d}/obj-{n:07d}.png", b"abc")
    print(f"http://{host}:{port}", flush=True)
    threading.Event().wait()  # serve until terminated


def _bucket(backend: Any, name: str) -> None:
    if name not in backend.buckets:
        backend.create_bucket(name, "us-east-1")


@contextlib.contextmanager
def aws_env(env: dict[str, str]) -> Iterator[Any]:
    """An s3fs filesystem on the local S3, with its environment set only meanwhile."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        import s3fs

        yield s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bucket_names(env: dict[str, str], *buckets: str) -> None:
    """Create empty buckets (for outputs) through the server's HTTP API."""
    with aws_env(env) as fs:
        for bucket in buckets:
            fs.mkdir(bucket)


def latest_summary(env: dict[str, str], output: str) -> dict[str, Any]:
    """The newest .runs/*.json of an output in the local S3 (`bucket/prefix`)."""
    with aws_env(env) as fs:
        paths = sorted(path for path in fs.glob(f"{output}/.runs/*.json") if "compact" not in path)
        return json.loads(fs.cat_file(paths[-1])) if paths else {}


if __name__ == "__main__":
    _serve(sys.argv[1])
