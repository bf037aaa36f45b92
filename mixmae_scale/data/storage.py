"""Where shard files live: a local folder or an S3-protocol object store, behind one small interface.

Object stores bill and throttle per request (S3 documents 5,500 GETs/s per prefix), so every read here
is one request for a whole object or one byte range, streamed: a training rank reads a shard segment
with one GET instead of one per member (DALI's own S3 reader made about 2.3 per sample). Endpoint and
credentials come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE,
AWS_DEFAULT_REGION, the AWS config file's `s3 = addressing_style`, ...), which boto3 reads itself; nothing else
here reads an object store (DALI decodes bytes this module fetched), so those settings are the only ones.
Every failure becomes a `StorageError` that names the URL, the endpoint the request went to and what to set.

botocore reads no variable for its connect and read timeouts, so this module reads MIXMAE_S3_CONNECT_TIMEOUT and
MIXMAE_S3_READ_TIMEOUT (seconds) itself, where the client is made, as boto3 reads the AWS ones there: the
exception to "library code reads no environment variable", because the client is made in processes no CLI
argument reaches (the shard pool's spawned workers, the data loader's workers, every rank on every node, the
variables travelling in .deepspeed_env with the shell's other MIXMAE_*), and the environment reaches them all.

`REQUESTS` counts the requests this process made, so benchmarks and tests can report requests per sample.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from mixmae_scale.atomic_file import fsync_path, replacing
from mixmae_scale.data.errors import DataError, plural

S3_PREFIX = "s3://"
REQUESTS: Counter[str] = Counter()  # "GET", "HEAD", "PUT", "LIST", "DELETE" -> requests this process sent
# botocore waits 60 s for a connection by default: with 8 attempts an unreachable host was 8 silent minutes. A
# connection to a working store takes milliseconds; a first byte may take long on a busy one, so reads keep 60 s.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
CONNECT_TIMEOUT_ENV = "MIXMAE_S3_CONNECT_TIMEOUT"  # seconds; botocore has no variable of its own for either
READ_TIMEOUT_ENV = "MIXMAE_S3_READ_TIMEOUT"
ATTEMPTS = 8  # unless AWS_MAX_ATTEMPTS (or max_attempts in the AWS config file) says otherwise
_CLIENTS: dict[int, object] = {}
_CLIENTS_LOCK = threading.Lock()
_RETRY_SAID: set[str] = set()  # endpoints whose first connection retry was logged, so a stall says so once
log = logging.getLogger(__name__)


class StorageError(DataError):
    """A file or object that cannot be read or written; the message names it and the way out."""


class StoreUnreachable(StorageError):
    """The store did not answer a request (no connection, or no response in time) over every attempt botocore
    makes (AWS_MAX_ATTEMPTS, with its own backoff): a caller that retries the request again only multiplies that
    wait, so shards/transient.py's `retrying` does not. The failure may still pass: a later run tries again."""


@dataclass(frozen=True)
class StoredFile:
    name: str  # relative to the listed prefix, with '/' separators
    size: int
    version: str = ""  # changes when the file is rewritten: its mtime (ns) in a folder, its ETag on S3


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(S3_PREFIX)


def join(base: str | Path, name: str) -> str:
    """`name` under `base` (a folder or an s3:// prefix); a URL in `name` stands alone, and so does an absolute
    path under a folder. Under a prefix a leading slash is part of the key: listing `data//x.tar` under `data`
    gives `/x.tar`, which resolved to the local file /x.tar."""
    if is_remote(name):
        return name
    if is_remote(base):
        return str(base).rstrip("/") + "/" + name
    return name if os.path.isabs(name) else str(Path(base) / name)


def split_url(url: str) -> tuple[str, str]:
    """'s3://bucket/key/part' -> ('bucket', 'key/part')."""
    rest = url[len(S3_PREFIX):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url}: not an s3://bucket/key URL")
    return bucket, key


