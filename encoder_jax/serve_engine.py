"""The serving engine: server options, request checks, and the artifact behind the batcher."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Sequence

import numpy as np

from encoder_jax import artifact as artifact_lib
from encoder_jax.batcher import DynamicBatcher, QueueFull
from encoder_jax.serve_metrics import Metrics

log = logging.getLogger("encoder_jax.serve")
CALL_OVERHEAD_TOKENS = 512  # what one more model call costs, in padded tokens (about 1 ms on a CPU)
ENDPOINTS = {"classify": "/v1/classify", "embed": "/v1/embed", "fill_mask": "/v1/fill-mask",
             "translate": "/v1/translate"}


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Server options (each is a `--flag` of the CLI)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64  # rows per model call
    max_wait_ms: float = 0.0  # how long a batch may wait to fill (0: run what is queued when free)
    max_queue: int = 1024  # rows waiting; more -> 429
    batch_sizes: tuple[int, ...] = ()  # padded row counts compiled at start; () -> powers of 2
    lengths: tuple[int, ...] = ()  # padded token lengths compiled at start; () -> the card's
    max_texts: int = 64  # texts per request
    max_chars: int = 10_000  # characters per text
    max_body_bytes: int = 1 << 20
    truncate: bool = True  # texts over the model's max_len: cut (and say so) or refuse
    max_masks: int = 8  # [MASK]s per fill-mask text

    def row_counts(self) -> tuple[int, ...]:
        counts = self.batch_sizes or tuple(2 ** i for i in range(self.max_batch.bit_length())
                                           if 2 ** i < self.max_batch)
        return tuple(sorted({n for n in counts if n < self.max_batch} | {self.max_batch}))


class RequestError(ValueError):
    """A request the server refuses: HTTP status, the field at fault, a one-line message."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field = status, field


