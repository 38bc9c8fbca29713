"""Batch Mode on the wire: the protocol client (pipeline/gemini/batches.py) against the local
server's batches surface over loopback, with a hand clock moving the jobs through their states;
and the official SDK's own batch calls against the same server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from google import genai
from google.genai import types

from pipeline.gemini import GeminiClient, GeminiError
from pipeline.gemini.batches import (
    EXCERPT_CHARS,
    BatchJob,
    job_state,
    parse_job,
    parse_job_page,
    parse_result,
    read_result,
    request_error,
    request_line,
)
from pipeline.gemini.types import GenerateRequest, ImagePart
from pipeline.localserver import fields as server_fields
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from tests.conftest import Clock
from tests.localserver_support import DETECT, KEY, draw_scene
from tests.test_localserver_fields import sdk_fields

MODEL = "gemini-2.5-flash"
PNG, TRUTH = draw_scene()


def detect(data: bytes = PNG, mime: str = "image/png") -> GenerateRequest:
    return GenerateRequest(
        model=MODEL,
        prompt=DETECT,
        images=(ImagePart(mime, data=data),),
        response_mime_type="application/json",
        thinking_budget=0,
    )


async def until_done(client: GeminiClient, name: str) -> BatchJob:
    """Poll (as a client does) until the job ends; a deadline bounds it, never a sleep."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        job = await client.batches.get(name)
        if job.done:
            return job
        assert asyncio.get_running_loop().time() < deadline, job
        await asyncio.sleep(0.01)  # the server answers the lines in the background


@pytest.fixture
def server_options() -> ServerOptions:
    """The options of the `server` fixture (tests/conftest.py) in this module."""
    return ServerOptions(api_key=KEY, batch_seconds=60, batch_expiry_seconds=3600)


@pytest.fixture
def server_clock(clock: Clock) -> Clock:
    return clock  # the test moves the server's jobs through their states


@pytest.fixture
async def client(server):
    async with GeminiClient(KEY, base_url=server.base_url) as running:
        yield running


async def upload_lines(client: GeminiClient, *lines: bytes) -> str:
    return (await client.upload_file(b"".join(lines), "jsonl", display_name="input")).name


# ------------------------------------------------------------------------ the life of a job
async def test_a_file_job_moves_through_its_states_and_its_results_join_on_key(
    server, client, clock, tmp_path
):
    broken = detect(b"not an image at all")
    name = await upload_lines(client, request_line("a", detect()), request_line("b", broken))
    job = await client.batches.create(MODEL, file_name=name, display_name="nightly-1")
    assert (job.state, job.display_name, job.stats.requests) == (
        "JOB_STATE_PENDING",
        "nightly-1",
        2,
    )
    assert job.name.startswith("batches/") and not job.done

    clock.now += 6  # past the pending tenth of --batch-seconds
    assert (await client.batches.get(job.name)).state == "JOB_STATE_RUNNING"
    clock.now += 60
    done = await until_done(client, job.name)
    assert done.state == "JOB_STATE_SUCCEEDED"
    assert (done.stats.succeeded, done.stats.failed, done.stats.pending) == (1, 1, 0)
    assert done.responses_file == f"files/batch-{job.name.removeprefix('batches/')}"

    path = tmp_path / "results.jsonl"
    assert await client.batches.download(done.responses_file, path) == path.stat().st_size
    results = {r.key: r for r in client.batches.results(path)}
    answer = json.loads(results["a"].response.text)
    assert {item["label"] for item in answer} == set(TRUTH)
    assert results["a"].response.usage.prompt_tokens > 258
    error = results["b"].error
    assert (error.code, error.status, error.kind) == (400, "INVALID_ARGUMENT", "invalid_request")
    assert "Unable to process input image" in error.message
    line = json.loads(path.read_text().splitlines()[1])
    assert line["error"]["code"] == 3  # an RPC code in the results, not the HTTP one


async def test_an_inline_job_answers_inline_in_input_order(server, client, clock):
    job = await client.batches.create(MODEL, requests=[("x", detect()), ("y", detect())])
    clock.now += 61
    done = await until_done(client, job.name)
    assert done.responses_file is None
    assert [r.key for r in done.inlined] == ["x", "y"]
    assert all(r.response is not None and r.response.finish_reason == "STOP" for r in done.inlined)


