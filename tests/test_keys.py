"""The API key as read and as redacted (issue 19, items 8 and 10).

An answer is parsed as received and the key removed only from what is kept or shown; a key too
short to redact, or with whitespace inside, is refused; whitespace around it (a CRLF key.env)
is removed with a warning naming the variable, never the key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import exits
from pipeline.config import ConfigError
from pipeline.engines.batch import jobs
from pipeline.gemini import ApiKeyError, GeminiClient
from pipeline.gemini.types import GenerateRequest, ImagePart
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from tests.conftest import REPO, child_env, draw_shapes, read_rows
from tests.test_cli import write_config

# A key that is also a word of every generateContent answer: redacting the body before parsing
# it removed usageMetadata.promptTokenCount (tokens 0, cost $0), as a one-letter key once
# turned 'mask' into 'mas[redacted]'.
ECHOED_KEY = "promptTokenCount"


def _request(png: bytes) -> GenerateRequest:
    return GenerateRequest(
        model="gemini-2.5-flash", prompt="Detect the shapes.", images=(ImagePart("image/png", png),)
    )


async def test_an_answer_is_parsed_as_received_and_stored_redacted(tmp_path: Path) -> None:
    image, _ = draw_shapes(96, 96, seed=19)
    image.save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    async with (
        LocalServer(ServerOptions(api_key=ECHOED_KEY, seed=19)) as server,
        GeminiClient(ECHOED_KEY, base_url=server.base_url) as client,
    ):
        response = await client.generate_content(_request(png))
    assert response.usage.prompt_tokens > 0  # parsed from the body as it came
    assert ECHOED_KEY not in response.raw  # the kept body has no key
    assert "[redacted]" in response.raw


@pytest.mark.parametrize("key", ["x1", "short7!"])
def test_a_key_too_short_to_redact_is_refused(key: str) -> None:
    with pytest.raises(ApiKeyError) as refused:
        GeminiClient(key)
    assert key not in str(refused.value)
    assert "refused" in str(refused.value)


def _run(tmp_path: Path, key: str, extra: str = "") -> subprocess.CompletedProcess:
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir(exist_ok=True)
    draw_shapes(64, 64, seed=8)[0].save(images / "a.png")
    config = write_config(tmp_path / "job.toml", images, out, extra)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(config), "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=child_env(GEMINI_API_KEY=key),
    )  # fmt: skip


def test_a_crlf_key_is_stripped_with_a_warning_naming_the_variable(tmp_path: Path) -> None:
    """`export GEMINI_API_KEY=...` from a key.env saved with CRLF: the key ends with a CR."""
    key = "AIza-crlf-key-0123456789"
    result = _run(tmp_path, key + "\r")
    assert result.returncode == exits.OK, result.stderr
    assert "GEMINI_API_KEY" in result.stderr and "whitespace" in result.stderr
    assert key not in result.stderr + result.stdout
    (row,) = read_rows(tmp_path / "out")
    assert row["status"] == "ok"


@pytest.mark.parametrize("key", ["AIza-inner\r-key-012345", "AIza inner-key-0123456", "x1"])
def test_a_key_with_inner_whitespace_or_too_short_is_a_usage_error(
    tmp_path: Path, key: str
) -> None:
    result = _run(tmp_path, key)
    assert result.returncode == exits.USAGE, result.stderr
    assert "GEMINI_API_KEY" in result.stderr and "refused" in result.stderr
    assert key not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists() or not read_rows(tmp_path / "out")


def test_batch_commands_read_the_key_as_a_run_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pipeline batch status|wait|cancel` build their client through `_client`: a key with a
    CR inside is a ConfigError (exit 2, the key not shown), not an ApiKeyError traceback."""
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-inner\r-key-012345")
    with pytest.raises(ConfigError, match="GEMINI_API_KEY") as refused:
        jobs._client("https://generativelanguage.googleapis.com", "v1beta", None)
    assert "inner" not in str(refused.value)
