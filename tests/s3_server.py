"""An S3-compatible server on 127.0.0.1 for the tests: moto's standalone server (`make setup` installs it in an
environment of its own, .venv/s3-server), with made-up credentials in the standard AWS variables."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# made up for the test server; the tests check that none of them is written into a run's files or logs
ACCESS_KEY, SECRET_KEY = "AKIARAYDISTILLTEST01", "ray-distill-test-secret-do-not-write-0123"


def moto_server() -> Path:
    exe = Path(sys.prefix) / "s3-server" / "bin" / "moto_server"
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing; run `make setup` (it installs the tests' S3 server)")
    return exe


class S3Server:
    """`with S3Server(port) as s3:` a running server with one bucket; `s3.env` is what a process needs to reach it."""

    def __init__(self, port: int, bucket: str = "distill"):
        self.port, self.bucket = port, bucket
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def __enter__(self) -> "S3Server":
        self.proc = subprocess.Popen([str(moto_server()), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 test server did not start on port {self.port}")
                time.sleep(0.2)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                          endpoint_override=self.endpoint, allow_bucket_creation=True).create_dir(self.bucket)
        return self

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                                 endpoint_override=self.endpoint)

    def files(self, prefix: str) -> dict[str, int]:
        """Key (under the bucket) → size of every object under `prefix`."""
        import pyarrow.fs as pafs

        infos = self.filesystem().get_file_info(pafs.FileSelector(f"{self.bucket}/{prefix}", recursive=True,
                                                                  allow_not_found=True))
        return {i.path[len(self.bucket) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def env_with(server: S3Server, cache: Path) -> dict[str, str]:
    """A process's environment for runs on `server`, with its mirrors under `cache`."""
    return {**os.environ, **server.env, "RAY_DISTILL_CACHE": str(cache)}
