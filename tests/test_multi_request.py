"""Several images in one request on the wire: each image right after its caption, in the
documented order of each API, and the local server answering about every image it is asked
about (not the reference images), with exact truth."""

from __future__ import annotations

import io

import pytest

from pipeline.gemini import GeminiClient
from pipeline.gemini.content import build_generate_content_body
from pipeline.gemini.interactions import build_interaction_body
from pipeline.gemini.types import GenerateRequest, ImagePart
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.run.requests import request_with_images
from pipeline.tasks import get_task, read_answer
from pipeline.tasks.base import Reference, TaskSettings
from pipeline.tasks.multi import reference_caption
from tests.conftest import box_iou, draw_shapes


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _request() -> GenerateRequest:
    return GenerateRequest(
        model="gemini-2.5-flash",
        prompt="P",
        images=(
            ImagePart("image/png", data=b"r", caption="Reference image 1."),
            ImagePart("image/png", file_uri="https://x/files/a", caption="Image 0:"),
            ImagePart("image/jpeg", data=b"t"),
        ),
    )


def test_generate_content_sends_each_caption_before_its_image_then_the_prompt() -> None:
    parts = build_generate_content_body(_request())["contents"][0]["parts"]
    shape = [next(iter(part)) for part in parts]
    assert shape == ["text", "inline_data", "text", "file_data", "inline_data", "text"]
    assert [p.get("text") for p in parts if "text" in p] == ["Reference image 1.", "Image 0:", "P"]


def test_interactions_send_the_prompt_then_each_caption_before_its_image() -> None:
    content = build_interaction_body(_request())["input"][0]["content"]
    kinds = [
        (item["type"], item.get("text") or item.get("uri") or item.get("data")) for item in content
    ]
    assert kinds == [
        ("text", "P"),
        ("text", "Reference image 1."),
        ("image", "cg=="),
        ("text", "Image 0:"),
        ("image", "https://x/files/a"),
        ("image", "dA=="),
    ]


@pytest.mark.parametrize("flavor", ["generateContent", "interactions"])
@pytest.mark.parametrize("kind", ["detect", "point"])
async def test_the_local_server_answers_about_every_image_but_the_references(
    flavor: str, kind: str
) -> None:
    targets = [
        draw_shapes(*size, seed=seed, count=2) for seed, size in enumerate(((160, 120), (96, 144)))
    ]
    reference, _ = draw_shapes(128, 128, seed=9, count=3)
    settings = TaskSettings(
        kind=kind, flavor=flavor, grouped=True, reference_images=(Reference("r.png", "an example"),)
    )
    request = request_with_images(
        get_task(kind).request(settings),
        [ImagePart("image/png", data=_png(reference), caption=reference_caption(1, "an example"))],
        [ImagePart("image/png", data=_png(image)) for image, _ in targets],
        captioned=True,
    )
    async with (
        LocalServer(ServerOptions()) as server,
        GeminiClient("test-key", base_url=server.base_url) as client,
    ):
        response = await client.generate(request, flavor=flavor)
    sizes = [image.size for image, _ in targets]
    parsed = read_answer(response, 0, 0, settings, sizes)
    assert parsed.status == "ok" and parsed.error is None
    assert response.usage.prompt_by_modality["IMAGE"] == 3 * 258  # all three were billed
    for index, (_, shapes) in enumerate(targets):
        placed = [o for o in parsed.objects if o["image"] == index]
        assert len(placed) == len(shapes)  # the reference's three shapes are not among them
        for shape in shapes:
            if kind == "detect":
                assert max(box_iou(tuple(o["bbox"]), shape.box) for o in placed) >= 0.9
            else:
                x0, y0, x1, y1 = shape.box
                assert any(x0 <= o["xy"][0] <= x1 and y0 <= o["xy"][1] <= y1 for o in placed)


@pytest.mark.parametrize("flavor", ["generateContent", "interactions"])
@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-3-flash-preview"])
async def test_a_group_with_references_is_valid_for_the_sdk_and_the_service(
    flavor: str, model: str
) -> None:
    """Captions, inline and uploaded images mixed: the SDK's own types take the body (unknown
    fields refused), and the strict server answers it."""
    from tests.test_wire_requests import assert_sdk_takes_generate, assert_sdk_takes_interaction

    image = _png(draw_shapes(96, 64, seed=3, count=1)[0])
    settings = TaskSettings(
        kind="segment" if "2.5" in model else "detect",
        model=model,
        flavor=flavor,
        grouped=True,
        reference_images=(Reference("r.png", "an example"),),
    )
    async with (
        LocalServer(ServerOptions()) as server,
        GeminiClient("test-key", base_url=server.base_url) as client,
    ):
        uploaded = await client.upload_file(image, "image/png")
        request = request_with_images(
            get_task(settings.kind).request(settings),
            [ImagePart("image/png", data=image, caption=reference_caption(1, "an example"))],
            [ImagePart("image/png", file_uri=uploaded.uri), ImagePart("image/png", data=image)],
            captioned=True,
        )
        if flavor == "generateContent":
            assert_sdk_takes_generate(build_generate_content_body(request))
        else:
            assert_sdk_takes_interaction(build_interaction_body(request))
        response = await client.generate(request, flavor=flavor)
    parsed = read_answer(response, 0, 0, settings, [(96, 64), (96, 64)])
    assert parsed.status == "ok" and {o["image"] for o in parsed.objects} == {0, 1}
