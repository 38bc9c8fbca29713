"""walk() and read_manifest() on real directory trees, links and manifests in tmp_path."""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs.images import prepare
from pipeline.inputs.source import read_manifest, walk
from pipeline.output.stores import filesystem
from pipeline.records import SourceFile


def touch(root: Path, *rel_paths: str, content: bytes = b"x") -> None:
    for rel_path in rel_paths:
        path = root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def rels(sources: list[SourceFile]) -> list[str]:
    return [s.rel_path for s in sources]


def errors(sources: list[SourceFile]) -> dict[str, str | None]:
    return {s.rel_path: s.error for s in sources}


# ---------------------------------------------------------------- order, laziness


def random_tree(root: Path, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = ["a", "B", "c d", "e.jpg", "Z", "_x", "10", "9", "é", "日本"]
    created = []
    for _ in range(60):
        depth = rng.randint(1, 4)
        parts = [rng.choice(names) for _ in range(depth - 1)]
        rel_path = "/".join([*[f"d{p}" for p in parts], f"f{rng.choice(names)}.png"])
        touch(root, rel_path)
        created.append(rel_path)
    return sorted(set(created), key=lambda p: p.split("/"))


def test_walk_is_depth_first_in_name_order(tmp_path: Path) -> None:
    expected = random_tree(tmp_path, seed=1)
    found = list(walk([tmp_path]))
    assert rels(found) == expected  # depth-first + sorted names == sorting by path components
    assert rels(list(walk([tmp_path]))) == expected
    assert all(s.error is None and s.root == str(tmp_path) for s in found)
    assert all(s.path == str(tmp_path / s.rel_path) for s in found)


def test_walk_reports_size_and_mtime(tmp_path: Path) -> None:
    touch(tmp_path, "a.png", content=b"12345")
    os.utime(tmp_path / "a.png", ns=(1_000_000_000, 1_234_567_890_123))
    (source,) = walk([tmp_path])
    assert (source.size, source.mtime_ns) == (5, 1_234_567_890_123)


def test_walk_is_lazy(tmp_path: Path) -> None:
    """The first file comes out before later directories are listed: a file created in one
    afterwards is still found."""
    touch(tmp_path, "a/1.png", "b/2.png")
    (tmp_path / "c").mkdir()
    sources = walk([tmp_path])
    assert next(sources).rel_path == "a/1.png"
    touch(tmp_path, "c/late.png", "b/deeper/late.png")
    assert rels(list(sources)) == ["b/2.png", "b/deeper/late.png", "c/late.png"]


def test_walk_holds_only_the_current_path(tmp_path: Path) -> None:
    """Deep trees need no recursion and every finished directory is released."""
    deep = tmp_path / "/".join(["d"] * 300)
    deep.mkdir(parents=True)
    (deep / "bottom.png").write_bytes(b"x")
    (source,) = walk([tmp_path])
    assert source.rel_path.count("/") == 300


def test_several_roots_in_the_given_order(tmp_path: Path) -> None:
    touch(tmp_path, "one/x.png", "two/a.png")
    found = list(walk([tmp_path / "two", tmp_path / "one"]))
    assert [(s.root, s.rel_path) for s in found] == [
        (str(tmp_path / "two"), "a.png"),
        (str(tmp_path / "one"), "x.png"),
    ]


def test_a_root_that_is_a_file_yields_itself(tmp_path: Path) -> None:
    touch(tmp_path, "sub/.hidden photo.heic")
    (source,) = walk([tmp_path / "sub" / ".hidden photo.heic"], include=["*.png"])
    assert (source.root, source.rel_path, source.error) == (
        str(tmp_path / "sub"),
        ".hidden photo.heic",
        None,
    )


def test_a_lone_path_is_one_root(tmp_path: Path) -> None:
    touch(tmp_path, "a.png")
    assert rels(list(walk(str(tmp_path)))) == ["a.png"]  # type: ignore[arg-type]


def test_a_missing_root_is_an_error_entry(tmp_path: Path) -> None:
    (source,) = walk([tmp_path / "nope"])
    assert source.error == "no such file"
    assert source.rel_path == "nope"


# ---------------------------------------------------------------- patterns, hidden entries


@pytest.fixture
def mixed_tree(tmp_path: Path) -> Path:
    touch(
        tmp_path,
        "a.jpg",
        "B.JPG",
        "c.png",
        "notes.txt",
        "raw/x.tif",
        "raw/deep/y.tif",
        "raw/deep/z.jpg",
        "thumbs/a.jpg",
        "photos/2024/p.jpg",
        ".DS_Store",
        ".cache/c.jpg",
        "photos/.hidden.jpg",
        "photos/.trash/t.jpg",
    )
    return tmp_path


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (
            ["*"],
            [],
            [
                "a.jpg",
                "B.JPG",
                "c.png",
                "notes.txt",
                "photos/2024/p.jpg",
                "raw/deep/y.tif",
                "raw/deep/z.jpg",
                "raw/x.tif",
                "thumbs/a.jpg",
            ],
        ),
        (["*.jpg"], ["thumbs"], ["a.jpg", "B.JPG", "photos/2024/p.jpg", "raw/deep/z.jpg"]),
        (
            ["*.jpg", "*.png"],
            ["raw/**", "thumbs/*"],
            ["a.jpg", "B.JPG", "c.png", "photos/2024/p.jpg"],
        ),
        (["raw/*.tif"], [], ["raw/x.tif"]),
        (["raw/**/*.tif"], [], ["raw/deep/y.tif", "raw/x.tif"]),
        (["**/deep/*"], ["*.jpg"], ["raw/deep/y.tif"]),
        (["?.jpg"], [], ["a.jpg", "B.JPG", "photos/2024/p.jpg", "raw/deep/z.jpg", "thumbs/a.jpg"]),
        (["[ab].jpg"], ["b.jpg"], ["a.jpg", "thumbs/a.jpg"]),
    ],
)
def test_include_and_exclude(
    mixed_tree: Path, include: list[str], exclude: list[str], expected: list[str]
) -> None:
    assert rels(list(walk([mixed_tree], include=include, exclude=exclude))) == sorted(
        expected, key=lambda p: p.split("/")
    )


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        ([".cache/*.jpg"], [".cache/c.jpg"]),
        (["**/.*.jpg"], ["photos/.hidden.jpg"]),
        ([".*"], [".DS_Store", "photos/.hidden.jpg"]),
        (["photos/.trash/*"], ["photos/.trash/t.jpg"]),
        (
            ["*.jpg", "photos/.*/*"],
            [
                "a.jpg",
                "B.JPG",
                "photos/.trash/t.jpg",
                "photos/2024/p.jpg",
                "raw/deep/z.jpg",
                "thumbs/a.jpg",
            ],
        ),
    ],
)
def test_hidden_entries_need_an_include_that_names_the_dot(
    mixed_tree: Path, include: list[str], expected: list[str]
) -> None:
    assert rels(list(walk([mixed_tree], include=include))) == sorted(
        expected, key=lambda p: p.split("/")
    )


