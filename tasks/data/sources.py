"""Where a catalog's images come from, and the decode step that runs on every core.

A source is a directory or s3:// prefix of image files, or one Parquet file of image
bytes. Each image has a key (relative to the source) and a cheap identity from its
listing (an S3 ETag; for a local file size, mtime, inode and ctime, as git's index
keeps them); its content id is what its bytes are: ``etag:<ETag>`` on S3, the SHA-256
of the bytes otherwise, hashed only for a local file whose identity is new.

``decode_chunk`` is the unit of work of a process pool: it imports neither Prefect nor
TensorFlow, opens the source once per process and returns small PNGs, so the parent
holds a bounded window of results.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass

import pyarrow.parquet as pq

from tasks.data.images import ImageRejected, encode_png_rgb, to_rgb
from tasks.store.lake import is_image_key
from tasks.store.storage import Store, open_store


class CatalogError(ValueError):
    """The catalog's inputs cannot be used; the one-line message says why (nothing written)."""


@dataclass(frozen=True)
class ImageSource:
    """A directory or s3:// prefix of image files, or one Parquet file of image bytes."""

    uri: str
    store: Store
    parquet: str | None = None  # the key of the Parquet file in ``store``

    @property
    def hashes_content(self) -> bool:
        """Whether a content id needs the bytes (not on S3, whose ETag stands for them)."""
        return self.parquet is not None or not self.store.uri.startswith("s3://")

    def listing(self) -> dict[str, str]:
        """image key -> identity: the S3 ETag, a local file's stat identity, or the
        SHA-256 of a Parquet row's bytes."""
        if self.parquet is not None:
            return {i: hashlib.sha256(b).hexdigest() for i, b in self.rows.items()}
        return {o.key: o.etag for o in self.store.list() if is_image_key(o.key)}

    def has_images(self) -> bool:
        """Whether the source holds at least one image file, from the start of its listing
        (on S3, up to the first page that has one); a Parquet source: whether it is there."""
        if self.parquet is not None:
            return self.store.exists(self.parquet)
        return any(is_image_key(o.key) for o in self.store.list())

    def content_id(self, identity: str) -> str | None:
        """The content id that a listing identity alone gives (None: hash the bytes)."""
        if self.parquet is not None:
            return identity
        if self.store.uri.startswith("s3://"):
            return "etag:" + identity.strip('"')
        return None

    @functools.cached_property
    def rows(self) -> dict[str, bytes]:
        """A Parquet source's images by id, read and parsed once."""
        try:
            table = pq.read_table(io.BytesIO(self.store.get_bytes(self.parquet)))
        except Exception as err:
            raise CatalogError(f"{self.uri}: unreadable Parquet ({err})") from None
        if "image" not in table.column_names:
            raise CatalogError(f"{self.uri}: no 'image' column of image bytes")
        images = table["image"].to_pylist()
        ids = (table["image_id"].to_pylist() if "image_id" in table.column_names
               else [str(i) for i in range(len(images))])  # fmt: skip
        return {str(i): b or b"" for i, b in zip(ids, images, strict=True)}

    def get(self, key: str) -> bytes:
        return self.rows[key] if self.parquet is not None else self.store.get_bytes(key)


def parent_of(uri: str) -> tuple[Store, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_store(parent or "."), name


def open_source(uri: str) -> ImageSource:
    if uri.lower().endswith(".parquet"):
        store, name = parent_of(uri)
        return ImageSource(uri, store, name)
    return ImageSource(uri, open_store(uri.rstrip("/")))


@functools.cache
def _source(uri: str) -> ImageSource:
    return open_source(uri)  # once per process: a Parquet source is parsed once


def decode_one(data: bytes) -> tuple[bytes | None, str | None]:
    """(normalised RGB PNG, None), or (None, why it was rejected): one bad file is one
    rejection, never a crash."""
    try:
        return encode_png_rgb(to_rgb(data)), None
    except ImageRejected as err:
        return None, str(err)
    except Exception as err:  # whatever a decoder raises
        return None, f"undecodable: {type(err).__name__}: {err}"


def decode_chunk(
    uri: str, keys: list[str], content_ids: list[str | None]
) -> list[tuple[str, str | None, bytes | None, str | None]]:
    """(key, content id, PNG or None, reason or None) per key; a missing content id is
    the SHA-256 of the bytes read (None for a file that vanished)."""
    source = _source(uri)
    out = []
    for key, cid in zip(keys, content_ids, strict=True):
        try:
            data = source.get(key)
        except FileNotFoundError:
            out.append((key, None, None, "vanished while the catalog was read"))
            continue
        cid = cid or hashlib.sha256(data).hexdigest()
        out.append((key, cid, *decode_one(data)))
    return out
