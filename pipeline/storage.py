"""A run root on object storage (`paths.root=s3://bucket/prefix`, or any URI pyarrow's filesystems open), worked on
through a local mirror.

Stages and the libraries under them (transformers, vLLM, DeepSpeed, GPTQModel, matplotlib) read and write folders.
When `paths.run_root` is a URI, the entrypoint (`pipeline.runtime.entrypoint`) points every `paths.*` at this node's
mirror of it (`mirror_of`: a folder under RAY_DISTILL_CACHE named after the URI, the same path on every node),
brings the mirror up to date before the stage (`pull`) and sends back what the stage wrote when it ends, finished or
not (`push`). Inside the stage, what must outlive a lost node or a killed driver is sent at once: each label shard
and every JSON record (`published`, called by the atomic writers), a saved student (`push`); a folder a worker on
another node reads is brought up to date there first (`fetched`). Ray Train writes its checkpoints to the URI itself
(`remote_of`).

Each transfer leaves the local copy with the remote one's modification time in whole seconds plus one nanosecond:
the mark of a copy that was in step. A marked file the run root no longer holds was deleted there (another node
started over) and goes here too; an unmarked one was never sent (a killed run's) and is kept, to be sent. A newer
file here is sent; a file something else changed at the run root (Ray Train's) is not overwritten by an older copy.

Credentials come from the filesystem's own sources (the AWS variables, profile or instance role for S3) and never
from the URI, so nothing a run writes can hold one.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import ConfigError, StorageError

CACHE_ENV = "RAY_DISTILL_CACHE"  # the root of every node's mirrors (default: <temp dir>/ray-distill-cache)
REMOTE_ENV = "RAY_DISTILL_REMOTE_ROOT"  # the run root's URI while a stage runs (set in Ray's workers too)
_NS = 10 ** 9
_IN_STEP = 1  # the nanoseconds of a local copy's modification time that mark it as in step with the run root


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def check_uri(uri: str, setting: str) -> None:
    """One sentence for a URI that names a credential, carries options, or that no pyarrow filesystem opens."""
    parts = urlsplit(uri)
    if parts.password is not None or (parts.scheme in ("s3", "gs", "gcs") and "@" in parts.netloc):
        raise ConfigError(f"{setting} carries a credential in its URI, where it would be written into manifests and "
                          "logs; remove it and give credentials the filesystem's own way (for S3: AWS_ACCESS_KEY_ID "
                          "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the node's role).")
    if parts.query or parts.fragment:
        raise ConfigError(f"{setting} carries options after '?' or '#' in its URI, which every artifact's path would "
                          "be appended to; give them the filesystem's own way (for S3: AWS_REGION, AWS_ENDPOINT_URL, "
                          "AWS_PROFILE).")
    try:
        _root(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a scheme it cannot open
        raise ConfigError(f"{setting}={uri} cannot be opened ({_first_line(e)}); check that it is a URI pyarrow's "
                          "filesystems take (s3://bucket/prefix, gs://bucket/prefix, hdfs://...) and that its storage "
                          "answers, or give a local path.") from None


def mirror_of(uri: str) -> str:
    """This node's folder for `uri`: the same path on every node that shares the cache root's setting."""
    parts = urlsplit(uri)
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "ray-distill-cache").expanduser()
    return str(root.absolute() / "mirror" / parts.scheme / parts.netloc / parts.path.strip("/"))


@dataclass(frozen=True)
class Mirror:
    remote: str  # the run root's URI
    local: str  # this node's folder for it

    def relative(self, path: str | Path) -> str | None:
        """A path's place inside the mirror ("" for the mirror itself; None outside it)."""
        if not Path(path).is_absolute():  # a hub id such as org/model is no path
            return None
        try:
            rel = Path(path).relative_to(self.local)
        except ValueError:
            return None
        return rel.as_posix() if rel.parts else ""

    def remote_of(self, path: str | Path) -> str | None:
        """The URI of a path inside the mirror (None outside it)."""
        rel = self.relative(path)
        return None if rel is None else self.remote.rstrip("/") + (f"/{rel}" if rel else "")


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
    if isinstance(value, str) and mirror.relative(value) is not None:
        return mirror.remote_of(value)
    return value