def test_excludes_match_hidden_names_too(mixed_tree: Path) -> None:
    found = walk([mixed_tree], include=[".cache/*", "photos/.*"], exclude=[".cache"])
    assert rels(list(found)) == ["photos/.hidden.jpg"]


class ScandirSpy:
    """Records which directories the walk lists, passing every call to the real os.scandir."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.root = root
        self.listed: list[str] = []
        self._real = os.scandir
        monkeypatch.setattr(os, "scandir", self)

    def __call__(self, path: str) -> object:
        self.listed.append(Path(os.path.relpath(path, self.root)).as_posix())
        return self._real(path)


def test_include_prunes_directories_it_cannot_match(
    mixed_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ScandirSpy(monkeypatch, mixed_tree)
    assert rels(list(walk([mixed_tree], include=["raw/*.tif"]))) == ["raw/x.tif"]
    assert spy.listed == [".", "raw"]


def test_exclude_prunes_the_whole_subtree(
    mixed_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ScandirSpy(monkeypatch, mixed_tree)
    list(walk([mixed_tree], exclude=["raw", "photos/*"]))
    assert spy.listed == [".", "photos", "thumbs"]


def test_walk_lists_nothing_beyond_the_first_file_before_yielding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch(tmp_path, *[f"d{i}/e{j}/f.png" for i in range(5) for j in range(5)])
    spy = ScandirSpy(monkeypatch, tmp_path)
    sources = walk([tmp_path])
    assert next(sources).rel_path == "d0/e0/f.png"
    assert spy.listed == [".", "d0", "d0/e0"]
    assert len(list(sources)) == 24
    assert len(spy.listed) == 1 + 5 + 25


def test_empty_pattern_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty glob"):
        list(walk([tmp_path], include=[""]))


# ---------------------------------------------------------------- odd names


def test_unicode_and_odd_names(tmp_path: Path) -> None:
    names = [
        "café.png",
        "日本語 ファイル.png",
        "with space .png",
        "new\nline.png",
        "tab\there.png",
        "emoji 😀.png",
        "ünï/cödé.png",
    ]
    touch(tmp_path, *names)
    found = list(walk([tmp_path]))
    assert sorted(rels(found)) == sorted(names)
    assert all(Path(s.path).read_bytes() == b"x" for s in found)


@pytest.mark.skipif(sys.platform != "linux", reason="arbitrary name bytes are a Linux thing")
def test_non_utf8_names_survive_via_surrogateescape(tmp_path: Path) -> None:
    raw_dir = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(raw_dir)
    with open(raw_dir + b"/\xff\xfe.png", "wb") as file:
        file.write(b"x")
    (source,) = walk([tmp_path])
    assert source.rel_path == "caf\udce9/\udcff\udcfe.png"
    assert os.fsencode(source.rel_path) == b"caf\xe9/\xff\xfe.png"
    item = prepare(source)  # the path opens again as it was found
    assert item.error == "not an image (text)"


# ---------------------------------------------------------------- symlinks


def test_file_symlinks_are_followed_and_keep_their_own_path(tmp_path: Path) -> None:
    touch(tmp_path, "real/a.png", content=b"12345")
    (tmp_path / "links").mkdir()
    os.symlink("../real/a.png", tmp_path / "links" / "alias.png")
    found = {s.rel_path: s for s in walk([tmp_path])}
    alias = found["links/alias.png"]
    assert alias.error is None
    assert alias.path == str(tmp_path / "links" / "alias.png")
    assert alias.size == 5


def test_broken_symlink_is_an_error_entry(tmp_path: Path) -> None:
    os.symlink("missing.png", tmp_path / "dangling.png")
    assert errors(list(walk([tmp_path]))) == {"dangling.png": "broken symlink"}


def test_self_referencing_file_link_is_a_loop(tmp_path: Path) -> None:
    os.symlink("me.png", tmp_path / "me.png")
    (source,) = walk([tmp_path])
    assert source.error is not None and source.error.startswith("symlink loop")


def test_directory_symlinks_only_with_follow(tmp_path: Path) -> None:
    touch(tmp_path, "elsewhere/inside.png", "root/own.png")
    os.symlink("../elsewhere", tmp_path / "root" / "linked")
    assert rels(list(walk([tmp_path / "root"]))) == ["own.png"]
    followed = list(walk([tmp_path / "root"], follow_symlinks=True))
    assert errors(followed) == {"linked/inside.png": None, "own.png": None}


def test_symlink_loop_is_one_error_entry(tmp_path: Path) -> None:
    touch(tmp_path, "a/b/photo.png")
    os.symlink("../..", tmp_path / "a" / "b" / "up")
    found = list(walk([tmp_path], follow_symlinks=True))
    assert errors(found) == {
        "a/b/photo.png": None,
        "a/b/up": "symlink loop: points back to .",
    }
    assert errors(list(walk([tmp_path]))) == {"a/b/photo.png": None}


def test_two_links_to_one_directory_walk_it_once(tmp_path: Path) -> None:
    touch(tmp_path, "shared/s.png")
    (tmp_path / "root").mkdir()
    os.symlink("../shared", tmp_path / "root" / "first")
    os.symlink("../shared", tmp_path / "root" / "second")
    found = list(walk([tmp_path / "root"], follow_symlinks=True))
    assert errors(found) == {
        "first/s.png": None,
        "second": "symlinked directory already walked as first",
    }


def test_a_fifo_is_an_error_entry(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    assert errors(list(walk([tmp_path]))) == {"pipe.png": "not a regular file (fifo)"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any directory")
def test_unreadable_directory_is_an_error_entry_and_the_walk_goes_on(tmp_path: Path) -> None:
    touch(tmp_path, "a/ok.png", "locked/secret.png", "z/ok.png")
    (tmp_path / "locked").chmod(0)
    try:
        found = list(walk([tmp_path]))
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert errors(found) == {
        "a/ok.png": None,
        "locked": "unreadable directory: permission denied",
        "z/ok.png": None,
    }


def test_directory_that_cannot_be_listed_is_an_error_entry_and_the_walk_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs as root too: the OS refusal is injected at os.scandir, the walk is real."""
    touch(tmp_path, "a/ok.png", "locked/secret.png", "z/ok.png")
    real_scandir = os.scandir

    def refusing_scandir(path: str) -> object:
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    assert errors(list(walk([tmp_path]))) == {
        "a/ok.png": None,
        "locked": "unreadable directory: permission denied",
        "z/ok.png": None,
    }


