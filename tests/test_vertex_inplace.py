"""gs:// objects Vertex AI reads in place, never downloaded by the pipeline (issue 24 item 2).

Runs go through gcsfs to the local server's Cloud Storage double, whose stats tell whole-object
GETs from header ranges, and through its Vertex surface (express mode: the test key), which reads
the objects for the calls. What is asserted: an object sent as stored costs one ranged GET and
no download; its key is its md5Hash's (`in_place.content_sha256`), the same in `run --plan`,
the run, a rerun (nothing asked, nothing read) and a copy of it under another name (copied);
an object that must change (EXIF rotation) is downloaded, keyed by its bytes as before, and
sent inline; a header that cannot be read is a row naming why.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.commands.estimate import estimate
from pipeline.commands.reparse import reparse
from pipeline.commands.status import pending, status
from pipeline.inputs import images, in_place
from pipeline.localserver.options import ServerOptions
from pipeline.localserver.server import LocalServer
from pipeline.output import stores
from pipeline.records import SourceFile
from pipeline.run import plan as plans
from pipeline.run.identity import key_suffix
from tests.conftest import make_config, read_current, run, scene_png
from tests.png_support import noise_png, png_chunk

MODEL = "gemini-2.5-flash"


@pytest.fixture
def bucket(tmp_path: Path) -> Path:
    """The folder the double serves as gs://photos."""
    folder = tmp_path / "bucket-photos"
    folder.mkdir()
    return folder


@pytest.fixture
def server_options(bucket: Path) -> ServerOptions:
    return ServerOptions(api_key="test-key", gs_root=(f"photos={bucket}",))


