"""A run root on object storage (`paths.root=s3://bucket/prefix`, or any URI pyarrow's filesystems open), worked on
through a local mirror.

Stages and the libraries under them (transformers, vLLM, DeepSpeed, GPTQModel, matplotlib) read and write folders.
When `paths.run_root` is a URI, the entrypoint (`pipeline.runtime.entrypoint`) points every `paths.*` at this node's
mirror of it (`mirror_of`: a folder under RAY_DISTILL_CACHE named after the URI, the same path on every node),
brings the mirror up to date before the stage (`pull`) and sends back what the stage wrote when it ends, finished or
not (`push`). Inside the stage, what must outlive a lost node or a killed driver is sent at once: each label shard
and every JSON record (`published`, called by the atomic writers), a saved student (`push`); a folder another node
reads is fetched there (`pull`). Ray Train writes its checkpoints to the URI itself (`remote_of`).

A file is in step when both sides have it with the same size and modification time: after each transfer the local
copy takes the remote one's time. Credentials come from the filesystem's own sources (the AWS variables, profile or
instance role for S3) and never from the URI, so nothing written by a run can hold one.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pipeline.errors import ConfigError

CACHE_ENV = "RAY_DISTILL_CACHE"  # the root of every node's mirrors (default: <temp dir>/ray-distill-cache)
REMOTE_ENV = "RAY_DISTILL_REMOTE_ROOT"  # the run root's URI while a stage runs (set in Ray's workers too)
# query arguments of a pyarrow S3 URI that carry a secret: refused (the AWS variables or profile carry them)
_SECRET_KEYS = {"access_key", "secret_key", "session_token"}


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def check_uri(uri: str, setting: str) -> None:
    """One sentence for a URI that names a credential or that no pyarrow filesystem opens."""
    parts = urlsplit(uri)
    if "@" in parts.netloc or _SECRET_KEYS & set(parse_qs(parts.query)):
        raise ConfigError(f"{setting} carries a credential in its URI, where it would be written into manifests and "
                          "logs; remove it and give credentials the filesystem's own way (for S3: AWS_ACCESS_KEY_ID "
                          "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the node's role).")
    try:
        _filesystem(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a scheme it cannot open
        raise ConfigError(f"{setting}={uri} cannot be opened ({str(e).splitlines()[0][:160]}); use a URI pyarrow's "
                          "filesystems take (s3://bucket/prefix, gs://bucket/prefix, hdfs://...) or a local path.") \
            from None


def mirror_of(uri: str) -> str:
    """This node's folder for `uri`: the same path on every node that shares the cache root's setting."""
    parts = urlsplit(uri)
    root = os.environ.get(CACHE_ENV) or os.path.join("/tmp", "ray-distill-cache")
    return str(Path(root) / "mirror" / parts.scheme / parts.netloc / parts.path.strip("/"))


@dataclass(frozen=True)
class Mirror:
    remote: str  # the run root's URI
    local: str  # this node's folder for it

    def remote_of(self, path: str | Path) -> str | None:
        """The URI of a path inside the mirror (None outside it)."""
        try:
            rel = Path(path).absolute().relative_to(self.local)
        except ValueError:
            return None
        return self.remote.rstrip("/") + ("/" + rel.as_posix() if rel.parts else "")


def active() -> Mirror | None:
    """The run root's mirror while a stage on a URI run root runs (in the driver and in Ray's workers)."""
    remote = os.environ.get(REMOTE_ENV)
    return Mirror(remote, mirror_of(remote)) if remote else None


def activate(remote: str | None) -> None:
    if remote:
        os.environ[REMOTE_ENV] = remote
    else:
        os.environ.pop(REMOTE_ENV, None)


def worker_env() -> dict[str, str]:
    """What Ray's workers need in their environment to find the active mirror (no credential)."""
    return {k: os.environ[k] for k in (REMOTE_ENV, CACHE_ENV) if os.environ.get(REMOTE_ENV) and os.environ.get(k)}


def remote_of(path: str | Path) -> str | None:
    mirror = active()
    return mirror.remote_of(path) if mirror else None


def portable(value):
    """`value` (a path, or a config of nested dicts and lists) with every path in the active mirror written as its
    URI: what a fingerprint is taken of, so that each node (and each cache root) finds the same one."""
    mirror = active()
    if mirror is None:
        return value
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v) for v in value)
    if isinstance(value, str) and (value == mirror.local or value.startswith(mirror.local + "/")):
        return mirror.remote + value[len(mirror.local):]
    return value


def published(path: str | Path) -> None:
    """Send one file just written in the mirror (a shard, a manifest, chain.json) to the run root; no-op off it."""
    uri = remote_of(path)
    if uri:
        fs, where = _filesystem(uri)
        _upload(Path(path), fs, where)


def push(path: str | Path) -> None:
    """Send a folder (or file) of the mirror to the run root: each file the remote side lacks or holds otherwise."""
    uri = remote_of(path)
    if uri is None or not Path(path).exists():
        return
    fs, where = _filesystem(uri)
    if Path(path).is_file():
        _upload(Path(path), fs, where)
        return
    remote = _listing(fs, where)
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file() and not _temporary(p)):
        rel = file.relative_to(path).as_posix()
        if _newer_here(file, remote.get(rel)):
            _upload(file, fs, f"{where}/{rel}")