class Engine:
    """The artifact behind the batcher: pads rows to compiled shapes, runs, splits results."""

    def __init__(self, loaded: artifact_lib.Artifact, cfg: ServeConfig, metrics: Metrics):
        self.artifact, self.cfg, self.metrics = loaded, cfg, metrics
        self.row_counts = cfg.row_counts()
        lengths = [n for n in (cfg.lengths or loaded.pad_lengths) if n < loaded.max_len]
        self.lengths = tuple(sorted(set(lengths) | {loaded.max_len}))
        self.ready = threading.Event()
        self.batcher = DynamicBatcher(self.run_batch, max_batch=cfg.max_batch,
                                      max_wait_s=cfg.max_wait_ms / 1000, max_queue=cfg.max_queue,
                                      on_batch=metrics.observe_batch)
        metrics.queue_rows.set_function(lambda: self.batcher.depth)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.artifact.functions)

    def shape_for(self, rows: Sequence[artifact_lib.Row]) -> tuple[int, int]:
        num_rows = next(n for n in self.row_counts if n >= len(rows))
        longest = max(len(row.ids) for row in rows)
        return num_rows, next(n for n in self.lengths if n >= longest)

    def padded_cost(self, rows: Sequence[artifact_lib.Row]) -> int:
        """Tokens a call on `rows` computes, padding included, plus a per-call overhead."""
        num_rows, length = self.shape_for(rows)
        return num_rows * length + CALL_OVERHEAD_TOKENS

    def length_groups(self, rows: Sequence[artifact_lib.Row]) -> list[list[int]]:
        """Row indices split into calls by padded length, shortest first; a group is merged
        into the next longer one when one call on both computes less than two calls."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
        groups: list[list[int]] = []
        for i in order:
            if groups and self.shape_for([rows[groups[-1][-1]]])[1] == self.shape_for([rows[i]])[1]:
                groups[-1].append(i)
            else:
                groups.append([i])
        merged: list[list[int]] = []
        for group in groups:
            if merged:
                both = merged[-1] + group
                pick = lambda idx: [rows[j] for j in idx]
                if self.padded_cost(pick(both)) <= (self.padded_cost(pick(merged[-1]))
                                                    + self.padded_cost(pick(group))):
                    merged[-1] = both
                    continue
            merged.append(group)
        return merged

    def run_batch(self, kind: str, rows: Sequence[artifact_lib.Row]) -> list[Any]:
        """One batch of the batcher: calls per length group, each answer back in its row's place."""
        results: list[Any] = [None] * len(rows)
        for group in self.length_groups(rows):
            picked = [rows[i] for i in group]
            num_rows, length = self.shape_for(picked)
            out = self.artifact.run(kind, picked, num_rows, length,
                                    self.cfg.max_masks if kind == "fill_mask" else 0)
            for r, i in enumerate(group):
                results[i] = {k: v[r] for k, v in out.items()} if isinstance(out, dict) else out[r]
        return results

    def warm_up(self) -> None:
        """Compiles every (kind, rows, length) the server can run; then marks it ready."""
        start, before = time.monotonic(), self.metrics.compilations()
        for kind in self.kinds:
            for length in self.lengths:
                row = artifact_lib.Row(np.zeros(length, np.int32), np.zeros(length, np.int32),
                                       np.zeros(1, np.int32))
                for num_rows in self.row_counts:
                    self.artifact.run(kind, [row], num_rows, length,
                                      self.cfg.max_masks if kind == "fill_mask" else 0)
        log.info("warm-up: %d shapes of %s in %.1f s (%d compilations)",
                 len(self.kinds) * len(self.lengths) * len(self.row_counts), list(self.kinds),
                 time.monotonic() - start, self.metrics.compilations() - before)
        self.batcher.start()
        self.metrics.ready.set(1)
        self.ready.set()

    def _encode_one(self, kind: str, parts: list[str]) -> artifact_lib.Row:
        if kind == "fill_mask":
            return self.artifact.encode_masked(parts[0])
        if kind == "translate":
            return self.artifact.encode_source(parts[0])
        return self.artifact.encode(parts)

    def encode(self, texts: Sequence[Any], kind: str) -> list[artifact_lib.Row]:
        """Request texts -> rows, checking each against the limits (errors name texts.i)."""
        rows = []
        for i, text in enumerate(texts):
            parts = [text] if isinstance(text, str) else list(text)
            if not parts or sum(len(p) for p in parts) > self.cfg.max_chars:
                raise RequestError(422, f"texts.{i}", f"texts.{i}: needs one or more fields and at "
                                   f"most {self.cfg.max_chars} characters (--max_chars), got "
                                   f"{len(parts)} fields, {sum(len(p) for p in parts)} characters")
            try:
                row = self._encode_one(kind, parts)
            except artifact_lib.InputError as e:
                raise RequestError(422, f"texts.{i}", str(e).replace("texts:", f"texts.{i}:")) from None
            if kind == "fill_mask" and len(row.positions) > self.cfg.max_masks:
                raise RequestError(422, f"texts.{i}", f"texts.{i}: {len(row.positions)} "
                                   f"{artifact_lib.MASK_TOKEN}s; this server takes at most "
                                   f"{self.cfg.max_masks} (--max_masks)")
            if row.truncated and not self.cfg.truncate:
                raise RequestError(422, f"texts.{i}", f"texts.{i}: longer than the model's "
                                   f"{self.artifact.max_len} tokens (the server runs with --no_truncate)")
            rows.append(row)
        return rows

    async def infer(self, kind: str, texts: Sequence[Any]) -> tuple[list[artifact_lib.Row], list[Any]]:
        if not self.ready.is_set():
            raise RequestError(503, "", "warming up: not ready yet (see /ready)")
        if not texts or len(texts) > self.cfg.max_texts:
            raise RequestError(422, "texts", f"texts: needs 1 to {self.cfg.max_texts} items, "
                               f"got {len(texts)}")
        rows = self.encode(texts, kind)
        try:
            return rows, await self.batcher.run(kind, rows)
        except QueueFull as e:
            raise RequestError(429, "", str(e)) from None