async def test_list_cancel_delete_and_unknown_jobs(server, client, clock):
    first = await client.batches.create(MODEL, requests=[("x", detect())], display_name="one")
    second = await client.batches.create(MODEL, requests=[("y", detect())], display_name="two")
    listed = await client.batches.list(page_size=1)  # two pages
    assert {j.display_name for j in listed} == {"one", "two"}
    assert all(not j.inlined for j in listed)  # no results inside a list

    await client.batches.cancel(first.name)
    cancelled = await client.batches.get(first.name)
    assert cancelled.state == "JOB_STATE_CANCELLED" and cancelled.done
    # what it had answered stays its output (rule batch.cancel-partial), counted in its stats
    assert [r.key for r in cancelled.inlined] in ([], ["x"])
    assert cancelled.stats.succeeded == len(cancelled.inlined)
    with pytest.raises(GeminiError) as again:
        await client.batches.cancel(first.name)
    assert (again.value.code, again.value.status) == (400, "FAILED_PRECONDITION")

    await client.batches.delete(second.name)
    with pytest.raises(GeminiError) as gone:
        await client.batches.get(second.name)
    assert (gone.value.code, gone.value.kind) == (404, "not_found")


async def test_a_new_job_is_listed_only_after_the_list_lag_but_got_at_once(clock):
    """Rule batch.list-lag: the job list trails creates by --batch-list-lag (server clock)."""
    options = ServerOptions(batch_seconds=10, batch_list_lag_seconds=3)
    async with (
        LocalServer(options, clock=clock) as server,
        GeminiClient(KEY, base_url=server.base_url) as client,
    ):
        job = await client.batches.create(MODEL, requests=[("x", detect())], display_name="new")
        assert (await client.batches.get(job.name)).display_name == "new"
        assert await client.batches.list() == []
        clock.now += 3
        assert [j.name for j in await client.batches.list()] == [job.name]


async def test_a_job_not_done_in_time_expires_without_results(clock):
    options = ServerOptions(batch_seconds=10, batch_expiry_seconds=5)
    async with (
        LocalServer(options, clock=clock) as server,
        GeminiClient(KEY, base_url=server.base_url) as client,
    ):
        job = await client.batches.create(MODEL, requests=[("x", detect())])
        clock.now += 4.9
        assert not (await client.batches.get(job.name)).done
        clock.now += 0.2
        expired = await client.batches.get(job.name)
        assert (expired.state, expired.responses_file, expired.inlined) == (
            "JOB_STATE_EXPIRED",
            None,
            (),
        )


async def test_an_input_file_that_is_not_jsonl_fails_the_job(server, client, clock):
    name = await upload_lines(client, request_line("a", detect()), b"this is not json\n")
    job = await client.batches.create(MODEL, file_name=name)
    clock.now += 61
    failed = await until_done(client, job.name)
    assert failed.state == "JOB_STATE_FAILED"
    assert failed.error is not None and "Line 2" in failed.error.message


async def test_a_line_with_an_unknown_field_is_that_lines_error(server, client, clock):
    good = request_line("a", detect())
    odd = json.dumps({"key": "b", "request": {"contents": [], "bogus": 1}}).encode() + b"\n"
    job = await client.batches.create(MODEL, file_name=await upload_lines(client, good, odd))
    clock.now += 61
    done = await until_done(client, job.name)
    assert (done.stats.succeeded, done.stats.failed) == (1, 1)


async def test_faults_apply_per_line_and_never_hold_the_job(clock, tmp_path):
    # every line faulty (hangs included: the job must not wait --hang-seconds for them)
    options = ServerOptions(fault_rate=1.0, seed=7, batch_seconds=1, hang_seconds=300)
    async with (
        LocalServer(options, clock=clock) as server,
        GeminiClient(KEY, base_url=server.base_url) as client,
    ):
        lines = [request_line(str(i), detect()) for i in range(40)]
        job = await client.batches.create(MODEL, file_name=await upload_lines(client, *lines))
        clock.now += 2
        done = await until_done(client, job.name)
        await client.batches.download(done.responses_file, tmp_path / "r.jsonl")
        results = list(client.batches.results(tmp_path / "r.jsonl"))
    errors = {r.error.status for r in results if r.error}
    assert errors <= {"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"} and errors
    assert all(r.error.retryable for r in results if r.error)
    answered = [r for r in results if r.response]
    assert answered and len(answered) + len(errors) <= 40  # content faults still answer
    assert server.stats()["faults"]["hang"] >= 1