def timeouts(environ: Mapping[str, str]) -> tuple[float, float]:
    """(connect, read) seconds for a new client: the user's MIXMAE_S3_* where set, else ours; a value that is not
    a positive number is refused by name rather than left for botocore to wait forever (0, inf) or fail on."""
    return (_seconds(environ, CONNECT_TIMEOUT_ENV, "connect", CONNECT_TIMEOUT_S),
            _seconds(environ, READ_TIMEOUT_ENV, "read", READ_TIMEOUT_S))


def _seconds(environ: Mapping[str, str], name: str, what: str, default: float) -> float:
    if name not in environ:
        return default
    text = environ[name]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise StorageError(f"{name}={text!r}: not a positive number of seconds (the object store's {what} timeout; "
                           f"unset, {default:g} s)")
    return value


def _client():
    """One boto3 client per process (clients are thread-safe, but not to be shared across a fork), from a session
    of its own, so it reads the AWS variables and config file as they are when it is made. The user's own retry
    settings (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE, or the config file's) are botocore's to apply; ours fill the gaps."""
    pid = os.getpid()
    with _CLIENTS_LOCK:
        if pid not in _CLIENTS:
            import boto3
            import botocore.session
            from botocore.config import Config

            connect_s, read_s = timeouts(os.environ)
            core = botocore.session.get_session()
            session = boto3.session.Session(botocore_session=core)
            own = core.get_config_variable("max_attempts") is not None
            retries = {} if own else {"total_max_attempts": ATTEMPTS}
            # Not get_config_variable("retry_mode", methods=("env", "config")): it still answers botocore's
            # default ('standard') when neither sets one, so no client was ever adaptive.
            if not (os.environ.get("AWS_RETRY_MODE") or core.get_scoped_config().get("retry_mode")):
                retries["mode"] = "adaptive"
            client = session.client("s3", config=Config(retries=retries or None, connect_timeout=connect_s,
                                                        read_timeout=read_s))
            client.meta.events.register("before-send.s3", _count_request)
            client.meta.events.register("needs-retry.s3", _say_retry)
            _CLIENTS[pid] = client
        return _CLIENTS[pid]


def _count_request(request, **_) -> None:
    method = request.method
    if method == "GET" and "list-type=" in request.url:
        method = "LIST"
    REQUESTS[method] += 1


def _say_retry(caught_exception=None, attempts: int = 0, **_) -> None:
    """A store that does not answer is retried for minutes (attempts x the timeouts) before the error: say at the
    first retry, once per endpoint, what is being waited for. Throttling (503 SlowDown) is not a connection
    problem and passes unsaid. Returns None: botocore's own handler decides whether to retry."""
    from botocore import exceptions as bx

    if not isinstance(caught_exception, bx.ConnectionError | bx.HTTPClientError) or attempts >= _attempts():
        return  # not a connection problem, or the last attempt: the error says the rest
    endpoint = _endpoint_of(caught_exception)
    if endpoint in _RETRY_SAID:
        return
    _RETRY_SAID.add(endpoint)
    log.warning("object store %s: %s (attempt %d of %d, %s); retrying", endpoint, caught_exception, attempts,
                _attempts(), _timeouts_said())


def _timeouts_said() -> str:
    """The timeouts this process's client waits, as its config holds them (the user's or ours), and their knobs."""
    config = getattr(_CLIENTS.get(os.getpid()), "meta", None)
    config = config.config if config is not None else None
    connect = getattr(config, "connect_timeout", CONNECT_TIMEOUT_S)
    read = getattr(config, "read_timeout", READ_TIMEOUT_S)
    return f"connect timeout {connect:g} s ({CONNECT_TIMEOUT_ENV}), read timeout {read:g} s ({READ_TIMEOUT_ENV})"


def _attempts() -> int:
    """The attempts the client makes per request, as botocore resolved them (ours or the user's)."""
    retries = getattr(_CLIENTS.get(os.getpid()), "meta", None)
    retries = retries.config.retries if retries is not None else None
    return int((retries or {}).get("total_max_attempts") or (retries or {}).get("max_attempts") or ATTEMPTS)


