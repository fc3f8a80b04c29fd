"""The lazy-loading reader: ImageFS, chunk fetching and the FUSE mount (the engines over it: convstore.engines)."""

from .fetcher import ChunkFetcher, FetchStats
from .imagefs import FSError, ImageFS, LazyFile, Stat

__all__ = ["ImageFS", "LazyFile", "Stat", "FSError", "ChunkFetcher", "FetchStats"]