async def test_a_job_can_say_succeeded_and_done_before_its_output_is_attached(clock, http):
    """rule batch.output-delay (tidyverse/ellmer#926): SUCCEEDED and done, no output, for
    --batch-output-delay seconds after the job ended; then the output as usual."""
    options = ServerOptions(api_key=KEY, batch_seconds=10, batch_output_delay_seconds=30)
    async with (
        LocalServer(options, clock=clock) as server,
        GeminiClient(KEY, base_url=server.base_url) as client,
    ):
        name = await upload_lines(client, request_line("a", detect()))
        job = await client.batches.create(MODEL, file_name=name)
        clock.now += 11
        early = await until_done(client, job.name)
        url = f"{server.base_url}/v1beta/{job.name}"
        async with http.get(url, headers={"x-goog-api-key": KEY}) as answer:
            operation = await answer.json()
        clock.now += 30
        attached = await client.batches.get(job.name)
    assert (early.state, early.done, early.ended, early.has_output) == (
        "JOB_STATE_SUCCEEDED",
        True,
        True,
        False,
    )
    assert operation["done"] is True and "response" not in operation
    assert "output" not in operation["metadata"]
    assert attached.done and attached.has_output and attached.responses_file


async def test_a_corrupt_line_spoils_only_itself_and_keeps_its_key(clock, tmp_path):
    """rule batch.corrupt-line: the Nth line of a results file cut in half (its key first), the
    Nth inline answer a string; the client reads every other result and says which could not
    be read, with the key when it survived."""
    options = ServerOptions(api_key=KEY, batch_seconds=1, batch_corrupt_line=2)
    async with (
        LocalServer(options, clock=clock) as server,
        GeminiClient(KEY, base_url=server.base_url) as client,
    ):
        lines = [request_line(key, detect()) for key in ("a", "b", "c")]
        from_file = await client.batches.create(MODEL, file_name=await upload_lines(client, *lines))
        inline = await client.batches.create(MODEL, requests=[("x", detect()), ("y", detect())])
        clock.now += 2
        done = await until_done(client, from_file.name)
        await client.batches.download(done.responses_file, tmp_path / "r.jsonl")
        results = list(client.batches.results(tmp_path / "r.jsonl"))
        answered = await until_done(client, inline.name)
    assert [(r.key, r.response is not None) for r in results] == [
        ("a", True),
        ("b", False),
        ("c", True),
    ]
    assert results[1].unreadable.number == 2 and results[1].error is None
    assert [(r.key, r.unreadable is None) for r in answered.inlined] == [("x", True), ("y", False)]
    assert "neither a response nor an error" in answered.inlined[1].unreadable.reason


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        ('{"key": "k1", "response": {"candidates": [{"cont', "k1", "Unterminated string"),
        ('{"key": "k1"}', "k1", "neither a response nor an error"),
        ('{"key": "k1", "response": "[]"}', "k1", "neither a response nor an error"),
        ('{"response": {"candidates": []}, "ke', None, "Unterminated string"),
        ('{"ke', None, ""),
        ("garbage " * 40, None, ""),
        ('["key", "k1"]', None, ""),
    ],
)
def test_an_unreadable_line_keeps_its_key_when_the_key_reads(line, key, reason):
    result = read_result(line, 7)
    assert (result.key, result.response, result.error) == (key, None, None)
    assert result.unreadable.number == 7 and reason in result.unreadable.reason
    assert len(result.unreadable.excerpt) <= EXCERPT_CHARS and line.startswith(
        result.unreadable.excerpt
    )


