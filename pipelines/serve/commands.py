"""`sora generate` and `sora serve`.

    sora generate --model runs/demo/export --prompt "a red circle moving left" --out clip.mp4
    sora serve --model runs/demo/export [--port 8000] [--host 0.0.0.0] [--config cluster/serve/local.yaml]
    sora serve --model /shared/export --db postgresql://sora:PW@db:5432/sora --store s3://bucket/sora   # a cluster's
    sora serve --model exports/wan-1.3b --lora adapters/my-style   # a LoRA fine-tune, merged at load
    sora serve --hash-key KEY            # the sha256 digest to put under `api_keys:` in a Serve config
    RAY_ADDRESS=ray://head:10001 sora serve --model /shared/export    # onto an existing cluster

`sora serve` deploys the same application `serve run cluster/serve/local.yaml` does, blocks, and on
Ctrl-C removes it (and stops the local Ray it started).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

from pipelines import console

from . import generate as generate_module

DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"
APP_IMPORT_PREFIX = "pipelines.serve.app:"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="export folder to serve (overrides the config's args.model)")
    p.add_argument("--port", type=int, help=f"HTTP port (default: the config's http_options.port, else {DEFAULT_PORT})")
    p.add_argument("--host", help=f"HTTP host; 0.0.0.0 to listen on every interface (default {DEFAULT_HOST})")
    p.add_argument(
        "--config", help="a Serve config YAML (cluster/serve/NAME.yaml): its app args and deployment options"
    )
    p.add_argument(
        "--store", help="where videos live: a folder or fsspec URI such as s3://bucket/sora (overrides args.store)"
    )
    p.add_argument(
        "--db",
        help="where job state lives: sqlite:///PATH or postgresql://USER:PW@HOST/DB (default: SQLite beside the store)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), help="generator weights: int8 (CPU) or bf16 (GPU)")
    p.add_argument("--lora", help="a peft LoRA adapter folder merged into the model at load (overrides args.lora)")
    p.add_argument("--hash-key", metavar="KEY", help="print the sha256 digest of an API key for `api_keys:` and exit")
    console.add_arguments(p)


def read_serve_config(path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(app args, deployment overrides by name, http_options) of our application in a Serve config YAML,
    validated with Ray's own ServeDeploySchema so `sora serve` and `serve run` accept the same files."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from pipelines.cli import UserError

    if not os.path.isfile(path):
        raise UserError(f"--config '{path}' does not exist")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise UserError(f"--config '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"--config '{path}' is not a valid Serve config: {where}: {first['msg']}") from None
    apps = [a for a in schema.applications if a.import_path.startswith(APP_IMPORT_PREFIX)]
    if not apps:
        raise UserError(f"--config '{path}' has no application with import_path {APP_IMPORT_PREFIX}app_builder")
    app = apps[0]
    deployments = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
    http = schema.http_options.model_dump(exclude_unset=True)
    return dict(app.args), deployments, http


def run_serve(args: argparse.Namespace) -> int:
    from .config import hash_key

    if args.hash_key is not None:
        print(hash_key(args.hash_key))
        return 0
    settings, deployments, host, port = _settings_from_args(args)
    check_database(settings.db_url)
    return _serve_until_stopped(args, settings, deployments, host, port)


def _settings_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, dict[str, Any]], str, int]:
    """(settings, per-deployment options, host, port) from the flags over --config; every check before Ray starts."""
    from pipelines.cli import UserError
    from sora_model.config import ConfigError

    from .config import INGRESS_NAME, RUNTIME_KEYS, apply_user_config, check_exposure, load_settings

    app_args: dict[str, Any] = {}
    deployments: dict[str, dict[str, Any]] = {}
    http: dict[str, Any] = {}
    if args.config:
        app_args, deployments, http = read_serve_config(args.config)
    for key in ("model", "store", "db", "precision", "lora"):
        if getattr(args, key):
            app_args[key] = getattr(args, key)
    if not app_args.get("model"):
        raise UserError("--model is required (or args.model in --config)")
    from sora_model.export_io import CONFIG_FILE
    from sora_model.lora import ADAPTER_CONFIG

    if "://" not in app_args["model"] and not os.path.isfile(os.path.join(app_args["model"], CONFIG_FILE)):
        raise UserError(f"--model '{app_args['model']}' is not an export folder: {CONFIG_FILE} is missing")
    lora = app_args.get("lora")
    if lora and "://" not in lora and not os.path.isfile(os.path.join(lora, ADAPTER_CONFIG)):
        raise UserError(f"--lora '{lora}' is not a LoRA adapter folder: {ADAPTER_CONFIG} is missing")
    host = args.host or http.get("host") or DEFAULT_HOST
    port = args.port or http.get("port") or DEFAULT_PORT
    if args.host and "download_host" not in app_args and is_ip(host):
        app_args["download_host"] = host  # the file server listens where the API does
    try:
        settings = load_settings(app_args)
        ingress_config = deployments.get(INGRESS_NAME, {}).get("user_config")
        # Before Ray starts: beyond loopback with no keys (the ingress's user_config included) is one line.
        check_exposure(apply_user_config(settings, ingress_config, RUNTIME_KEYS) if ingress_config else settings, host)
    except ConfigError as err:
        raise UserError(str(err)) from None
    return settings, deployments, host, port


def _serve_until_stopped(
    args: argparse.Namespace, settings: Any, deployments: dict[str, dict[str, Any]], host: str, port: int
) -> int:
    """Deploy the app on a local or the given Ray, say where it listens, and serve until Ctrl-C or SIGTERM."""
    import ray
    from ray import serve

    from pipelines.data.runtime import ensure_ray

    from .app import build_app
    from .config import APP_NAME

    local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    console.start_for(args, "sora serve")  # Serve's request logs and replica output go to the log
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, deployments), name=APP_NAME, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    keys = (
        f"API keys on ({len(settings.keys)} keys, tiers: {', '.join(settings.tiers)})"
        if settings.keys
        else "API keys off"
    )
    console.say(
        f"sora serve: http://{shown}:{port}/v1 serving '{settings.model_name}' from {settings.model}; {keys}; store "
        f"{settings.store_uri}; db {_redacted(settings.db_url)}"
    )
    console.say("sora serve: Ctrl-C to stop")

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGTERM (a container or `kill`) stops as cleanly as Ctrl-C; SIGINT too when started in the background.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.error("sora serve: shutting down")
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
    return 0


def is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def check_database(url: str) -> None:
    """Connect once before deploying: a wrong URL or a server that is down is one line here, not replicas
    failing their health checks in a loop."""
    from sqlalchemy.exc import SQLAlchemyError

    from pipelines.cli import UserError

    from .db import JobDB

    try:
        JobDB(url).close()
    except (SQLAlchemyError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--db '{_redacted(url)}' cannot be used: {first}") from None


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given (it holds no usable password then)
        return url


def register(subparsers: Any) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="sample a clip from an export (MP4/GIF/NPZ)",
        description=generate_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate_module.add_arguments(gen)
    gen.set_defaults(func=generate_module.run)
    srv = subparsers.add_parser(
        "serve",
        help="serve an export over HTTP (OpenAI Videos API) with Ray Serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(srv)
    srv.set_defaults(func=run_serve)
