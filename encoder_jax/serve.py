"""`python -m encoder_jax.serve PATH`: an exported artifact (or a run's workdir) over HTTP.

FastAPI + uvicorn; OpenAPI docs at /docs. Endpoints, by what the artifact holds:
  POST /v1/classify   {"texts": ["...", ["title", "body"], ...], "top_k": 3}
  POST /v1/embed      {"texts": [...], "pooling": "cls" | "mean", "normalize": false}
  POST /v1/fill-mask  {"texts": ["Paris is the [MASK] of France."], "top_k": 5}
  GET  /health (the process is up), /ready (warm-up compiled every shape), /metrics (Prometheus)

Requests are split into rows and batched across requests (`batcher.DynamicBatcher`); every
batch is padded to one of a few row counts and token lengths compiled at start-up, so no
request compiles. Bad requests get a 4xx JSON error naming the field; a full queue gets 429.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Sequence

from encoder_jax import errors
from encoder_jax import artifact as artifact_lib
from encoder_jax.serve_engine import ServeConfig

log = logging.getLogger("encoder_jax.serve")


def resolve_artifact(path: str) -> str:
    """An artifact directory as given, or a run's workdir: its export/ (exported now if absent)."""
    if artifact_lib.is_artifact(path):
        return path
    from encoder_jax import export

    exported = os.path.join(path, export.EXPORT_DIR)
    if artifact_lib.is_artifact(exported):
        return exported
    if not os.path.isdir(path):
        raise errors.MissingFileError(f"{path!r} does not exist")
    log.info("%s is a workdir without an export: exporting it to %s", path, exported)
    return export.export_run(None, path)


def parse_args(argv: Sequence[str] | None) -> tuple[str, ServeConfig, str]:
    parser = argparse.ArgumentParser(
        prog="python -m encoder_jax.serve", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("path", help="an artifact directory (--mode export) or a run's workdir")
    helps = {"host": "interface to bind (0.0.0.0 exposes the server to the network)",
             "port": "TCP port", "max_batch": "rows per model call",
             "max_wait_ms": "how long the first row of a batch waits for others",
             "max_queue": "rows waiting at most; requests beyond get 429",
             "batch_sizes": "padded row counts compiled at start (comma-separated; default "
                            "powers of 2 up to --max_batch)",
             "lengths": "padded token lengths compiled at start (default: the export's)",
             "max_texts": "texts per request", "max_chars": "characters per text",
             "max_body_bytes": "request body size", "max_masks": "[MASK]s per fill-mask text"}
    for field in dataclasses.fields(ServeConfig):
        if field.name == "truncate":
            continue
        kind = int if field.type in ("int", "tuple[int, ...]") else (float if field.type == "float" else str)
        parse = (lambda s: tuple(int(x) for x in s.split(",") if x)) if field.type.startswith("tuple") else kind
        parser.add_argument(f"--{field.name}", type=parse, default=field.default, help=helps[field.name])
    parser.add_argument("--no_truncate", action="store_true",
                        help="refuse texts longer than the model's max_len instead of cutting them")
    parser.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
    args = vars(parser.parse_args(argv))
    path, level = args.pop("path"), args.pop("log_level")
    args["truncate"] = not args.pop("no_truncate")
    return path, ServeConfig(**args), level


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from encoder_jax.serve_app import build_app  # fastapi only when serving

    path, cfg, level = parse_args(argv)
    handler = logging.StreamHandler()  # our own: absl may already own the root logger's
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    package_log = logging.getLogger("encoder_jax")
    package_log.addHandler(handler)
    package_log.setLevel(getattr(logging, level.upper()))
    package_log.propagate = False
    try:
        loaded = artifact_lib.load_artifact(resolve_artifact(path))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    app = build_app(loaded, cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=level, timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
