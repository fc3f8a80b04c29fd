"""The lazy-loading reader: ImageFS, chunk fetching, FUSE and container start."""

from .fetcher import ChunkFetcher, FetchStats
from .imagefs import FSError, ImageFS, LazyFile, Stat

__all__ = ["ImageFS", "LazyFile", "Stat", "FSError", "ChunkFetcher", "FetchStats"]