# ---------------------------------------------------------------- manifests


def test_txt_manifest(tmp_path: Path) -> None:
    touch(tmp_path, "lists/imgs/a.png", "lists/b.png", "outside/c.png")
    manifest = tmp_path / "lists" / "files.txt"
    manifest.write_text(
        "# photos to label\n"
        "imgs/a.png\n"
        "\n"
        "  b.png  \n"
        f"{tmp_path / 'lists' / 'imgs' / 'a.png'}\n"
        f"{tmp_path / 'outside' / 'c.png'}\n"
        "../outside/c.png\n"
        "./imgs/../imgs/a.png\n"
        "missing.png\n",
        encoding="utf-8",
    )
    found = list(read_manifest(manifest))
    root = str(tmp_path / "lists")
    # The same file listed twice (by any spelling) is one file, one row; a `../` entry is rooted
    # at its own folder, so no stored path climbs out of its root.
    assert [(s.root, s.rel_path, s.error) for s in found] == [
        (root, "imgs/a.png", None),
        (root, "b.png", None),
        (str(tmp_path / "outside"), "c.png", None),
        (root, "missing.png", "no such file"),
    ]
    assert found[0].path == str(tmp_path / "lists" / "imgs" / "a.png")
    assert found[0].size == 1


def test_csv_manifest_with_a_path_column(tmp_path: Path) -> None:
    touch(tmp_path, "a, b.png", "new\nline.png", "c.png")
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["label", "PATH"])
        writer.writerows([["cat", "a, b.png"], ["dog", "new\nline.png"], ["", ""], ["x", "c.png"]])
    assert [(s.rel_path, s.error) for s in read_manifest(manifest)] == [
        ("a, b.png", None),
        ("new\nline.png", None),
        ("c.png", None),
    ]


