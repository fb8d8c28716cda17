"""Prompts become file and run names only through `slugify`: never a raw prompt in a path."""

from __future__ import annotations

import hashlib
import re
import unicodedata


def slugify(text: str, max_len: int = 48) -> str:
    """'A Red Cube, front view!' -> 'a-red-cube-front-view'. Non-ASCII, '/', '..' cannot survive.

    Long or empty results get a short hash of the full text, so distinct prompts stay distinct.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if not slug or len(slug) > max_len or slug != re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-"):
        digest = hashlib.sha256(text.encode()).hexdigest()[:6]
        slug = f"{slug[: max_len - 7].rstrip('-')}-{digest}" if slug else f"prompt-{digest}"
    return slug