def _newer_here(file: Path, remote: tuple[int, int] | None) -> bool:
    """Whether the local copy is to be sent: the remote side lacks it or holds an older one (a file something else,
    such as Ray Train, changed at the run root since it was fetched is left alone)."""
    if remote is None:
        return True
    size, mtime = remote
    here = int(file.stat().st_mtime)
    return here > mtime or (here == mtime and file.stat().st_size != size)


def pull(path: str | Path, skip_checkpoints: bool = True) -> None:
    """Make a folder of the mirror what the run root holds: fetch what differs, drop what the remote side lacks (a
    stale copy would otherwise be sent back). Ray Train's checkpoint folders stay remote (Ray Train reads them)."""
    _fetch(path, exact=True, skip_checkpoints=skip_checkpoints)


def fetched(path: str | Path) -> str:
    """A folder (a model) that a worker on any node reads: what the run root holds newer or this node lacks is
    fetched; nothing here is dropped (the driver's node may hold what it has not sent yet). Returns the path."""
    _fetch(path, exact=False)
    return str(path)


def _fetch(path: str | Path, exact: bool, skip_checkpoints: bool = True) -> None:
    uri = remote_of(path)
    if uri is None:
        return
    fs, where = _filesystem(uri)
    remote = _listing(fs, where, skip_checkpoints)
    local = Path(path)
    for file in [p for p in local.rglob("*") if p.is_file()] if exact and local.is_dir() else []:
        rel = file.relative_to(local).as_posix()
        if rel not in remote and not (skip_checkpoints and _in_checkpoint(rel)):
            file.unlink()
    for rel, (size, mtime) in sorted(remote.items()):
        target = local / rel
        if target.is_file() and (target.stat().st_size, int(target.stat().st_mtime)) == (size, mtime):
            continue
        if not exact and target.is_file() and int(target.stat().st_mtime) >= mtime:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.pull")
        with fs.open_input_stream(f"{where}/{rel}") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.utime(tmp, (mtime, mtime))
        tmp.replace(target)


def exists(path: str | Path) -> bool:
    """Whether a path is in the mirror or, for a URI run root, at the run root (Ray Train's folders live there)."""
    if Path(path).exists():
        return True
    uri = remote_of(path)
    if uri is None:
        return False
    import pyarrow.fs as pafs

    fs, where = _filesystem(uri)
    return fs.get_file_info(where).type != pafs.FileType.NotFound


def remove(path: str | Path) -> None:
    """Delete a folder (or file) in the mirror and at the run root."""
    local = Path(path)
    if local.is_dir():
        shutil.rmtree(local, ignore_errors=True)
    elif local.exists():
        local.unlink()
    uri = remote_of(path)
    if uri:
        import pyarrow.fs as pafs

        fs, where = _filesystem(uri)
        kind = fs.get_file_info(where).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(where)
        elif kind == pafs.FileType.File:
            fs.delete_file(where)


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _listing(fs, where: str, skip_checkpoints: bool = False) -> dict[str, tuple[int, int]]:
    """Relative path → (size, whole-second modification time) of every file under `where`."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(where, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(where.rstrip("/")) + 1:]
        if skip_checkpoints and _in_checkpoint(rel):
            continue
        out[rel] = (info.size, int(info.mtime.timestamp()) if info.mtime else 0)
    return out


def _upload(file: Path, fs, where: str) -> None:
    """Copy one file up; the local copy then takes the remote one's modification time (both in step)."""
    with open(file, "rb") as src, fs.open_output_stream(where) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    info = fs.get_file_info(where)
    if info.mtime:
        stamp = info.mtime.timestamp()
        os.utime(file, (stamp, stamp))


def _temporary(file: Path) -> bool:
    return file.name.startswith(".") and file.name.endswith((".tmp", ".pull"))


def _in_checkpoint(rel: str) -> bool:
    return any(part.startswith("checkpoint_") for part in rel.split("/")[:-1])


def localize(cfg) -> Mirror | None:
    """For a URI `paths.run_root`: point every `paths.*` of `cfg` (a Hydra config, changed in place) at this node's
    mirror and make the mirror active; None for a local run root. A URI artifact path outside a URI run root, or any
    under a local one, is one sentence."""
    from omegaconf import OmegaConf

    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    run_root = str(paths["run_root"]).rstrip("/")
    if not is_uri(run_root):
        return None  # a URI among the other paths is refused by the stage's PathsConfig
    check_uri(run_root, "paths.run_root")
    mirror = Mirror(run_root, mirror_of(run_root))
    for key, value in paths.items():
        value = str(value).rstrip("/")
        if key == "root":
            local = mirror_of(value) if is_uri(value) else value
        elif value == run_root or value.startswith(run_root + "/"):
            local = mirror.local + value[len(run_root):]
        else:
            raise ConfigError(f"paths.{key}={value} is outside paths.run_root={run_root}; with a URI run root every "
                              "artifact path lies under it (leave paths.* other than root and run_root at their "
                              "defaults).")
        cfg.paths[key] = local
    activate(run_root)
    return mirror