@pytest.fixture
def gcs(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """gs:// through gcsfs to the double; express mode (the key, no project anywhere)."""
    # gcsfs asks a gRPC storage-control API for a bucket's type unless told not to (as in
    # test_vertex.py's gcs_double); the double serves JSON only
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    gcsfs = pytest.importorskip("gcsfs")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.base_url)
    monkeypatch.setenv("GOOGLE_API_KEY", "test-key")
    for name in ("GEMINI_API_KEY", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION"):
        monkeypatch.delenv(name, raising=False)
    yield
    stores.filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()


def vertex_config(tmp_path: Path, server: LocalServer, **sections: Any) -> Any:
    api = {"base_url": server.base_url, "backend": "vertex", **sections.pop("api", {})}
    return make_config(tmp_path, api=api, input={"paths": ["gs://photos/day1"]}, **sections)


def storage(server: LocalServer) -> dict[str, int]:
    return server.stats()["storage"]


def calls(server: LocalServer) -> int:
    counts = server.stats()["requests"].get(
        f"POST /v1/publishers/google/models/{MODEL}:generateContent", {}
    )
    return sum(counts.values())


def rotated_jpeg(seed: int) -> bytes:
    """A JPEG whose EXIF says "rotate 90°": prepare turns it, so it cannot go as stored."""
    image = Image.open(io.BytesIO(scene_png(seed, size=(160, 120))))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", exif=exif)
    return out.getvalue()


def md5_key(data: bytes, suffix: str) -> str:
    """The key of an object sent in place: of the md5Hash its listing gives."""
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    return f"{in_place.content_sha256('md5:' + md5)}.{suffix}"


@pytest.fixture
def day1(bucket: Path) -> dict[str, bytes]:
    """Three PNGs sent as stored (one a copy of another under another name), one rotated JPEG."""
    folder = bucket / "day1"
    folder.mkdir()
    objects = {
        "a.png": scene_png(1, size=(200, 150)),
        "b.png": scene_png(2, size=(120, 90)),
        "r.jpg": rotated_jpeg(3),
    }
    objects["copy-of-a.png"] = objects["a.png"]
    for name, data in objects.items():
        (folder / name).write_bytes(data)
    return objects


async def test_objects_in_place_are_never_downloaded_and_a_rerun_reads_nothing(
    server, tmp_path, gcs, day1
):
    config = vertex_config(tmp_path, server)
    summary = await run(config)

    rows = read_current(tmp_path / "out")
    suffix = key_suffix(config)
    assert summary.rows["ok"] == 4 and summary.copied == 1  # a.png's copy: the same md5Hash
    assert calls(server) == 3
    for name in ("a.png", "b.png", "copy-of-a.png"):
        assert rows[name]["key"] == md5_key(day1[name], suffix)
    assert rows["a.png"]["input_mode"] == rows["b.png"]["input_mode"] == "in_place"
    assert (rows["a.png"]["width"], rows["a.png"]["height"]) == (200, 150)
    # the rotated JPEG is downloaded, turned and sent inline, keyed by its bytes as ever
    assert rows["r.jpg"]["input_mode"] == "inline"
    assert rows["r.jpg"]["key"] == f"{hashlib.sha256(day1['r.jpg']).hexdigest()}.{suffix}"
    assert (rows["r.jpg"]["width"], rows["r.jpg"]["height"]) == (120, 160)
    # one header range each, one whole GET: the JPEG's; Vertex read the two sent in place
    assert storage(server)["object_gets"] == 1
    assert storage(server)["range_gets"] == 4
    assert server.stats()["vertex"]["gs_reads"] == 2  # a.png's copy was not asked

    again = await run(config)
    assert again.skipped == 4 and again.api_calls == 0 and calls(server) == 3
    assert storage(server)["object_gets"] == 1 and storage(server)["range_gets"] == 4


async def test_the_plan_keys_objects_as_the_run_does_and_reads_only_headers(
    server, tmp_path, gcs, day1
):
    config = vertex_config(tmp_path, server)
    before = await asyncio.to_thread(plans.plan, config)
    # a.png's copy has a.png's key: copied in the plan as in the run
    assert before.count(plans.NEW) == 3 and before.count(plans.COPY) == 1
    assert storage(server)["object_gets"] == 1  # the rotated JPEG, to hash it
    report = await asyncio.to_thread(estimate, config)
    assert report["images"] == 3  # bought: the copy costs nothing

    await run(config)
    (tmp_path / "bucket-photos" / "day1" / "another-a.png").write_bytes(day1["a.png"])
    after = await asyncio.to_thread(plans.plan, config)
    assert after.done == 4 and after.count(plans.COPY) == 1 and not after.bought
    assert storage(server)["object_gets"] == 2 + 1  # the two plans' JPEG and the run's


async def test_status_and_reparse_read_rows_sent_in_place(server, tmp_path, gcs, day1):
    config = vertex_config(tmp_path, server, task={"kind": "detect"})
    await run(config)
    assert status(tmp_path / "out")["by_status"] == {"ok": 4}
    gets = storage(server)["object_gets"], storage(server)["range_gets"]
    left = await asyncio.to_thread(pending, config)  # the plan's walk: a listing, no read
    assert (left["to_do"], left["done"]) == (0, 4)
    assert (storage(server)["object_gets"], storage(server)["range_gets"]) == gets
    report = await asyncio.to_thread(reparse, str(tmp_path / "out"))
    assert report["reparsed"] == 4 and report["status_changes"] == {"ok->ok": 4}
    modes = {row["input_mode"] for row in read_current(tmp_path / "out").values()}
    assert modes == {"in_place", "inline", "none"}  # "none": the copy of a.png


async def test_an_unreadable_header_is_a_row_naming_why(server, tmp_path, gcs, bucket):
    folder = bucket / "day1"
    folder.mkdir()
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.jpg").write_bytes(b"shopping list: eggs, milk\n" * 10)
    summary = await run(vertex_config(tmp_path, server))

    rows = read_current(tmp_path / "out")
    assert summary.rows["error"] == 2 and calls(server) == 0
    assert rows["cut.png"]["error"] == "corrupt or truncated image: unreadable image/png header"
    assert rows["notes.jpg"]["error"] == "not an image (text)"
    assert storage(server)["object_gets"] == 0 and storage(server)["range_gets"] == 2


async def test_a_header_past_the_first_range_is_read_again_longer(server, tmp_path, gcs, bucket):
    """A JPEG with a 200 kB ICC profile before its frame: the first 64 KiB do not hold its
    size, a longer range does; still no download."""
    folder = bucket / "day1"
    folder.mkdir()
    image = Image.open(io.BytesIO(scene_png(4, size=(90, 60)))).convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", icc_profile=bytes(range(256)) * 800)
    (folder / "icc.jpg").write_bytes(out.getvalue())
    summary = await run(vertex_config(tmp_path, server))

    row = read_current(tmp_path / "out")["icc.jpg"]
    assert summary.rows["ok"] == 1 and row["input_mode"] == "in_place"
    assert (row["width"], row["height"]) == (90, 60)
    assert storage(server)["object_gets"] == 0 and storage(server)["range_gets"] == 2


async def test_max_side_and_inline_mode_download_and_send_inline(server, tmp_path, gcs, day1):
    """What must be shrunk, or asked inline, is downloaded (keyed by its bytes, as before)."""
    shrunk = vertex_config(tmp_path, server, images={"max_side": 100})
    assert (await run(shrunk)).rows["ok"] == 4
    modes = {row["input_mode"] for row in read_current(tmp_path / "out").values()}
    assert modes == {"inline", "none"}  # "none": the copy of a.png
    assert storage(server)["object_gets"] == 4  # each, to key it by its bytes
    inline = vertex_config(
        tmp_path, server, images={"mode": "inline"}, output={"dir": str(tmp_path / "inline")}
    )
    await run(inline)
    rows = read_current(tmp_path / "inline")
    assert rows["b.png"]["key"] == f"{hashlib.sha256(day1['b.png']).hexdigest()}." + key_suffix(
        inline
    )
    assert {row["input_mode"] for row in rows.values()} == {"inline", "none"}


@pytest.fixture
def late(bucket: Path) -> dict[str, bytes]:
    """PNGs past a head and a tail range: one turned by an eXIf chunk after its pixels, one
    whose late eXIf says "upright" (its pixels in libpng's 8 KiB chunks), one with none (its
    pixels in one chunk), one turned whose eXIf 100 kB of text follow (past the first tail)."""
    folder = bucket / "day1"
    folder.mkdir()
    objects = {
        "turned.png": noise_png(7, 6),
        "upright.png": noise_png(8, 1, idat=8192),
        "plain.png": noise_png(9, idat=1 << 20),
        "noted.png": noise_png(10, 6, after=png_chunk(b"tEXt", b"note\0" + b"x" * 100_000)),
    }
    for name, data in objects.items():
        (folder / name).write_bytes(data)
    return objects


async def test_a_png_turned_by_an_exif_chunk_after_its_pixels_is_sent_turned(
    server, tmp_path, gcs, late
):
    """The same image gives the same answer read in place or from a local file: an eXIf chunk
    after the pixels (found in a second range, from the object's end) turns it as `prepare`
    turns the local file, so it is downloaded and sent turned; the others go in place."""
    config = vertex_config(tmp_path, server, task={"kind": "detect"})
    assert (await run(config)).rows["ok"] == 4
    rows = read_current(tmp_path / "out")
    for name in ("turned.png", "noted.png"):
        row = rows[name]
        assert (row["input_mode"], row["width"], row["height"]) == ("inline", 300, 240), name
    assert rows["upright.png"]["input_mode"] == rows["plain.png"]["input_mode"] == "in_place"
    assert (rows["plain.png"]["width"], rows["plain.png"]["height"]) == (240, 300)
    # a head range and a tail range each, noted.png a longer tail too; whole GETs: the turned
    # ones, to turn them
    assert storage(server)["object_gets"] == 2 and storage(server)["range_gets"] == 9
    again = await run(config)  # each bought once: a rerun asks and reads nothing
    assert again.skipped == 4 and again.api_calls == 0
    assert storage(server)["object_gets"] == 2 and storage(server)["range_gets"] == 9

    local = tmp_path / "images"
    local.mkdir()
    (local / "turned.png").write_bytes(late["turned.png"])
    here = make_config(
        tmp_path,
        api={"base_url": server.base_url},
        task={"kind": "detect"},
        output={"dir": str(tmp_path / "here")},
    )
    await run(here)
    mine = read_current(tmp_path / "here")["turned.png"]
    for column in ("key", "width", "height", "objects"):
        assert rows["turned.png"][column] == mine[column], column


async def test_without_verify_no_tail_is_read_as_no_local_file_is_turned_by_it(
    server, tmp_path, gcs, late
):
    """`[images] verify = false`: `prepare` does not walk a local PNG's chunks, so a late eXIf
    chunk turns nothing there, nor in place (no second range)."""
    config = vertex_config(tmp_path, server, images={"verify": False})
    assert (await run(config)).rows["ok"] == 4
    row = read_current(tmp_path / "out")["turned.png"]
    assert (row["input_mode"], row["width"], row["height"]) == ("in_place", 240, 300)
    src = SourceFile("turned.png", "", "turned.png", size=len(late["turned.png"]))
    local = images.prepare(src, data=late["turned.png"], verify=False)
    assert (local.width, local.height) == (240, 300)
    assert storage(server)["object_gets"] == 0 and storage(server)["range_gets"] == 4


# ------------------------------------------------------------------------------ no server
def test_content_id_prefers_the_md5_and_pins_a_composite_object_to_its_generation():
    plain = {"md5Hash": "XrY7u+Ae7tCTyyK7j1rNww==", "crc32c": "yZRlqg==", "generation": "7"}
    composite = {"crc32c": "yZRlqg==", "size": 12, "generation": "8", "componentCount": 2}
    assert stores.content_id(plain) == "md5:XrY7u+Ae7tCTyyK7j1rNww=="
    assert stores.content_id({**plain, "generation": "9"}) == stores.content_id(plain)
    assert stores.content_id(composite) == "crc32c:yZRlqg==:12:8"
    assert stores.content_id({**composite, "generation": "9"}) != stores.content_id(composite)
    assert stores.content_id({"ETag": "abc", "size": 3}) == ""  # S3, a local file: no id
    one, two = (in_place.content_sha256(stores.content_id(i)) for i in (plain, composite))
    assert len(one) == 64 and int(one, 16) and one != two


@pytest.mark.parametrize(
    ("options", "orientation"),
    [({"lossless": True}, 1), ({"quality": 80}, 1), ({"quality": 80, "exif": b"Exif"}, 0)],
)
def test_a_webp_cut_short_is_measured_from_its_first_chunk(options, orientation):
    """Pillow's WebP reader wants the whole file; a ranged read gives the first bytes only."""
    out = io.BytesIO()
    exif = options.pop("exif", None)
    image = Image.open(io.BytesIO(scene_png(5, size=(300, 200))))
    if exif is not None:
        tags = Image.Exif()
        tags[0x0112] = 1
        options["exif"] = tags
    image.save(out, "WEBP", **options)
    head = out.getvalue()[:30]
    found = images.header(io.BytesIO(head), head)
    assert (found.mime, found.width, found.height) == ("image/webp", 300, 200)
    assert found.orientation == orientation  # EXIF present: unknown here, so not sent as is
    assert found.as_is(None) is (orientation == 1)


def test_a_downloaded_object_still_goes_in_place_when_sent_as_stored(tmp_path):
    data = scene_png(6, size=(64, 48))
    src = SourceFile("gs://photos/x.png", "gs://photos", "x.png", size=len(data))
    config = make_config(tmp_path, api={"backend": "vertex"})
    as_stored = images.prepare(src, data=data)
    shrunk = images.prepare(src, data=data, max_side=32)
    assert in_place.sent_as_stored(config, as_stored, data)
    assert not in_place.sent_as_stored(config, shrunk, data)
    developer = make_config(tmp_path)
    assert not in_place.sent_as_stored(developer, as_stored, data)