def local_of(value: str) -> str:
    """A URI inside the active run root as this node's path (what `portable` wrote); anything else unchanged."""
    mirror = active()
    root = mirror.remote.rstrip("/") if mirror else None
    if root and isinstance(value, str) and (value == root or value.startswith(root + "/")):
        return mirror.local + value[len(root):]
    return value


def _reported(verb: str):
    """Storage that fails inside a stage is one sentence naming the run root, not a pyarrow traceback."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(path, *args, **kwargs):
            try:
                return fn(path, *args, **kwargs)
            except (OSError, ValueError) as e:
                if remote_of(path) is None:
                    raise
                raise StorageError(f"Cannot {verb} {remote_of(path)} ({_first_line(e)}); check the storage and its "
                                   "credentials (for S3: the AWS variables or profile, and AWS_ENDPOINT_URL for a "
                                   "server other than AWS), then run the same command again.") from None
        return inner
    return wrap


@_reported("write")
def published(path: str | Path) -> None:
    """Send one file just written in the mirror (a shard, a manifest, chain.json) to the run root; no-op off it."""
    where = _where(path)
    if where:
        _upload(Path(path), *where)


def moved(path: str | Path) -> None:
    """A folder renamed within the mirror: its files' marks speak of their old place, so they count as never sent."""
    for _, file in _local_files(Path(path)):
        os.utime(file)


@_reported("write")
def push(path: str | Path) -> None:
    """Send a folder (or file) of the mirror to the run root: each file the run root lacks and that was never in step
    with it, or holds an older copy of. Hidden folders (a stage's staging area) go only when pushed by name."""
    where = _where(path)
    if where is None or not Path(path).exists():
        return
    fs, key = where
    if Path(path).is_file():
        _upload(Path(path), fs, key)
        return
    remote = _listing(fs, key)
    for rel, file in _local_files(Path(path)):
        if _to_send(file, remote.get(rel)):
            _upload(file, fs, f"{key}/{rel}")


@_reported("read")
def pull(path: str | Path) -> None:
    """Make a folder of the mirror what the run root holds: fetch what is missing or older here, drop what was in
    step once and is gone from the run root; keep what was never sent. Ray Train's checkpoint folders stay remote
    (Ray Train reads them there)."""
    where = _where(path)
    if where is None:
        return
    fs, key = where
    remote = _listing(fs, key)
    local = Path(path)
    for rel, file in _local_files(local):
        try:
            if rel not in remote and _in_step_once(file):
                file.unlink()
        except FileNotFoundError:  # another process on this node pulling the same folder took it first
            pass
    for rel, (size, mtime) in sorted(remote.items()):
        target = local / rel
        if target.is_file() and not _to_fetch(target, size, mtime):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.pull")
        with fs.open_input_stream(f"{key}/{rel}") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        _mark_in_step(tmp, mtime)
        tmp.replace(target)


def fetched(path: str | Path) -> str:
    """A folder (a model) a worker on any node is about to read, brought up to date on its node. Returns the path."""
    pull(path)
    return str(path)


@_reported("read")
def exists(path: str | Path) -> bool:
    """Whether a path is in the mirror or, for a URI run root, at the run root (Ray Train's folders live there)."""
    if Path(path).exists():
        return True
    where = _where(path)
    if where is None:
        return False
    import pyarrow.fs as pafs

    fs, key = where
    return fs.get_file_info(key).type != pafs.FileType.NotFound


