"""A moto S3 server on 127.0.0.1 for the benchmarks of remote roots, started and stopped by them."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_s3(bucket: str = "embedkit-bench") -> Iterator[str]:
    """Start moto on a free loopback port, point the AWS environment at it, create ``bucket``;
    yield ``s3://<bucket>`` and stop the server afterwards."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",  # a region in client_kwargs breaks bucket creation
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
        )
        s3fs.S3FileSystem().mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