# ----------------------------------------------------------------------------- the limits
async def test_more_unfinished_jobs_than_allowed_are_refused_with_the_services_429(clock):
    async with (
        LocalServer(ServerOptions(batch_max_jobs=2), clock=clock) as server,
        GeminiClient(KEY, base_url=server.base_url) as client,
    ):
        for key in ("a", "b"):
            await client.batches.create(MODEL, requests=[(key, detect())])
        with pytest.raises(GeminiError) as refused:
            await client.batches.create(MODEL, requests=[("c", detect())])
        assert (refused.value.code, refused.value.kind) == (429, "rate_limit")
        assert "You exceeded your current quota" in refused.value.message
        clock.now += 11  # the first two end: room again
        await until_done(client, (await client.batches.list())[0].name)
        await client.batches.create(MODEL, requests=[("c", detect())])


async def test_the_enqueued_token_cap_counts_the_models_unfinished_jobs(clock):
    options = ServerOptions(batch_enqueued_tokens=400)  # one request: 258 image + ~40 text
    async with (
        LocalServer(options, clock=clock) as server,
        GeminiClient(KEY, base_url=server.base_url) as client,
    ):
        await client.batches.create(MODEL, requests=[("a", detect())])
        with pytest.raises(GeminiError) as refused:
            await client.batches.create(MODEL, requests=[("b", detect())])
        assert refused.value.code == 429
        assert server.stats()["refused_by_rule"]["batch.limit"] == 1


async def test_an_inline_job_over_the_inline_limit_is_a_400(clock):
    options = ServerOptions(inline_limit_bytes=200_000)
    async with (
        LocalServer(options, clock=clock) as server,
        GeminiClient(KEY, base_url=server.base_url) as client,
    ):
        big = [(str(i), detect()) for i in range(100)]  # several kB of base64 each
        with pytest.raises(GeminiError) as refused:
            await client.batches.create(MODEL, requests=big)
        assert (refused.value.code, refused.value.status) == (400, "INVALID_ARGUMENT")
        assert "payload size exceeds the limit" in refused.value.message


@pytest.mark.parametrize(
    ("source", "code", "status"),
    [
        ({"fileName": "files/nosuchfile"}, 403, "PERMISSION_DENIED"),
        ({}, 400, "INVALID_ARGUMENT"),
        (
            {"fileName": "files/x", "requests": {"requests": [{"request": {}}]}},
            400,
            "INVALID_ARGUMENT",
        ),
        ({"requests": {"requests": []}}, 400, "INVALID_ARGUMENT"),
        ({"fileName": "files/x", "bogus": True}, 400, "INVALID_ARGUMENT"),
    ],
)
async def test_bad_inputs_are_refused_at_creation(server, http, source, code, status):
    url = f"{server.base_url}/v1beta/models/{MODEL}:batchGenerateContent"
    body = {"batch": {"inputConfig": source}}
    async with http.post(url, json=body, headers={"x-goog-api-key": KEY}) as answer:
        error = (await answer.json())["error"]
    assert (answer.status, error["status"]) == (code, status)


async def test_an_unknown_model_is_a_404(server, client):
    with pytest.raises(GeminiError) as refused:
        await client.batches.create("gemini-9-nonsense", requests=[("a", detect())])
    assert refused.value.code == 404


async def test_only_generated_files_download(server, client, clock, http):
    uploaded = await client.upload_file(PNG, "image/png")
    with pytest.raises(GeminiError) as refused:
        await client.batches.download(uploaded.name, Path("/dev/null"))
    assert (refused.value.code, refused.value.status) == (400, "INVALID_ARGUMENT")
    job = await client.batches.create(
        MODEL, file_name=await upload_lines(client, request_line("a", detect()))
    )
    clock.now += 61
    done = await until_done(client, job.name)
    resource = await client.get_file(done.responses_file)
    assert resource.state == "ACTIVE"
    url = f"{server.base_url}/v1beta/{done.responses_file}:download"  # without alt=media
    async with http.get(url, headers={"x-goog-api-key": KEY}) as answer:
        assert answer.status == 400