def _credentials_source() -> str:
    """Which credentials were sent and where botocore found them (the variables, a profile's file, a role): keys
    left in the shell win over the profile meant. The key id names them; the secret is never shown.

    Read from the client that sent them, never resolved again: a fresh session runs the chain anew, and for an
    assume-role, credential_process or SSO profile that calls out (it may hang, or raise), and its error replaced
    the refusal this explains. Whatever goes wrong here is said in the line, never raised."""
    try:
        client = _CLIENTS.get(os.getpid())
        signer = getattr(client, "_request_signer", None)
        if signer is None:
            return "which credentials were sent is not known"
        found = signer._credentials
        if found is None:
            return "no credentials"
        # A refreshable set's access_key property refreshes an expired set (a call out); its last key is enough.
        key = getattr(found, "_access_key", None) or found.access_key
        profile = f", profile {os.environ['AWS_PROFILE']}" if os.environ.get("AWS_PROFILE") else ""
        return f"access key id {key} from {getattr(found, 'method', None) or 'an unknown source'}{profile}"
    except Exception as exc:  # noqa: BLE001 - the refusal being explained matters more than this detail
        return f"which credentials were sent is not known ({type(exc).__name__}: {exc})"


def _endpoint_set() -> bool:
    return bool(os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"))


def _endpoint_of(exc: Exception | None = None) -> str:
    """scheme://host[:port] the request went to: the exception's URL where it has one (with virtual-host
    addressing the bucket is part of the host name), else the client's endpoint (AWS's own when none is set)."""
    url = getattr(exc, "kwargs", {}).get("endpoint_url") if exc is not None else None
    if not url:
        client = _CLIENTS.get(os.getpid())
        url = client.meta.endpoint_url if client is not None else os.environ.get("AWS_ENDPOINT_URL", "")
    parts = urlsplit(url or "")
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else (url or "AWS's default endpoint")


def _explain(exc: Exception, url: str, action: str, range_asked: str = "", body: bool = False) -> StorageError:
    """One line for what boto3 raised: which URL, which endpoint it went to, what went wrong, what to set. `body`:
    raised while a response's body streamed, which botocore does not retry (the store was reached, once)."""
    from botocore import exceptions as bx

    endpoint = _endpoint_of(exc)
    streamed = body and isinstance(exc, bx.ConnectionError | bx.HTTPClientError)
    if streamed:
        why = (f"the connection to {endpoint} broke while the body streamed ({' '.join(str(exc).split())}); botocore "
               "does not retry a body: try again")
    elif isinstance(exc, bx.NoCredentialsError):
        why = "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    elif isinstance(exc, bx.ConnectionError | bx.HTTPClientError):
        bucket, host = split_url(url)[0], urlsplit(endpoint).hostname or ""
        on_aws = host.endswith(".amazonaws.com")
        unset = "" if not on_aws or _endpoint_set() else " (AWS itself: AWS_ENDPOINT_URL is not set)"
        virtual = (f"; the bucket is in the host name (virtual-host addressing): for a store that wants "
                   f"http://HOST/{bucket}/KEY set addressing_style = path in the s3 section of the AWS config file "
                   "(docs/data.md)" if host.startswith(bucket + ".") and not on_aws else "")
        why = (f"cannot reach {endpoint}{unset} after {plural(_attempts(), 'attempt')} (AWS_MAX_ATTEMPTS; "
               f"{_timeouts_said()}): {' '.join(str(exc).split())}. Check "
               f"AWS_ENDPOINT_URL and the network{virtual}")
    elif isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "InvalidRange" or status == 416:
            asked = range_asked.split("=", 1)[-1] if range_asked else "the range"
            why = (f"bytes {asked} are past the object's end ({code or status}): it is shorter than when it was "
                   "indexed or listed")
        elif code == "NoSuchBucket":
            why = f"the bucket {split_url(url)[0]} does not exist at {endpoint} (AWS_ENDPOINT_URL)"
        elif code in ("NoSuchKey", "404", "NotFound") or status == 404:
            why = "no such object"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden") \
                or status == 403:
            why = (f"the store at {endpoint} refused the credentials ({code or status}; {_credentials_source()}): "
                   "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), the endpoint and the bucket's "
                   "permissions")
        else:
            why = f"{code or status}: {exc}"
    else:
        why = f"{type(exc).__name__}: {exc}"
    unreachable = isinstance(exc, bx.ConnectionError | bx.HTTPClientError) and not streamed
    kind = StoreUnreachable if unreachable else StorageError
    return kind(f"{url}: {action} failed: {why}")


def _s3_call(url: str, action: str, call, range_asked: str = "", body: bool = False):
    from botocore import exceptions as bx

    try:
        return call()
    except (bx.BotoCoreError, bx.ClientError) as exc:
        raise _explain(exc, url, action, range_asked, body) from exc


def exists(url: str | Path) -> bool:
    if not is_remote(url):
        return Path(url).exists()
    from botocore import exceptions as bx

    bucket, key = split_url(str(url))
    try:
        _client().head_object(Bucket=bucket, Key=key)
        return True
    except bx.ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise _explain(exc, str(url), "HEAD") from exc
    except bx.BotoCoreError as exc:
        raise _explain(exc, str(url), "HEAD") from exc


def size(url: str | Path) -> int:
    """The file's size in bytes: a stat, or one HEAD on S3 (for a ranged read of a file no record gives the size of:
    a range that ends at 0 is no range)."""
    if not is_remote(url):
        try:
            return Path(url).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"{Path(url).resolve()}: no such file") from None
        except OSError as exc:
            raise StorageError(f"{Path(url).resolve()}: {exc.strerror or exc}") from exc
    bucket, key = split_url(str(url))
    return int(_s3_call(str(url), "HEAD", lambda: _client().head_object(Bucket=bucket, Key=key))["ContentLength"])


def read_bytes(url: str | Path) -> bytes:
    if not is_remote(url):
        try:
            return Path(url).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{Path(url).resolve()}: no such file") from None
        except OSError as exc:
            raise StorageError(f"{Path(url).resolve()}: {exc.strerror or exc}") from exc
    bucket, key = split_url(str(url))
    body = _s3_call(str(url), "GET", lambda: _client().get_object(Bucket=bucket, Key=key)["Body"])
    return _s3_call(str(url), "GET", body.read, body=True)


def read_text(url: str | Path) -> str:
    return read_bytes(url).decode()


def open_range(url: str | Path, start: int, end: int) -> BinaryIO:
    """Bytes [start, end) as a stream: one ranged GET on S3, a seek on a local file. The caller closes it."""
    if end <= start:
        raise ValueError(f"empty range {start}-{end} of {url}")
    if not is_remote(url):
        try:
            handle = open(url, "rb")  # noqa: SIM115 - handed to the caller, who closes it
        except FileNotFoundError:
            raise StorageError(f"{Path(url).resolve()}: no such file") from None
        total = os.fstat(handle.fileno()).st_size
        handle.seek(start)
        return _Limited(handle, end - start, total)
    bucket, key = split_url(str(url))
    asked = f"bytes={start}-{end - 1}"
    response = _s3_call(str(url), "GET", lambda: _client().get_object(Bucket=bucket, Key=key, Range=asked), asked)
    content_range = response.get("ContentRange") or ""
    total = int(content_range.rsplit("/", 1)[1]) if "/" in content_range and content_range[-1] != "*" else None
    return _Limited(response["Body"], end - start, total, str(url), asked)


