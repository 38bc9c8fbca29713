"""The official google-genai SDK against the local server: its wire format is the truth.

The SDK calls /v1/..., uploads through /upload/v1/files with the resumable protocol, sends
`fileData` with snake_case inner keys and URL-safe base64; the strict server must take exactly
that (the SDK's own requests are the reference of what is valid) and answer what the SDK parses:
per-part media resolution on v1alpha, Interactions hops it continues by itself, a 402. The sync
client runs in a worker thread while the server runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from google import genai
from google.genai import errors, types
from PIL import Image, ImageDraw
from pydantic import BaseModel

from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer

DETECT = (
    "Detect the all of the prominent items in the image. "
    "The box_2d should be [ymin, xmin, ymax, xmax] normalized to 0-1000."
)


class Box(BaseModel):
    box_2d: list[int]
    label: str


def shapes_png(colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> bytes:
    image = Image.new("RGB", (384, 384), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def server_options() -> ServerOptions:
    """The options of the `server` fixture (tests/conftest.py) in this module."""
    return ServerOptions(api_key="sdk-key")


@pytest.fixture
def client(server):
    return genai.Client(api_key="sdk-key", http_options=types.HttpOptions(base_url=server.base_url))


async def test_sdk_upload_then_generate_with_inline_and_file_parts(server, client, tmp_path):
    red = shapes_png((220, 40, 40), (96, 96, 288, 192))  # one red rectangle
    blue = shapes_png((40, 80, 220), (0, 192, 192, 384))  # one blue rectangle, bottom left
    path = tmp_path / "blue.png"
    path.write_bytes(blue)

    uploaded = await asyncio.to_thread(client.files.upload, file=str(path))
    assert uploaded.state == types.FileState.ACTIVE
    assert uploaded.mime_type == "image/png" and uploaded.size_bytes == len(blue)
    fetched = await asyncio.to_thread(client.files.get, name=uploaded.name)
    assert fetched.uri == uploaded.uri

    config = types.GenerateContentConfig(
        response_mime_type="application/json",
        response_schema=list[Box],
        thinking_config=types.ThinkingConfig(thinking_budget=0),
    )
    inline = await asyncio.to_thread(
        client.models.generate_content,
        model="gemini-2.5-flash",
        contents=[types.Part.from_bytes(data=red, mime_type="image/png"), DETECT],
        config=config,
    )
    assert inline.parsed == [Box(box_2d=[250, 250, 500, 750], label="red rectangle")]
    assert (
        inline.usage_metadata.prompt_token_count
        == 258 + inline.usage_metadata.prompt_tokens_details[0].token_count
    )

    from_file = await asyncio.to_thread(
        client.models.generate_content,
        model="gemini-2.5-flash",
        contents=[types.Part.from_uri(file_uri=uploaded.uri, mime_type=uploaded.mime_type), DETECT],
        config=config,
    )
    assert from_file.parsed == [Box(box_2d=[500, 0, 1000, 500], label="blue rectangle")]

    listed = await asyncio.to_thread(lambda: [f.name for f in client.files.list()])
    assert listed == [uploaded.name]
    await asyncio.to_thread(client.files.delete, name=uploaded.name)
    with pytest.raises(errors.ClientError) as missing:
        await asyncio.to_thread(client.files.get, name=uploaded.name)
    assert missing.value.code == 403

    requests = server.stats()["requests"]
    assert requests["POST /upload/v1/files"] == {"200": 2}  # start, then one finalizing chunk
    assert requests["POST /v1/models/gemini-2.5-flash:generateContent"] == {"200": 2}


async def test_sdk_async_client_and_errors(server, client):
    red = shapes_png((220, 40, 40), (96, 96, 288, 192))
    response = await client.aio.models.generate_content(
        model="gemini-3-flash-preview",
        contents=["Describe this image.", types.Part.from_bytes(data=red, mime_type="image/png")],
        config=types.GenerateContentConfig(
            media_resolution=types.MediaResolution.MEDIA_RESOLUTION_LOW
        ),
    )
    assert response.text == "An image of a red rectangle on a white background."
    assert response.usage_metadata.prompt_tokens_details[1].token_count == 280
    with pytest.raises(errors.ClientError) as unsupported:
        await client.aio.models.generate_content(
            model="gemini-2.5-flash",
            contents=[types.Part.from_bytes(data=b"GIF89a", mime_type="image/gif"), "x"],
        )
    assert unsupported.value.code == 400 and unsupported.value.status == "INVALID_ARGUMENT"
    wrong = genai.Client(api_key="wrong", http_options=types.HttpOptions(base_url=server.base_url))
    with pytest.raises(errors.ClientError) as denied:
        await wrong.aio.models.generate_content(model="gemini-2.5-flash", contents="hello")
    assert denied.value.code == 400
    assert denied.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"


@pytest.mark.skipif(not hasattr(genai.Client, "interactions"), reason="SDK without interactions")
async def test_sdk_interactions(server, client):
    red = shapes_png((220, 40, 40), (96, 96, 288, 192))
    interaction = await asyncio.to_thread(
        client.interactions.create,
        model="gemini-3-flash-preview",
        input=[
            {"type": "text", "text": "Describe this image."},
            {"type": "image", "data": base64.b64encode(red).decode(), "mime_type": "image/png"},
        ],
        generation_config={"thinking_level": "minimal"},
        store=False,
    )
    assert interaction.status == "completed"
    assert interaction.steps[-1].type == "model_output"
    assert interaction.steps[-1].content[0].text == (
        "An image of a red rectangle on a white background."
    )
    assert interaction.usage.total_input_tokens == 1120 + 5
    assert server.stats()["requests"]["POST /v1/interactions"] == {"200": 1}


@pytest.mark.skipif(not hasattr(genai.Client, "interactions"), reason="SDK without interactions")
async def test_sdk_continues_requires_continuation_hops_by_itself():
    red = shapes_png((220, 40, 40), (96, 96, 288, 192))
    prompt = DETECT + " Answer in JSON."

    async def ask(options: ServerOptions):
        async with LocalServer(options) as running:
            sdk = genai.Client(
                api_key="sdk-key", http_options=types.HttpOptions(base_url=running.base_url)
            )
            interaction = await asyncio.to_thread(
                sdk.interactions.create,
                model="gemini-3-flash-preview",
                input=[
                    {"type": "text", "text": prompt},
                    {
                        "type": "image",
                        "data": base64.b64encode(red).decode(),
                        "mime_type": "image/png",
                    },
                ],
                generation_config={"thinking_level": "minimal"},
                store=False,
            )
            return interaction, running.stats()

    whole, _ = await ask(ServerOptions(api_key="sdk-key"))
    hopped, stats = await ask(ServerOptions(api_key="sdk-key", decode_limit=4))
    text = "".join(step.content[0].text for step in hopped.steps if step.type == "model_output")
    assert text == whole.steps[-1].content[0].text  # the hops' steps, concatenated by the SDK
    hops = stats["requests"]["POST /v1/interactions"]["200"]
    assert hops > 1 and stats["continuations"] == {"issued": hops - 1, "waiting": 0}
    assert hopped.usage.total_input_tokens == hops * whole.usage.total_input_tokens  # summed
    assert hopped.status == "completed"


async def test_sdk_per_part_media_resolution_on_the_versions_the_table_lists(server):
    """The SDK sends a Part's media_resolution on any version (models._Part_to_mldev): it is
    taken on v1alpha and v1beta (the media-resolution page, 2026-09-19), on v1, the SDK's
    default, as an assumption (rule media.part-v1), and refused for a model without it."""
    red = shapes_png((220, 40, 40), (96, 96, 288, 192))
    part = types.Part.from_bytes(
        data=red,
        mime_type="image/png",
        media_resolution=types.PartMediaResolutionLevel.MEDIA_RESOLUTION_ULTRA_HIGH,
    )
    contents = [part, "Describe this image."]
    for version in ("v1alpha", "v1beta", None):
        options = types.HttpOptions(base_url=server.base_url, api_version=version)
        sdk = genai.Client(api_key="sdk-key", http_options=options)
        response = await sdk.aio.models.generate_content(
            model="gemini-3-flash-preview", contents=contents
        )
        assert response.usage_metadata.prompt_tokens_details[1].token_count == 2240, version
    with pytest.raises(errors.ClientError) as refused:
        await sdk.aio.models.generate_content(model="gemini-2.5-flash", contents=contents)
    assert refused.value.code == 400 and "Per-part media resolution" in refused.value.message


async def test_sdk_sees_402_when_credits_run_out():
    async with LocalServer(ServerOptions(api_key="sdk-key", credit_budget_usd=0)) as running:
        sdk = genai.Client(
            api_key="sdk-key", http_options=types.HttpOptions(base_url=running.base_url)
        )
        with pytest.raises(errors.ClientError) as depleted:
            await sdk.aio.models.generate_content(model="gemini-2.5-flash", contents="hello")
        assert depleted.value.code == 402 and depleted.value.status == "RESOURCE_EXHAUSTED"