async def test_batch_lines_are_billed_at_the_batch_price(clock):
    options = ServerOptions(credit_budget_usd=100.0, batch_seconds=1)
    async with (
        LocalServer(options, clock=clock) as server,
        GeminiClient(KEY, base_url=server.base_url) as client,
    ):
        await client.generate(detect())
        interactive = server.stats()["credits"]["spent_usd"]
        job = await client.batches.create(MODEL, requests=[("a", detect())])
        clock.now += 2
        await until_done(client, job.name)
        batch = server.stats()["credits"]["spent_usd"] - interactive
    assert batch == pytest.approx(interactive / 2, rel=1e-6)


# --------------------------------------------------------------------------- reading answers
def test_both_spellings_of_a_state_are_read_as_the_sdk_reads_them():
    assert job_state("BATCH_STATE_SUCCEEDED") == "JOB_STATE_SUCCEEDED"
    assert job_state("JOB_STATE_EXPIRED") == "JOB_STATE_EXPIRED"
    assert job_state("batch_state_running") == "JOB_STATE_RUNNING"
    assert job_state(None) == "JOB_STATE_UNSPECIFIED"


def test_a_list_page_as_the_service_writes_it():
    # from a public report of the live service's answer (gemini-rust pull 13)
    body = {
        "operations": [
            {
                "name": "batches/7h9w4gzuqot3bb3fpd1e2nqcp980iwnmjs7n",
                "metadata": {
                    "@type": "type.googleapis.com/google.ai.generativelanguage.v1main."
                    "GenerateContentBatch",
                    "model": "models/gemini-2.5-flash",
                    "displayName": "ExecuteAsFile Example",
                    "inputConfig": {"fileName": "files/85nave4ld71j"},
                    "createTime": "2025-09-07T11:55:07.827892252Z",
                    "batchStats": {"requestCount": "5", "pendingRequestCount": "5"},
                    "state": "BATCH_STATE_PENDING",
                    "name": "batches/7h9w4gzuqot3bb3fpd1e2nqcp980iwnmjs7n",
                },
            }
        ],
        "nextPageToken": "abc",
    }
    jobs, token = parse_job_page(json.dumps(body))
    assert token == "abc"
    assert (jobs[0].state, jobs[0].stats.requests, jobs[0].stats.pending) == (
        "JOB_STATE_PENDING",
        5,
        5,
    )


def test_a_done_operation_gives_its_results_file_from_metadata_or_response():
    meta = {"state": "BATCH_STATE_SUCCEEDED", "name": "batches/x"}
    response = {"responsesFile": "files/batch-x"}
    assert parse_job({"name": "batches/x", "metadata": meta, "response": response}).done
    job = parse_job({"name": "batches/x", "metadata": {**meta, "output": response}, "done": True})
    assert job.responses_file == "files/batch-x" and job.done and job.has_output


def test_done_is_the_operations_own_word_not_the_state():
    """A job was seen SUCCEEDED before its output (tidyverse/ellmer#926): `done` and
    `has_output` are read as the Operation gives them, apart from the state."""
    meta = {"state": "BATCH_STATE_SUCCEEDED", "name": "batches/x"}
    succeeded = parse_job({"name": "batches/x", "metadata": meta})  # proto3 JSON: done false
    assert (succeeded.ended, succeeded.done, succeeded.has_output) == (True, False, False)
    failed = {"code": 3, "message": "bad input"}
    assert parse_job({"name": "batches/x", "metadata": meta, "error": failed}).done
    assert parse_job(meta).done  # a bare batch (no Operation around it): its state ended
    running = {**meta, "state": "BATCH_STATE_RUNNING"}
    assert not parse_job(running).done and not parse_job({"name": "b", "metadata": running}).done


def test_a_result_keeps_its_response_exactly_as_received():
    line = (
        '{"key": "k1", "response": {"candidates": [{"content": {"parts": [{"text": "[]"}]}}],'
        '  "usageMetadata": {"promptTokenCount": 3}}}'
    )
    result = parse_result(line)
    assert result.key == "k1" and result.response.text == "[]"
    assert result.response.raw == line[line.index('{"candidates"') : -1]
    with pytest.raises(ValueError):
        parse_result('{"key": "k1"}')