def test_csv_manifest_without_header_uses_the_first_column(tmp_path: Path) -> None:
    touch(tmp_path, "x.png", "y.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("x.png,cat\ny.png,dog\n", encoding="utf-8")
    assert rels(list(read_manifest(manifest))) == ["x.png", "y.png"]


def test_parquet_manifest_reads_in_batches(tmp_path: Path) -> None:
    touch(tmp_path, "img/a.png")
    paths = ["img/a.png", None, *[f"img/missing{i}.png" for i in range(20_000)]]
    table = pa.table({"label": ["x"] * len(paths), "path": paths})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=5_000)
    found = read_manifest(tmp_path / "m.parquet")
    first = next(found)
    assert (first.rel_path, first.error, first.root) == ("img/a.png", None, str(tmp_path))
    rest = list(found)
    assert len(rest) == 20_000
    assert rest[-1].rel_path == "img/missing19999.png" and rest[-1].error == "no such file"


def test_parquet_manifest_without_path_column_uses_the_first(tmp_path: Path) -> None:
    touch(tmp_path, "a.png")
    pq.write_table(pa.table({"file": ["a.png"], "n": [1]}), tmp_path / "m.parquet")
    assert rels(list(read_manifest(tmp_path / "m.parquet"))) == ["a.png"]


