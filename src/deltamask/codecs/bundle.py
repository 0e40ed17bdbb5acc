"""Bundles: one message as back-to-back codec containers (a mask payload and a head, theta and a head, ...).
Each container is self-delimiting (:func:`~deltamask.codecs.container.split_containers`) and names its codec,
so a receiver finds each part by its kind."""

from __future__ import annotations

from .base import codec_of
from .container import CodecError, split_containers

__all__ = ["join_bundle", "split_bundle", "parts_by_kind"]


def join_bundle(parts: list[bytes]) -> bytes:
    return b"".join(parts)


def split_bundle(data: bytes) -> list[bytes]:
    """Split back-to-back containers; a truncated or malformed bundle raises CodecError."""
    return split_containers(data, "bundle")


def parts_by_kind(data: bytes) -> dict[str, bytes]:
    parts: dict[str, bytes] = {}
    for p in split_bundle(data):
        kind = codec_of(p).kind
        if kind in parts:
            raise CodecError(f"bundle holds two {kind} payloads")
        parts[kind] = p
    return parts