@_reported("delete from")
def remove(path: str | Path) -> None:
    """Delete a folder (or file) in the mirror and at the run root."""
    local = Path(path)
    if local.is_dir():
        shutil.rmtree(local, ignore_errors=True)
    elif local.exists():
        local.unlink()
    where = _where(path)
    if where:
        import pyarrow.fs as pafs

        fs, key = where
        kind = fs.get_file_info(key).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(key)
        elif kind == pafs.FileType.File:
            fs.delete_file(key)


@functools.lru_cache(maxsize=8)
def _root(uri: str):
    """The filesystem of a run root and the run root's path on it (one client per run root and process)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _where(path: str | Path):
    """(filesystem, path on it) of a path inside the active mirror; None outside it."""
    mirror = active()
    rel = mirror.relative(path) if mirror else None
    if rel is None:
        return None
    fs, base = _root(mirror.remote.rstrip("/"))
    return fs, base.rstrip("/") + (f"/{rel}" if rel else "")


def _listing(fs, key: str) -> dict[str, tuple[int, int]]:
    """Relative path → (size, whole-second modification time) of every file under `key`, leaving out Ray Train's
    checkpoint folders and hidden ones."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        rel = info.path[len(key.rstrip("/")) + 1:]
        if info.type == pafs.FileType.File and not _left_out(rel):
            out[rel] = (info.size, int(info.mtime.timestamp()) if info.mtime else 0)
    return out


def _local_files(folder: Path):
    if not folder.is_dir():
        return
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if file.is_file() and not _left_out(rel):
            yield rel, file


def _left_out(rel: str) -> bool:
    """Ray Train's checkpoints (read at the run root) and anything hidden: temporary files, staging folders."""
    parts = rel.split("/")
    return any(p.startswith(".") for p in parts) or any(p.startswith("checkpoint_") for p in parts[:-1])


def _upload(file: Path, fs, key: str) -> None:
    """Copy one file up; the local copy is then marked as in step with the remote one."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):  # file:// — object stores need no folders
        fs.create_dir(key.rsplit("/", 1)[0], recursive=True)
    with open(file, "rb") as src, fs.open_output_stream(key) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    info = fs.get_file_info(key)
    _mark_in_step(file, int(info.mtime.timestamp()) if info.mtime else 0)


def _mark_in_step(file: Path, mtime: int) -> None:
    stamp = mtime * _NS + _IN_STEP
    os.utime(file, ns=(stamp, stamp))


def _in_step_once(file: Path) -> bool:
    return file.stat().st_mtime_ns % _NS == _IN_STEP


def _to_send(file: Path, remote: tuple[int, int] | None) -> bool:
    """Whether a local file goes up: never sent, or changed here since (a run root's newer copy stays)."""
    if remote is None:
        return not _in_step_once(file)
    size, mtime = remote
    stat = file.stat()
    here = stat.st_mtime_ns // _NS
    return here > mtime or (here == mtime and stat.st_size != size and not _in_step_once(file))


def _to_fetch(file: Path, size: int, mtime: int) -> bool:
    """Whether the run root's copy comes down: this one differs and is not newer unsent work."""
    stat = file.stat()
    here = stat.st_mtime_ns // _NS
    if (stat.st_size, here) == (size, mtime):
        return False
    return _in_step_once(file) or here < mtime


def check_marks(folder: str) -> None:
    """The mirror keeps its sync state in nanoseconds of modification times: refuse a folder whose filesystem drops
    them (FAT, SMB, some network filesystems), where deleted files would come back."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    probe = Path(folder) / f".probe.{os.getpid()}.tmp"
    probe.write_bytes(b"")
    try:
        _mark_in_step(probe, 1_700_000_000)
        kept = _in_step_once(probe)
    finally:
        probe.unlink(missing_ok=True)
    if not kept:
        raise ConfigError(f"The mirror folder {folder} is on a filesystem that keeps no nanoseconds in file times, "
                          f"which the mirror's sync relies on; point {CACHE_ENV} at a local disk.")


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


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
    check_marks(mirror_of(run_root))
    if is_uri(paths["root"]):
        check_uri(str(paths["root"]), "paths.root")
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
