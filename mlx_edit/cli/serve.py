"""`mlx-edit serve`: keep the models loaded behind an HTTP API (mlx_edit.serve) and the
web page at `/`. Needs `pip install 'mlx-edit[serve]'` (FastAPI, uvicorn)."""

from __future__ import annotations

import errno
import logging
import re
import socket

import click

from mlx_edit.cli.errors import OneLineCommand
from mlx_edit.cli.prompt_cache import prompt_cache_options  # shared with the edit commands
from mlx_edit.serve.config import MB, ServeConfig, is_loopback


class RedactToken(logging.Filter):
    """Access-log lines with `token=...` query values masked (EventSource and image
    links carry the token in the URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(re.sub(r"token=[^&\s]*", "token=***", a)
                                if isinstance(a, str) else a for a in record.args)
        return True


@click.command("serve", cls=OneLineCommand)
@click.option("--model", "-m", default=None, show_default="black-forest-labs/FLUX.1-Fill-dev",
              help="FLUX.1 Fill repo id, diffusers folder or mlx-edit folder (none when "
                   "--klein-model is given alone).")
@click.option("--kontext-model", default=None,
              help="Also keep FLUX.1 Kontext loaded (the `edit` mode).")
@click.option("--klein-model", default=None,
              help="Also keep FLUX.2 [klein] loaded: instruction edits with reference "
                   "images, inpainting with an optional reference, text-to-image. Alone "
                   "(no --model): klein only.")
@click.option("--segment-model", default=None,
              help="SAM 2.1 checkpoint for masks from clicks/boxes (default: the model "
                   "folder's segmenter/, else clicks are refused).")
@click.option("--text-segment-model", default=None,
              help="SAM 3 checkpoint for masks from words (default: the model folder's "
                   "text-segmenter/, else text masks are refused).")
@click.option("--quantize", "-q", type=click.Choice(["4", "8"]), default=None,
              help="Quantize the transformers at load (bits).")
@click.option("--low-memory", is_flag=True, help="Load one model at a time per edit.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --token.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--token", envvar="MLX_EDIT_TOKEN", default=None,
              help="Require `Authorization: Bearer TOKEN` (or env MLX_EDIT_TOKEN).")
@click.option("--max-queue", type=click.IntRange(1), default=16, show_default=True,
              help="Jobs waiting before new ones get 429.")
@click.option("--max-upload-mb", type=click.IntRange(1), default=50, show_default=True,
              help="Largest request body (MB).")
@click.option("--max-images", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Largest num_images per job.")
@click.option("--max-resident-gb", type=click.FloatRange(0, min_open=True), default=None,
              help="Evict the least recently used models beyond this estimate (GB) "
                   "[default: no bound].")
@click.option("--preview-every", type=click.IntRange(0), default=1, show_default=True,
              help="A JPEG preview in every N-th step event (0: none).")
@prompt_cache_options
def serve_command(model, kontext_model, klein_model, segment_model, text_segment_model,
                  quantize, low_memory, host, port, token, max_queue, max_upload_mb,
                  max_images, max_resident_gb, preview_every, prompt_cache,
                  prompt_cache_gb, no_prompt_cache):
    """Serve edits over HTTP with the models kept loaded (API docs at /docs)."""
    if token is not None and not token.strip():
        raise click.UsageError("--token (or MLX_EDIT_TOKEN) is blank: give a non-empty "
                               "token, or leave it unset on a loopback --host")
    if not is_loopback(host) and not token:
        raise click.UsageError(f"--host {host} accepts connections from other machines: "
                               "set --token (or MLX_EDIT_TOKEN) too")
    sock = bind(host, port)  # before any model loads: a busy port fails in one line
    try:
        import uvicorn

        from mlx_edit.serve.app import create_app
    except ImportError as e:
        raise click.UsageError(f"serve needs {e.name}: pip install 'mlx-edit[serve]'") \
            from None
    config = ServeConfig(model=model, kontext_model=kontext_model, klein_model=klein_model,
                         segment_model=segment_model,
                         text_segment_model=text_segment_model,
                         quantize=int(quantize) if quantize else None,
                         low_memory=low_memory, token=token, max_queue=max_queue,
                         max_upload_bytes=max_upload_mb * MB, max_images=max_images,
                         max_resident_gb=max_resident_gb, preview_every=preview_every,
                         prompt_cache=None if no_prompt_cache else str(prompt_cache),
                         prompt_cache_gb=prompt_cache_gb)
    try:
        app = create_app(config)
    except BaseException:
        sock.close()
        raise
    logging.getLogger("uvicorn.access").addFilter(RedactToken())
    click.echo(f"mlx-edit serving on http://{host}:{port}/ (API docs: /docs)", err=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 for an IPv6 address), for uvicorn.
    Raises click.UsageError (one line, exit 2) when the port is busy, the address is not
    this machine's, or the name does not resolve."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise click.UsageError(f"--host {host}: cannot resolve it ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = "the port is in use (another server?): choose another --port" \
            if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise click.UsageError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock
