"""A run store behind a URL: any fsspec file system (`s3://bucket/prefix`, `gs://…`, `file://…`).

Layout under the URL's prefix:

- `objects/<run name>/<blake2b>.safetensors`: a run's bytes, named by their digest (content-addressed, so
  two machines that upload the same bits write the same object and never corrupt each other's);
- `runs/<run name>.json`: the run's manifest, the one thing that publishes it. Written last, after its
  object is whole, with a conditional create (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`, a hard
  link on a local file system): the first publish of a key wins and is never overwritten, except by the
  session that found the published object damaged;
- `claims/<run name>/<generation>.json`: who is training a run and until when. A claim is taken with a
  conditional create of the next generation; its owner renews it while training; an expired one is taken
  over by creating the generation after it. Claims exist only where the store honours conditional creates
  (measured at session start): elsewhere two machines may both train a key, and the first publish wins.

Credentials come from each file system's usual places (environment, config files, instance metadata) and
never pass through this module: URLs are shown with any user info and query removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from contextlib import contextmanager

from flannel_repro.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

MANIFEST_FORMAT = "flannel-repro/store-manifest/1"
CLAIM_FORMAT = "flannel-repro/store-claim/1"
CHECK_TIMEOUT_S = 30.0  # a store that does not answer the session-start check within this is an error
CLAIM_TTL_S = 600.0  # a claim not renewed for this long is taken over
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# the extra that installs each protocol's fsspec implementation
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_CHUNK = 8 << 20


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether `location` is a URL (`scheme://...`), not a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def redact(url: str) -> str:
    """The URL as it may be shown: without user info (`user:secret@`), query or fragment."""
    m = _URL.match(url)
    if m is None:
        return url
    rest = url[m.end() :].split("?", 1)[0].split("#", 1)[0]
    host, sep, path = rest.partition("/")
    host = host.rsplit("@", 1)[-1]
    return f"{m.group(1)}://{host}{sep}{path}"


def file_digest(path: Path) -> tuple[str, int]:
    """(blake2b hex digest, size) of a file, read in chunks."""
    h = hashlib.blake2b(digest_size=32)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


@dataclass(frozen=True)
class Manifest:
    """What publishes a run: its object's name, size and digest, and who published it."""

    run: str
    key: str
    object: str  # relative to the store's prefix
    size: int
    blake2b: str
    numerics_class: str
    published_by: dict[str, Any]
    published_at: float
    run_key_material: dict[str, Any]

    def to_json(self) -> bytes:
        return json.dumps({"format": MANIFEST_FORMAT, **self.__dict__}, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> "Manifest":
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"{where}: expected a run manifest (JSON), got undecodable bytes ({exc}).") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ArtifactError(f"{where}: expected a run manifest of format {MANIFEST_FORMAT!r}, got {got!r}.")
        try:
            return cls(
                run=str(data["run"]),
                key=str(data["key"]),
                object=str(data["object"]),
                size=int(data["size"]),
                blake2b=str(data["blake2b"]),
                numerics_class=str(data.get("numerics_class", "")),
                published_by=dict(data.get("published_by") or {}),
                published_at=float(data.get("published_at", 0.0)),
                run_key_material=dict(data.get("run_key_material") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: a run manifest with a missing or malformed field ({exc}).") from None


@dataclass(frozen=True)
class Claim:
    """A claim object: `owner` trains `run` until `expires_at` (wall clock, seconds since the epoch)."""

    run: str
    generation: int
    owner: str
    expires_at: float

    def to_json(self) -> bytes:
        return json.dumps({"format": CLAIM_FORMAT, **self.__dict__}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, run: str, generation: int) -> "Claim":
        try:
            data = json.loads(raw)
            return cls(run, generation, str(data["owner"]), float(data["expires_at"]))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            return cls(run, generation, "unreadable claim", 0.0)  # a damaged claim is an expired one

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


def owner_id(session: str = "") -> str:
    """Who a claim or publication belongs to: host, process and session."""
    return f"{socket.gethostname()}:{os.getpid()}:{session or '-'}"


class RemoteStore:
    """The run objects, manifests and claims under one URL."""

    def __init__(self, url: str, *, claim_ttl_s: float = CLAIM_TTL_S) -> None:
        self.url = redact(url)
        self.fs, root = _filesystem(url)
        self.root = root.rstrip("/")
        self.protocol = _URL.match(url).group(1).lower()  # type: ignore[union-attr]
        self.claim_ttl_s = claim_ttl_s
        # whether a conditional create is atomic here: measured by check(); local links are, by construction
        self.exclusive = self._local
        self.checked = False

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    @property
    def _local(self) -> bool:
        return "file" in _protocols(self.fs)

    # --- paths --------------------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def manifest_path(self, run: str) -> str:
        return self._path("runs", f"{run}.json")

    def object_path(self, run: str, digest: str) -> str:
        return self._path("objects", run, f"{digest}.safetensors")

    def _claim_path(self, run: str, generation: int) -> str:
        return self._path("claims", run, f"{generation:08d}.json")

    def show(self, path: str) -> str:
        """A store path as the user wrote the URL (scheme and prefix), for messages."""
        rel = path[len(self.root) :].lstrip("/") if path.startswith(self.root) else path
        return f"{self.url.rstrip('/')}/{rel}"

    def show_object(self, manifest: Manifest) -> str:
        """The URL of the object a manifest names, for messages."""
        return self.show(self._path(manifest.object))

    # --- the session-start check ----------------------------------------------------------------------------

    def check(self, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        """Reach the store, write and remove a probe object, and measure whether a conditional create is
        honoured (a second create of the probe must be refused). Any failure is a ConfigError naming the
        store and what went wrong, within `timeout_s`: never a traceback in the middle of a run."""
        outcome: dict[str, Any] = {}

        def probe() -> None:
            try:
                outcome["exclusive"] = self._probe()
            except BaseException as exc:  # noqa: BLE001 - reported to the calling thread below
                outcome["error"] = exc

        worker = threading.Thread(target=probe, name="flannel-store-check", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            raise ConfigError(
                f"the artifact store {self.url}: expected it to answer, got no answer within {timeout_s:.0f} s "
                "(is the endpoint reachable? For S3-compatible servers set the endpoint in the usual place, "
                "e.g. AWS_ENDPOINT_URL_S3 or FSSPEC_S3_ENDPOINT_URL)."
            )
        error = outcome.get("error")
        if error is not None:
            raise ConfigError(f"the artifact store {self.url}: {_explain(error)}") from None
        self.exclusive = bool(outcome["exclusive"])
        self.checked = True

    def _probe(self) -> bool:
        probe = self._path(".flannel-probe", f"{uuid.uuid4().hex}.json")
        if self._local:
            self.fs.makedirs(self.root, exist_ok=True)
        # creating the probe is the check: a missing bucket, refused credentials or no endpoint fail it. (No listing
        # first: another machine's probe can make a prefix appear and vanish between an exists() and an ls().)
        created = self.create_exclusive(probe, b'{"probe": 1}', atomic=True)
        try:
            second = self.create_exclusive(probe, b'{"probe": 2}', atomic=True)
        except (NotImplementedError, TypeError, ValueError):
            second = True  # the file system has no conditional create
        finally:
            try:
                self.fs.rm_file(probe)
            except FileNotFoundError:
                pass
        return created and not second

    # --- writes ---------------------------------------------------------------------------------------------

    def create_exclusive(self, path: str, data: bytes, *, atomic: bool | None = None) -> bool:
        """Write `data` at `path` unless something is there: True if written, False if it existed. Atomic
        where the store honours conditional creates (`exclusive`); elsewhere check-then-write."""
        atomic = self.exclusive if atomic is None else atomic
        if self._local:
            return _link_create(Path(path), data)
        if atomic:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def _put(self, local: Path, path: str) -> None:
        if self._local:  # via a temporary name and a rename: never a half-written object under its own name
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.upload-")
            os.close(fd)
            try:
                self.fs.put_file(str(local), tmp)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:  # one PUT, or a multipart upload completed at the end: S3 and GCS objects appear whole
            self.fs.put_file(str(local), path)

    def publish(
        self,
        run: str,
        key: str,
        local: Path,
        *,
        session: str,
        material: dict[str, Any],
        numerics_class: str,
        replace: bool = False,
    ) -> tuple[bool, Manifest]:
        """Upload a finished run and publish its manifest. Returns (published, manifest): published is False
        when another machine published the key first; its manifest is returned and wins. `replace`: the
        published object was found damaged, so its manifest is overwritten."""
        digest, size = file_digest(local)
        obj = self.object_path(run, digest)
        self._put(local, obj)
        manifest = Manifest(
            run=run,
            key=key,
            object=obj[len(self.root) + 1 :],
            size=size,
            blake2b=digest,
            numerics_class=numerics_class,
            published_by={"owner": owner_id(session)},
            published_at=time.time(),
            run_key_material=material,
        )
        where = self.manifest_path(run)
        if replace:
            if self._local:
                _atomic_write(Path(where), manifest.to_json())
            else:
                self.fs.pipe_file(where, manifest.to_json())
            return True, manifest
        if self.create_exclusive(where, manifest.to_json()):
            return True, manifest
        winner = self.lookup(run)
        return False, winner if winner is not None else manifest

    # --- reads ----------------------------------------------------------------------------------------------

    def lookup(self, run: str) -> Manifest | None:
        """The run's manifest, or None when it is not published. A damaged manifest is an ArtifactError."""
        where = self.manifest_path(run)
        try:
            raw = self.fs.cat_file(where)
        except FileNotFoundError:
            return None
        return Manifest.from_json(raw, self.show(where))

    def fetch(self, manifest: Manifest, dest: Path) -> None:
        """Download the manifest's object to `dest` (atomically, via a temporary file beside it) and check its
        size and digest against the manifest; a mismatch is an ArtifactError and leaves nothing at `dest`."""
        src = self._path(manifest.object)
        shown = self.show_object(manifest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.download-")
        os.close(fd)
        try:
            try:
                self.fs.get_file(src, tmp)
            except FileNotFoundError:
                raise ArtifactError(
                    f"{shown}: expected the object the manifest of {manifest.run} names, got no such object"
                ) from None
            digest, size = file_digest(Path(tmp))
            if (digest, size) != (manifest.blake2b, manifest.size):
                raise ArtifactError(
                    f"{shown}: expected {manifest.size} bytes with blake2b {manifest.blake2b[:16]}…, "
                    f"got {size} bytes with blake2b {digest[:16]}…"
                )
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # --- claims ---------------------------------------------------------------------------------------------

    def current_claim(self, run: str) -> Claim | None:
        """The newest claim of `run`, or None."""
        prefix = self._path("claims", run)
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(prefix, detail=False)]
        except FileNotFoundError:
            return None
        gens = sorted(int(n[:-5]) for n in names if re.fullmatch(r"\d{8}\.json", n))
        if not gens:
            return None
        try:
            raw = self.fs.cat_file(self._claim_path(run, gens[-1]))
        except FileNotFoundError:
            return Claim(run, gens[-1], "released", 0.0)
        return Claim.from_json(raw, run, gens[-1])

    def try_claim(self, run: str, owner: str) -> tuple[Claim | None, Claim | None]:
        """(ours, holder): take the run's claim when no live claim is held; else return the live holder."""
        current = self.current_claim(run)
        if current is not None and not current.expired() and current.owner != owner:
            return None, current
        generation = 0 if current is None else current.generation + 1
        claim = Claim(run, generation, owner, time.time() + self.claim_ttl_s)
        if self.create_exclusive(self._claim_path(run, generation), claim.to_json()):
            if current is not None:
                self._remove(self._claim_path(run, current.generation))
            return claim, None
        return None, self.current_claim(run)

    def renew(self, claim: Claim) -> Claim:
        renewed = Claim(claim.run, claim.generation, claim.owner, time.time() + self.claim_ttl_s)
        path = self._claim_path(claim.run, claim.generation)
        if self._local:
            _atomic_write(Path(path), renewed.to_json())
        else:
            self.fs.pipe_file(path, renewed.to_json())
        return renewed

    def release(self, claim: Claim) -> None:
        self._remove(self._claim_path(claim.run, claim.generation))

    @contextmanager
    def holding(self, claim: Claim) -> Iterator[None]:
        """Renew `claim` every third of its lifetime while the body runs (training); release it after."""
        stop = threading.Event()

        def beat() -> None:
            current = claim
            while not stop.wait(self.claim_ttl_s / 3):
                try:
                    current = self.renew(current)
                except OSError:
                    pass  # a missed renewal only risks a takeover; the publish stays conditional

        beater = threading.Thread(target=beat, name=f"flannel-claim-{claim.run}", daemon=True)
        beater.start()
        try:
            yield
        finally:
            stop.set()
            beater.join()
            try:
                self.release(claim)
            except OSError:
                pass

    def wait_for(
        self, run: str, owner: str, *, poll_s: float = 2.0, on_wait: Callable[[Claim], None] | None = None
    ) -> tuple[Manifest | None, Claim | None]:
        """Until `run` is published (its manifest, no claim) or its claim is ours (None, claim): poll while
        another live owner holds it, taking it over when that claim expires."""
        told = False
        while True:
            manifest = self.lookup(run)
            if manifest is not None:
                return manifest, None
            ours, holder = self.try_claim(run, owner)
            if ours is not None:
                return None, ours
            if holder is not None and on_wait is not None and not told:
                on_wait(holder)
                told = True
            time.sleep(poll_s)

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # --- listing, for prune ---------------------------------------------------------------------------------

    def manifests(self) -> list[tuple[str, Manifest | str]]:
        """(run name, manifest or why it is unreadable) for every published run."""
        out: list[tuple[str, Manifest | str]] = []
        for path in sorted(self.fs.glob(self._path("runs", "*.json"))):
            run = path.rsplit("/", 1)[-1][: -len(".json")]
            try:
                m = self.lookup(run)
            except ArtifactError as exc:
                out.append((run, str(exc)))
                continue
            if m is not None:
                out.append((run, m))
        return out

    def objects(self) -> list[tuple[str, int, float]]:
        """(path relative to the prefix, size, modification time or 0) of every object."""
        out = []
        for path, info in sorted(self.fs.find(self._path("objects"), detail=True).items()):
            mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            out.append((path[len(self.root) + 1 :], int(info.get("size") or 0), float(mtime or 0)))
        return out

    def claims(self) -> list[Claim]:
        out = []
        for path in sorted(self.fs.glob(self._path("claims", "*", "*.json"))):
            run, name = path.rsplit("/", 2)[-2:]
            try:
                raw = self.fs.cat_file(path)
            except FileNotFoundError:
                continue
            out.append(Claim.from_json(raw, run, int(name[:-5]) if name[:-5].isdigit() else 0))
        return out

    def remove(self, relative: str) -> None:
        self._remove(self._path(relative))

    def claim_relpath(self, claim: Claim) -> str:
        return self._claim_path(claim.run, claim.generation)[len(self.root) + 1 :]


# --- helpers --------------------------------------------------------------------------------------------------


def _filesystem(url: str) -> "tuple[AbstractFileSystem, str]":
    """fsspec's file system and path for `url`, or a ConfigError naming what is missing."""
    try:
        import fsspec
    except ImportError:
        raise ConfigError(
            f"the artifact store {redact(url)}: a URL store needs fsspec, which is not installed "
            "(pip install 'flannel-repro[store]')."
        ) from None
    protocol = _URL.match(url).group(1).lower()  # type: ignore[union-attr]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(
            f"the artifact store {redact(url)}: expected a local path or a URL of a file system fsspec knows "
            f"(s3://, gs://, file://, ...), got the unknown protocol {protocol!r}."
        ) from None
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'flannel-repro[{extra}]'" if extra else f"install fsspec's package for {protocol}://"
        raise ConfigError(
            f"the artifact store {redact(url)}: the {protocol}:// file system needs a package that is not "
            f"installed ({exc}); {hint}."
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"the artifact store {redact(url)}: fsspec could not open it ({_explain(exc)}).") from None
    if not path.strip("/"):
        raise ConfigError(
            f"the artifact store {redact(url)}: expected a URL with a bucket or folder (e.g. s3://bucket/runs), "
            "got none."
        )
    return fs, path


def _protocols(fs: "AbstractFileSystem") -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _link_create(path: Path, data: bytes) -> bool:
    """Create `path` with `data` unless it exists: written to a temporary file, then hard-linked into
    place (link refuses an existing name: the local file system's conditional create)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.new-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def _atomic_write(path: Path, data: bytes) -> None:
    from flannel_repro.safeio import write_bytes_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data, "a store object")


def _explain(exc: BaseException) -> str:
    """What went wrong, in words a user can act on, without any credential."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, PermissionError) or re.search(
        r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|403|credential", text, re.I
    ):
        return (
            "expected access with this machine's credentials, got refused "
            f"({_first_line(text)}); check the credentials in the usual place for this file system "
            "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws for s3://)."
        )
    if isinstance(exc, FileNotFoundError) or re.search(r"NoSuchBucket|does not exist", text, re.I):
        return f"expected an existing bucket or folder, got none ({_first_line(text)})."
    return f"expected a reachable store, got {type(exc).__name__}: {_first_line(text)}."


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:300]
