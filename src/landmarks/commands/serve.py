"""``landmarks serve --index INDEX``: recognition over HTTP with a page to try it.

Loads the model and the index once (``Recognizer.load``), then serves until SIGINT/SIGTERM, letting
in-flight requests finish. Adding images over HTTP needs a bearer token: ``--token`` or, better (a
command line is visible to other users), the environment variable ``LANDMARKS_SERVE_TOKEN``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from landmarks.errors import LandmarksError

if TYPE_CHECKING:
    from landmarks.serve import ServeConfig

log = logging.getLogger("landmarks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``landmarks serve``."""
    from landmarks.serve import TOKEN_ENV, ServeConfig, default_workers

    d = ServeConfig()
    parser.add_argument(
        "--index", required=True, metavar="INDEX", help="index folder built by `landmarks index`"
    )
    parser.add_argument(
        "--host", default=d.host, help=f"interface to listen on (default {d.host}; 0.0.0.0 for all)"
    )
    parser.add_argument(
        "--port", type=int, default=d.port, help=f"TCP port (default {d.port}; 0 picks a free one)"
    )
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="recognition threads (default %(default)s)"
    )
    parser.add_argument(
        "--queue",
        type=int,
        default=d.queue_size,
        help="requests that may wait for a worker before 503 (default %(default)s)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=d.max_upload_mb,
        help="largest photo upload in MiB; larger is 413 (default %(default)s)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help="largest image in pixels (width x height); larger is 400 (default %(default)s)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=d.timeout_s,
        help="per-request time limit in seconds; longer is 504 (default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"bearer token enabling POST /v1/index/images (default: ${TOKEN_ENV}; none: off)",
    )
    parser.add_argument(
        "--upload-dir", default=None, help="where images added over HTTP are stored (default INDEX/uploads)"
    )
    parser.add_argument(
        "--rerank",
        choices=["none", "local"],
        default=d.rerank,
        help="re-rank the shortlist with local features and RANSAC (needs an index with "
        "local features; default %(default)s)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="below this confidence the answer is 'no landmark' (default: the threshold calibrated "
        "by `landmarks index` when the index has a non-landmark set, else always answer)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    g = parser.add_argument_group("connection limits (slow or hostile clients)")
    g.add_argument(
        "--header-timeout-s",
        type=float,
        default=d.header_timeout_s,
        help="a connection must send its request headers within this, else it is closed (default %(default)s)",
    )
    g.add_argument(
        "--body-timeout-s",
        type=float,
        default=d.body_timeout_s,
        help="a request body must arrive within this, else 408 (default %(default)s)",
    )
    g.add_argument(
        "--keep-alive-s",
        type=float,
        default=d.keep_alive_s,
        help="idle keep-alive connections are closed after this (default %(default)s)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="open connections at most; more are closed at once (default %(default)s)",
    )
    g.add_argument(
        "--max-inflight-upload-mb",
        type=float,
        default=d.max_inflight_upload_mb,
        help="request bodies held in memory at once, all requests together; beyond: 503 "
        "(default %(default)s)",
    )
    g.add_argument(
        "--decode-processes",
        type=int,
        default=None,
        help="processes decoding uploads, killed when a request times out (default: workers + 2; "
        "0: decode in the worker threads)",
    )
    g.add_argument(
        "--max-jpeg-scans",
        type=int,
        default=d.max_jpeg_scans,
        help="JPEGs with more scans are refused (progressive-decoding bombs; default %(default)s)",
    )


def build_config(args: argparse.Namespace) -> ServeConfig:
    """The :class:`~landmarks.serve.ServeConfig` for parsed arguments (token from the env when not given)."""
    from landmarks.serve import TOKEN_ENV, ServeConfig

    token = args.token or os.environ.get(TOKEN_ENV) or None
    index_dir = Path(args.index)
    if args.workers < 1:
        raise LandmarksError(f"--workers must be at least 1, got {args.workers}")
    if args.queue < 0:
        raise LandmarksError(f"--queue must be 0 or more, got {args.queue}")
    if args.max_upload_mb <= 0 or args.timeout_s <= 0 or args.max_pixels <= 0:
        raise LandmarksError("--max-upload-mb, --max-pixels and --timeout-s must be positive")
    if not 0 <= args.port <= 65535:
        raise LandmarksError(f"--port must be in 0..65535, got {args.port}")
    if min(args.header_timeout_s, args.body_timeout_s, args.keep_alive_s, args.max_inflight_upload_mb) <= 0:
        raise LandmarksError(
            "--header-timeout-s, --body-timeout-s, --keep-alive-s and --max-inflight-upload-mb "
            "must be positive"
        )
    if args.max_connections < 1 or args.max_jpeg_scans < 1:
        raise LandmarksError("--max-connections and --max-jpeg-scans must be at least 1")
    if args.decode_processes is not None and args.decode_processes < 0:
        raise LandmarksError(f"--decode-processes must be 0 or more, got {args.decode_processes}")
    return ServeConfig(
        host=args.host,
        port=args.port,
        workers=args.workers,
        queue_size=args.queue,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        timeout_s=args.timeout_s,
        token=token,
        upload_dir=str(Path(args.upload_dir) if args.upload_dir else index_dir / "uploads"),
        index_dir=str(index_dir),
        rerank=args.rerank,
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        keep_alive_s=args.keep_alive_s,
        max_connections=args.max_connections,
        max_inflight_upload_mb=args.max_inflight_upload_mb,
        decode_processes=args.decode_processes,
        max_jpeg_scans=args.max_jpeg_scans,
    )


def run(args: argparse.Namespace) -> int:
    """Load the recognizer, serve until interrupted. Returns 0 after a clean shutdown."""
    index_dir = Path(args.index)
    if not index_dir.is_dir():
        raise LandmarksError(f"index folder {index_dir} does not exist (build one with `landmarks index`)")
    conf = build_config(args)

    from landmarks.serve import bind_socket, serve

    sock = bind_socket(conf.host, conf.port)  # fail fast when the port is taken, before the model loads
    try:
        import torch

        from landmarks.recognize import RecognizeConfig, Recognizer

        # Each worker runs its own forward pass: share the cores between them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // conf.workers))
        rconf = RecognizeConfig(rerank=conf.rerank, threshold=args.threshold)
        log.info("loading %s", index_dir)
        recognizer = Recognizer.load(index_dir, conf=rconf, device=args.device)
        if conf.token is None:
            log.info("adding images over HTTP is off (no --token / $LANDMARKS_SERVE_TOKEN)")
        serve(recognizer, conf, sock)
    finally:
        sock.close()
    return 0
