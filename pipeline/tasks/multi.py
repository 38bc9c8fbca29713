"""Requests about several images: reference images, groups, and which image an object is in.

The wording lives here once, so the requests, the parser and the local server agree:

- A request that carries reference images or a group gives every image a caption, a text part
  sent right before it (`ImagePart.caption`; the order on the wire is in pipeline/gemini/): the
  references first, in the configured order, as "Reference image 1: <caption>." ...; then the
  images to analyse as "Image 0:", "Image 1:", ... in the group's order. A lone image without
  references has no caption: its request is exactly the single-image request.
- With references, the system instruction says they are examples only, never to be reported.
- A group's prompt says the images are numbered from 0 and, for the tasks that locate things
  (detect, segment, point), asks for the key "image" (the number of the image an object is in)
  in every object; their built-in schemas require it.
- The parser (`image_index`) takes an object's "image" as an integer from 0 to the group's size
  - 1; a group of one may leave it out (0). Anything else skips the object, with the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

IMAGE_KEY = "image"


def reference_caption(number: int, caption: str | None) -> str:
    """The text before reference image `number` (1-based, as people count examples)."""
    return f"Reference image {number}: {caption}" if caption else f"Reference image {number}."


def target_caption(index: int) -> str:
    """The text before the image to analyse at `index` (0-based, as the answer's "image")."""
    return f"Image {index}:"


def captioned(grouped: bool, references: int) -> bool:
    """Whether the images to analyse get captions: when they are not alone in the request."""
    return grouped or references > 0


def reference_rule(count: int) -> str | None:
    """The system-instruction line about the reference images, if there are any."""
    if count == 0:
        return None
    which = (
        '"Reference image 1" is an example'
        if count == 1
        else f'"Reference image 1" to "Reference image {count}" are examples'
    )
    return (
        f"The images captioned {which} of what is meant, given for comparison only: "
        'never describe or report anything in them. Only the images captioned "Image 0", '
        '"Image 1" and so on are to be analysed.'
    )


def group_prompt(prompt: str, *, locate: bool) -> str:
    """A group's prompt: the user's question, then how the images are numbered and, when
    objects are located, the "image" key each of them must carry."""
    text = (
        f"{prompt.rstrip()}\n\nThe images to analyse are captioned "
        '"Image 0", "Image 1" and so on, in the order given.'
    )
    if locate:
        text += (
            f' Give every entry the key "{IMAGE_KEY}": the number of the image it is in '
            "(0 for the first image)."
        )
    return text


def with_image_key(schema: dict[str, Any]) -> dict[str, Any]:
    """A list-of-objects schema (OpenAPI subset) whose objects also require an integer "image";
    the list may sit under {"boxes": ...} (the segmentation schema of 3.6+)."""
    schema = copy.deepcopy(schema)
    listed = schema.get("properties", {}).get("boxes", schema)
    items = listed.get("items")
    if isinstance(items, dict) and isinstance(items.get("properties"), dict):
        items["properties"][IMAGE_KEY] = {"type": "INTEGER"}
        items["required"] = [*items.get("required", []), IMAGE_KEY]
    return schema


def image_index(item: dict[str, Any], sizes: Sequence[tuple[int, int]]) -> int:
    """The member an answer's object is in (see the module docstring); ValueError why not."""
    value = item.get(IMAGE_KEY)
    if value is None:
        if len(sizes) == 1:
            return 0
        raise ValueError(f'no "{IMAGE_KEY}" index (the request had {len(sizes)} images)')
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise ValueError(f'"{IMAGE_KEY}" {value!r:.40} is not an image number')
    if not 0 <= value < len(sizes):
        last = len(sizes) - 1
        raise ValueError(f'"{IMAGE_KEY}" {int(value)} is not one of the images 0-{last}')
    return int(value)