@pytest.mark.parametrize(
    ("status", "http", "kind"),
    [
        ({"code": 3, "message": "bad"}, 400, "invalid_request"),
        ({"code": 14, "message": "overloaded"}, 503, "server"),
        ({"code": 4, "message": "slow"}, 504, "server"),
        ({"code": 8, "message": "quota"}, 429, "rate_limit"),
        ({"code": 7, "message": "no"}, 403, "permission"),
        ({"code": 503, "message": "http code", "status": "UNAVAILABLE"}, 503, "server"),
        ({"message": "no code"}, 500, "server"),
    ],
)
def test_a_per_request_status_becomes_the_error_an_interactive_call_would_raise(status, http, kind):
    error = request_error(status)
    assert (error.code, error.kind) == (http, kind)


def test_each_line_is_the_interactive_request_body():
    from pipeline.gemini.content import build_generate_content_body

    line = json.loads(request_line("k", detect()))
    assert line == {"key": "k", "request": build_generate_content_body(detect())}


# ------------------------------------------------------------------------------- the SDK
@pytest.fixture
async def sdk_server():
    async with LocalServer(ServerOptions(api_key="sdk-key", batch_seconds=0.05)) as running:
        yield running


async def test_the_sdk_runs_a_file_job_and_an_inline_job_against_the_local_server(
    sdk_server, tmp_path
):
    sdk = genai.Client(
        api_key="sdk-key", http_options=types.HttpOptions(base_url=sdk_server.base_url)
    )
    path = tmp_path / "input.jsonl"
    path.write_bytes(request_line("a", detect()))
    uploaded = await asyncio.to_thread(
        sdk.files.upload, file=str(path), config=types.UploadFileConfig(mime_type="jsonl")
    )
    job = await asyncio.to_thread(
        sdk.batches.create, model=MODEL, src=uploaded.name, config={"display_name": "sdk-file"}
    )
    assert job.state == types.JobState.JOB_STATE_PENDING and job.display_name == "sdk-file"
    inline = await asyncio.to_thread(
        sdk.batches.create,
        model=MODEL,
        src=[
            {
                "contents": [{"parts": [{"text": DETECT}], "role": "user"}],
                "config": {"response_mime_type": "application/json"},
                "metadata": {"key": "only"},
            }
        ],
    )
    deadline = asyncio.get_running_loop().time() + 20
    while not (job := await asyncio.to_thread(sdk.batches.get, name=job.name)).done:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    data = await asyncio.to_thread(sdk.files.download, file=job.dest.file_name)
    assert json.loads(data.splitlines()[0])["key"] == "a"
    while not (inline := await asyncio.to_thread(sdk.batches.get, name=inline.name)).done:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert inline.dest.inlined_responses[0].metadata == {"key": "only"}
    assert inline.dest.inlined_responses[0].response.text
    names = [j.name for j in await asyncio.to_thread(lambda: list(sdk.batches.list()))]
    assert set(names) == {job.name, inline.name}
    await asyncio.to_thread(sdk.batches.delete, name=inline.name)


async def test_the_sdk_cancels():
    async with LocalServer(ServerOptions(api_key="sdk-key", batch_seconds=600)) as server:
        sdk = genai.Client(
            api_key="sdk-key", http_options=types.HttpOptions(base_url=server.base_url)
        )
        job = await asyncio.to_thread(
            sdk.batches.create,
            model=MODEL,
            src=[{"contents": [{"parts": [{"text": DETECT}], "role": "user"}]}],
        )
        await asyncio.to_thread(sdk.batches.cancel, name=job.name)
        job = await asyncio.to_thread(sdk.batches.get, name=job.name)
    assert job.state == types.JobState.JOB_STATE_CANCELLED and job.done


@pytest.mark.parametrize(
    "message",
    [
        server_fields.BATCH_GENERATE_CONTENT_REQUEST,
        server_fields.GENERATE_CONTENT_BATCH,
        server_fields.BATCH_INPUT_CONFIG,
        server_fields.INLINED_REQUEST,
    ],
    ids=lambda m: m.name,
)
def test_every_accepted_batch_field_exists_in_the_sdk(message):
    known = set().union(*(sdk_fields(name) for name in message.sdk))
    for field in message.fields:
        assert message.sdk_names.get(field, field) in known, f"{message.name}.{field}"
