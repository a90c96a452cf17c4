"""An S3-compatible server for the data tests that read and write object storage through Ray's workers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import free_port


@contextmanager
def s3_and_ray(bucket: str, server_class: Any = None) -> Iterator[tuple[Any, Any]]:
    """(s3fs filesystem, server): moto's S3 in server mode on a loopback port (or `server_class`, a wrapped one)
    with `bucket` made, its endpoint and moto's dummy credentials in this process's environment and in Ray's
    workers' (a local Ray of 2 CPUs, started here and shut down after)."""
    import ray
    import s3fs

    if server_class is None:
        from moto.server import ThreadedMotoServer as server_class
    port = free_port()
    server = server_class(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses filesystems made for an earlier module's server
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        fs.mkdir(bucket)
        yield fs, server
    finally:
        ray.shutdown()
        server.stop()
        mp.undo()
