"""The experiment's images: a seeded sample of N drawn from the config's own input walk, kept
as a manifest in the tune folder so a rerun (after a kill, or to add a setting) asks about the
very same images, whatever has been added to the input since.

The manifest is a Parquet file with `image_root` and `image_path` columns (the layout
`read_manifest` takes from a pipeline output), so every run over it names its rows as a run
over the whole input would, and `compare` joins them image by image. A URL or an object is
listed whole, as its own name. The draw is a reservoir over the walk (one pass, N entries
held), seeded, then put back in walk order.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, ConfigError
from pipeline.inputs.source import work_units
from pipeline.locations import is_url
from pipeline.output.stores import Store
from pipeline.records import SourceFile

SAMPLE = "sample.parquet"
META = b"pipeline.tune.sample"  # the draw's seed and size, kept with the list they made


@dataclass(frozen=True, slots=True)
class Sample:
    manifest: str  # where the runs read it (a path, or a bucket URL)
    seed: int
    size: int  # asked for
    images: int  # drawn: fewer when the input holds fewer usable files


def sample_of(config: Config, store: Store, size: int, seed: int) -> Sample:
    """The tune folder's sample: the one drawn before (it must be the same draw), or a new one."""
    if size <= 0:
        raise ConfigError(f"--sample must be a number of images above 0, got {size}")
    if config.input.group_by != "none":
        raise ConfigError(
            f"{config.source}: [input] group_by: tune samples single images; tune a config "
            'with group_by = "none"'
        )
    kept = _kept(store, size, seed)
    if kept is not None:
        return kept
    drawn = draw(config, size, seed)
    if not drawn:
        raise ConfigError(f"{config.source}: [input] holds no usable image to sample")
    store.replace(SAMPLE, _manifest_bytes(drawn, size, seed))
    return Sample(store.join(SAMPLE), seed, size, len(drawn))


def draw(config: Config, size: int, seed: int) -> list[SourceFile]:
    """`size` usable files of the walk (error entries are not worth a comparison), chosen
    with `seed`, in walk order."""
    rng = random.Random(seed)
    chosen: list[tuple[int, SourceFile]] = []
    walk = work_units(config.input, skip=(config.output.dir,))
    usable = (work for work in walk if isinstance(work, SourceFile) and work.error is None)
    for seen, source in enumerate(usable):
        if len(chosen) < size:
            chosen.append((seen, source))
        elif (slot := rng.randrange(seen + 1)) < size:
            chosen[slot] = (seen, source)
    return [source for _, source in sorted(chosen, key=lambda pair: pair[0])]


def _manifest_bytes(sources: list[SourceFile], size: int, seed: int) -> bytes:
    remote = [is_url(source.path) for source in sources]
    table = pa.table(
        {
            "image_root": [None if far else s.root for s, far in zip(sources, remote, strict=True)],
            "image_path": [
                s.path if far else s.rel_path for s, far in zip(sources, remote, strict=True)
            ],
        },
        schema=pa.schema([("image_root", pa.string()), ("image_path", pa.string())]),
    )
    table = table.replace_schema_metadata({META: json.dumps({"seed": seed, "size": size})})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _kept(store: Store, size: int, seed: int) -> Sample | None:
    """The sample drawn before, when there is one; a different draw asked of it is refused
    (the outputs beside it answer its images)."""
    if store.info(SAMPLE) is None:
        return None
    table = pq.read_table(io.BytesIO(store.read(SAMPLE)))
    drawn = json.loads((table.schema.metadata or {}).get(META, b"{}"))
    if drawn.get("seed") != seed or drawn.get("size") != size:
        raise ConfigError(
            f"{store.join(SAMPLE)} holds a sample of {drawn.get('size')} drawn with seed "
            f"{drawn.get('seed')}, not --sample {size} --seed {seed}: run with those, or remove "
            f"{store.url} to start another experiment"
        )
    return Sample(store.join(SAMPLE), seed, size, table.num_rows)