def test_manifest_of_unknown_type_or_missing_raises_at_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown type"):
        read_manifest(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "absent.txt")


# ------------------------------------------------------------- other fsspec stores, file://


def test_a_store_without_paged_listing_is_walked_folder_by_folder(tmp_path: Path) -> None:
    """fsspec's in-memory filesystem stands for az:// and the others (listed with `ls`):
    the same files as the local walk of the same tree, same rules, in name order."""
    from pipeline.output.stores import filesystem

    tree = ["a.jpg", "b/c.png", "b/.hidden.png", ".cache/x.png", "raw/d.tif", "z.txt"]
    fs = filesystem("memory")
    touch(tmp_path / "tree", *tree)
    for name in tree:
        fs.pipe(f"memory://walk-test/tree/{name}", b"x")
    for include, exclude in ((["*"], []), (["*.png"], ["raw"]), (["raw/*", "**/.*.png"], [])):
        local = rels(list(walk([tmp_path / "tree"], include=include, exclude=exclude)))
        remote = list(walk(["memory://walk-test/tree"], include=include, exclude=exclude))
        assert rels(remote) == local
        assert all(s.size == 1 and s.path.startswith("memory://walk-test/tree/") for s in remote)


def test_file_urls_are_local_paths(tmp_path: Path) -> None:
    touch(tmp_path, "x/a.png", "x/b.png")
    assert rels(list(walk([f"file://{tmp_path}/x"]))) == ["a.png", "b.png"]


def test_file_urls_in_a_manifest_are_local_paths(tmp_path: Path) -> None:
    """A manifest is the user's own file: its `file://` lines are read like path lines
    (percent-decoded); only a redirect may not lead there (tests/test_urls.py)."""
    touch(tmp_path, "lists/imgs/a b.png", "outside/c.png")
    manifest = tmp_path / "lists" / "files.txt"
    spaced = (tmp_path / "lists" / "imgs" / "a b.png").as_uri()  # file:///.../a%20b.png
    manifest.write_text(
        f"{spaced}\n"
        f"file://localhost{tmp_path / 'outside' / 'c.png'}\n"
        f"file://{tmp_path / 'lists' / 'gone.png'}\n"
        "imgs/a b.png\n"  # the same file as the first line: one row
        "file://elsewhere/share/d.png\n",
        encoding="utf-8",
    )
    found = list(read_manifest(manifest))
    root = str(tmp_path / "lists")
    assert [(s.root, s.rel_path, s.error) for s in found] == [
        (root, "imgs/a b.png", None),
        (str(tmp_path / "outside"), "c.png", None),
        (root, "gone.png", "no such file"),
        ("", "file://elsewhere/share/d.png", "a file:// URL on another host is not a local path"),
    ]
    assert found[0].path == str(tmp_path / "lists" / "imgs" / "a b.png")
    assert found[0].size == 1


def test_version_stamp_stands_for_an_etag() -> None:
    from pipeline.inputs.source import version_stamp

    assert version_stamp('"abc"') == version_stamp("abc") != version_stamp("abd")
    assert 0 < version_stamp("abc") < 2**63 and version_stamp("") == 0


def test_a_manifest_in_a_bucket_keeps_the_roots_its_rows_name(tmp_path: Path, bucket: str) -> None:
    """A pipeline output's rows as a manifest kept in a bucket (`pipeline tune`'s sample):
    each row's image_root, local or an object prefix, is its root, not the bucket's folder."""
    touch(tmp_path, "a.png")
    table = pa.table(
        {"image_root": [str(tmp_path), "s3://photos/day1"], "image_path": ["a.png"] * 2}
    )
    pq.write_table(table, tmp_path / "m.parquet")
    filesystem("s3").put(str(tmp_path / "m.parquet"), f"{bucket}/lists/m.parquet")
    local, remote = read_manifest(f"{bucket}/lists/m.parquet")
    assert (local.root, local.rel_path, local.error) == (str(tmp_path), "a.png", None)
    assert remote.path == "s3://photos/day1/a.png"