class _Limited:
    """A read-only stream of exactly `length` bytes from `raw` (a file positioned at the start, or an HTTP body);
    `total` is the whole file's size where the store says it (a check that the file is the one indexed). `url`, `asked`:
    an S3 body's object and range, so that a body that breaks while it streams is explained as read_bytes' are."""

    def __init__(self, raw, length: int, total: int | None = None, url: str | None = None, asked: str = "") -> None:
        self.raw, self.left, self.total, self.url, self.asked = raw, length, total, url, asked

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        if self.url is None:
            data = self.raw.read(size)
        else:
            data = _s3_call(self.url, "GET", lambda: self.raw.read(size), self.asked, body=True)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_files(prefix: str | Path, suffix: str = "", pages: int | None = None) -> list[StoredFile]:
    """Every file under a folder or s3:// prefix (recursively) whose name ends with `suffix`, sorted by name.
    Linked folders are followed (Path.rglob skipped them: a set spread over linked disks lost their tars unsaid),
    each real folder once. `pages` (S3 only): at most that many LIST pages of 1,000 keys, for a look at what a
    prefix holds (an error's hint) that must not list a million keys."""
    if not is_remote(prefix):
        root = Path(prefix)
        if not root.is_dir():
            raise StorageError(f"{root.resolve()}: " + ("a file, not a folder" if root.exists() else "no such folder"))
        found, seen = [], set()
        for folder, subfolders, files in os.walk(root, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a link back up the tree, or two links to one folder
                subfolders.clear()
                continue
            seen.add(real)
            for name in files:
                path = Path(folder, name)
                if name.endswith(suffix) and path.is_file():
                    stat = path.stat()
                    found.append(StoredFile(path.relative_to(root).as_posix(), stat.st_size, str(stat.st_mtime_ns)))
        return sorted(found, key=lambda f: f.name)
    bucket, key = split_url(str(prefix))
    key = key.rstrip("/") + "/" if key else ""
    found: list[StoredFile] = []
    for page in _s3_call(str(prefix), "LIST",
                         lambda: list(_client().get_paginator("list_objects_v2").paginate(
                             Bucket=bucket, Prefix=key, PaginationConfig={"MaxItems": pages * 1000} if pages else {}))):
        for item in page.get("Contents", []):
            name = item["Key"][len(key):]
            if name.endswith(suffix) and name:
                found.append(StoredFile(name, int(item["Size"]), str(item.get("ETag", ""))))
    return sorted(found, key=lambda f: f.name)


def upload(local: str | Path, url: str | Path) -> None:
    """Put a finished local file at `url`: multipart for big files on S3; temp + rename locally."""
    if not is_remote(url):
        target = Path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(local, tmp)
        fsync_path(tmp)
        tmp.replace(target)
        fsync_path(target.parent)
        return
    bucket, key = split_url(str(url))

    def put() -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore import exceptions as bx

        try:
            _client().upload_file(str(local), bucket, key)
        except S3UploadFailedError as exc:  # boto3 wraps the store's refusal (a ClientError) in an error of its own
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, bx.BotoCoreError | bx.ClientError):
                raise cause from None  # explained by _s3_call as any other request's
            raise StorageError(f"{url}: PUT failed: {' '.join(str(exc).split())}") from exc

    _s3_call(str(url), "PUT", put)


def write_bytes(url: str | Path, data: bytes) -> None:
    """Put a small file (an index, a record, a manifest): one PUT on S3; temp + rename locally, so that a
    reader never sees half of it."""
    if not is_remote(url):
        target = Path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        with replacing(target) as tmp:
            tmp.write_bytes(data)
        return
    bucket, key = split_url(str(url))
    _s3_call(str(url), "PUT", lambda: _client().put_object(Bucket=bucket, Key=key, Body=data))


def write_text(url: str | Path, text: str) -> None:
    write_bytes(url, text.encode())


def delete(url: str | Path) -> None:
    """Remove a file or object; one that is already gone is not an error."""
    if not is_remote(url):
        Path(url).unlink(missing_ok=True)
        return
    bucket, key = split_url(str(url))
    _s3_call(str(url), "DELETE", lambda: _client().delete_object(Bucket=bucket, Key=key))


def iter_chunks(stream: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk
