"""What a user meets when the object store is not where, or not what, the AWS settings say: against a real
S3-protocol server (moto) on the loopback, a dead port and a port that accepts connections and never answers
(a firewall that drops, a proxy that hangs: the case that used to wait minutes in silence)."""

from __future__ import annotations

import logging
import os
import socket
import time
from types import SimpleNamespace

import pytest

from mixmae_scale.data import storage


@pytest.fixture
def fresh_clients(monkeypatch):
    """storage keeps one boto3 client per process; a test that changes the AWS settings needs a new one."""
    monkeypatch.setattr(storage, "_CLIENTS", {})
    yield
    storage._CLIENTS.clear()


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections (the kernel's backlog does) and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield listener.getsockname()[1]
    listener.close()


def test_a_store_that_never_answers_fails_within_the_timeouts_attempts_warning_once_and_naming_the_url(
        s3_server, silent_port, monkeypatch, fresh_clients, caplog):
    """AWS_MAX_ATTEMPTS is botocore's own knob and is obeyed (a fixed 8 attempts of a 60 s read each was a
    silent 8 minutes); so is MIXMAE_S3_READ_TIMEOUT, ours; the first retry of a connection says so at once, and
    the error names the URL tried and the timeouts waited."""
    monkeypatch.setenv("MIXMAE_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent_port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(storage.StorageError) as raised:
        storage.list_files("s3://some-bucket/some/prefix")
    assert time.monotonic() - start < 10
    message = str(raised.value)
    assert message.startswith("s3://some-bucket/some/prefix: LIST failed: ")
    assert f"http://127.0.0.1:{silent_port}" in message and "2 attempts" in message and "AWS_MAX_ATTEMPTS" in message
    assert "read timeout 1 s (MIXMAE_S3_READ_TIMEOUT)" in message
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 1 and f"http://127.0.0.1:{silent_port}" in retries[0], retries


def test_a_dead_port_names_the_endpoint_the_client_used(s3_server, monkeypatch, fresh_clients):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.StorageError) as raised:
        storage.read_bytes("s3://some-bucket/a/key.tar")
    message = str(raised.value)
    assert message.startswith("s3://some-bucket/a/key.tar: GET failed: cannot reach ")
    assert f"http://127.0.0.1:{port}" in message


def test_virtual_host_addressing_from_the_aws_config_file_is_used_and_named_when_it_fails(
        s3_server, s3_bucket, tmp_path, monkeypatch, fresh_clients):
    """A MinIO or Ceph user sets `addressing_style` in the AWS config file (botocore has no variable for it); it
    reaches this client, and when the bucket's own host name does not resolve the error names that host, not
    AWS_ENDPOINT_URL's, with the setting to change."""
    port = s3_server.rsplit(":", 1)[1]
    config = tmp_path / "aws_config"
    config.write_text("[default]\ns3 =\n  addressing_style = path\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://localhost:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.write_bytes(f"s3://{s3_bucket}/x/a.bin", b"abc")
    assert storage.read_bytes(f"s3://{s3_bucket}/x/a.bin") == b"abc"  # path style: http://localhost:PORT/BUCKET/...

    config.write_text("[default]\ns3 =\n  addressing_style = virtual\n")
    storage._CLIENTS.clear()
    with pytest.raises(storage.StorageError) as raised:
        storage.read_bytes(f"s3://{s3_bucket}/x/a.bin")
    message = str(raised.value)
    assert f"http://{s3_bucket}.localhost:{port}" in message and "addressing_style = path" in message, message
    assert "\n" not in message


def test_a_missing_bucket_names_the_bucket_and_the_endpoint(s3_server, fresh_clients):
    with pytest.raises(storage.StorageError) as raised:
        storage.list_files("s3://no-such-bucket-here/prefix")
    assert str(raised.value) == (f"s3://no-such-bucket-here/prefix: LIST failed: the bucket no-such-bucket-here does "
                                 f"not exist at {s3_server} (AWS_ENDPOINT_URL)")


def test_listing_pages_past_a_thousand_keys(s3_bucket):
    """S3 answers a listing 1,000 keys at a time; every page is read (a set of 1,001 tars keeps its last)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    client = boto3.client("s3")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=s3_bucket, Key=f"p/{i:05d}.tar", Body=b"x"), range(1001)))
    client.put_object(Bucket=s3_bucket, Key="p/readme.txt", Body=b"x")
    found = storage.list_files(f"s3://{s3_bucket}/p", ".tar")
    assert [f.name for f in found] == [f"{i:05d}.tar" for i in range(1001)]


def test_a_range_past_the_end_of_an_object_says_it_is_shorter_than_asked(s3_bucket):
    """A shard cut short in the bucket after it was indexed: a rank's range past its new end is refused by the store
    (416); the error says which range and that the object ends before it, not only the store's code."""
    storage.write_bytes(f"s3://{s3_bucket}/set/0.tar", b"abc")
    with pytest.raises(storage.StorageError) as raised:
        storage.open_range(f"s3://{s3_bucket}/set/0.tar", 10, 20)
    assert str(raised.value) == (f"s3://{s3_bucket}/set/0.tar: GET failed: bytes 10-19 are past the object's end "
                                 "(InvalidRange): it is shorter than when it was indexed or listed")


@pytest.fixture
def checking_server(tmp_path):
    """moto's server checking keys (its INITIAL_NO_AUTH_ACTION_COUNT=0: every request authenticated), in a process
    of its own since the switch is process-wide; it knows no keys, so any is refused as a real store refuses one."""
    import subprocess
    import sys
    import urllib.request

    from free_port import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)  # noqa: S310 - the loopback
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def test_refused_keys_name_the_endpoint_the_key_id_and_where_it_was_found(checking_server, monkeypatch,
                                                                           fresh_clients):
    monkeypatch.setenv("AWS_ENDPOINT_URL", checking_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLEFTINTHESHELL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-shown")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with pytest.raises(storage.StorageError) as raised:
        storage.list_files("s3://some-bucket/prefix")
    message = str(raised.value)
    assert message == ("s3://some-bucket/prefix: LIST failed: the store at " + checking_server + " refused the "
                       "credentials (InvalidAccessKeyId; access key id AKIDLEFTINTHESHELL from env): check "
                       "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), the endpoint and the bucket's "
                       "permissions")


def test_adoption_does_not_retry_a_store_botocore_could_not_reach_and_still_retries_a_dropped_body(
        s3_server, monkeypatch, fresh_clients, tmp_path):
    """Adoption's own retries (after 1, 4 and 16 s) came on top of botocore's attempts: a store that died mid-adoption
    was tried 4 x AWS_MAX_ATTEMPTS times per tar, each waiting up to the connect timeout, before the tar was said
    unreadable. botocore has retried the request; adoption says so at once, and the next run tries the tar again.
    A connection dropped while the body streams is not botocore's to retry, and adoption still does."""
    from botocore.exceptions import ResponseStreamingError

    from mixmae_scale.shards import adopt, transient

    slept: list[float] = []
    monkeypatch.setattr(transient, "time", SimpleNamespace(sleep=slept.append))  # adoption's waits, not botocore's
    with socket.socket() as probe:  # a port nothing listens on: the store died
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    job = adopt._Job("a.tar", "s3://some-bucket/set/a.tar", 10240, str(tmp_path / "out"), "train", False)
    said = adopt.index_shard(job)
    assert said.startswith("s3://some-bucket/set/a.tar: GET failed: cannot reach ") and "2 attempts" in said
    assert slept == []  # no round of adoption's own on top of botocore's two attempts
    with pytest.raises(storage.StoreUnreachable) as raised:
        storage.read_bytes("s3://some-bucket/set/a.tar")
    assert transient.is_transient(raised.value)  # still a failure that may pass: the next run tries the tar again

    drops = iter([ResponseStreamingError(error="Connection broken: IncompleteRead")])

    def read() -> bytes:
        for error in drops:
            raise error
        return b"tar"

    assert transient.retrying(read) == b"tar" and slept == [1.0]


def test_the_timeouts_are_the_users_where_set_and_ours_where_not(monkeypatch, fresh_clients):
    """botocore has no variable for its read timeout: a store far away or slow to send a first byte needed more
    than our 60 s and had no way to say so. MIXMAE_S3_READ_TIMEOUT and MIXMAE_S3_CONNECT_TIMEOUT are read where
    the client is made, in every process that makes one."""
    monkeypatch.delenv("MIXMAE_S3_READ_TIMEOUT", raising=False)
    monkeypatch.delenv("MIXMAE_S3_CONNECT_TIMEOUT", raising=False)
    config = storage._client().meta.config
    assert (config.connect_timeout, config.read_timeout) == (storage.CONNECT_TIMEOUT_S, storage.READ_TIMEOUT_S)
    storage._CLIENTS.clear()
    monkeypatch.setenv("MIXMAE_S3_READ_TIMEOUT", "300")
    monkeypatch.setenv("MIXMAE_S3_CONNECT_TIMEOUT", "2.5")
    config = storage._client().meta.config
    assert (config.connect_timeout, config.read_timeout) == (2.5, 300)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan", ""])
def test_a_timeout_that_is_not_a_positive_number_is_refused_naming_the_variable_and_the_value(
        monkeypatch, fresh_clients, value):
    monkeypatch.setenv("MIXMAE_S3_READ_TIMEOUT", value)
    monkeypatch.delenv("MIXMAE_S3_CONNECT_TIMEOUT", raising=False)
    with pytest.raises(storage.StorageError, match=(
            rf"^MIXMAE_S3_READ_TIMEOUT={value!r}: not a positive number of seconds \(the object store's read "
            r"timeout; unset, 60 s\)$")):
        storage._client()


@pytest.mark.parametrize(("env_mode", "file_mode", "expected"), [
    (None, None, "adaptive"), ("standard", None, "standard"), (None, "legacy", "legacy")])
def test_the_retry_mode_is_adaptive_unless_the_user_sets_one(monkeypatch, fresh_clients, tmp_path, env_mode,
                                                             file_mode, expected):
    """docs/data.md: retries unset are 8 attempts, `adaptive`; AWS_RETRY_MODE or the config file's retry_mode are
    the user's. botocore's lookup with methods=("env", "config") still answers its default ('standard'), so the
    user's setting cannot be told from none that way: the client was always 'standard'."""
    config = tmp_path / "aws_config"
    config.write_text("[default]\n" + (f"retry_mode = {file_mode}\n" if file_mode else ""))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if env_mode:
        monkeypatch.setenv("AWS_RETRY_MODE", env_mode)
    else:
        monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    retries = storage._client().meta.config.retries
    assert retries["mode"] == expected and retries["total_max_attempts"] == storage.ATTEMPTS


@pytest.mark.parametrize("error", ["streaming", "read_timeout"])
def test_a_body_that_breaks_while_it_streams_is_not_said_unreachable(monkeypatch, fresh_clients, error):
    """botocore retries a request, not the reading of its body: a connection dropped (or timed out) while the body
    streams reached the store and was tried once. It was said as 'cannot reach ... after 8 attempt(s)' and raised
    as StoreUnreachable, which `transient.retrying` does not retry."""
    from botocore.exceptions import ReadTimeoutError, ResponseStreamingError

    from mixmae_scale.shards import transient

    broken = (ResponseStreamingError(error="Connection broken: IncompleteRead") if error == "streaming"
              else ReadTimeoutError(endpoint_url="http://127.0.0.1:9/bucket/key"))

    class Body:
        def read(self):
            raise broken

    client = SimpleNamespace(get_object=lambda **_: {"Body": Body()},
                             meta=SimpleNamespace(endpoint_url="http://127.0.0.1:9"))
    monkeypatch.setitem(storage._CLIENTS, os.getpid(), client)
    with pytest.raises(storage.StorageError) as raised:
        storage.read_bytes("s3://bucket/key")
    assert not isinstance(raised.value, storage.StoreUnreachable)
    assert "cannot reach" not in str(raised.value) and "attempt" not in str(raised.value)
    assert transient.is_transient(raised.value)


def test_an_upload_the_store_refuses_is_a_storage_error_naming_the_bucket(s3_server, fresh_clients, tmp_path):
    """boto3's upload_file turns the store's refusal (a ClientError) into its own S3UploadFailedError, which is no
    botocore error: it escaped `_s3_call` as a traceback (a conversion into a bucket that does not exist)."""
    local = tmp_path / "shard.tar"
    local.write_bytes(b"tar")
    with pytest.raises(storage.StorageError) as raised:
        storage.upload(local, "s3://no-such-bucket-here/set/shard.tar")
    assert str(raised.value) == (f"s3://no-such-bucket-here/set/shard.tar: PUT failed: the bucket no-such-bucket-here "
                                 f"does not exist at {s3_server} (AWS_ENDPOINT_URL)")


def test_refused_keys_are_explained_even_where_resolving_credentials_again_would_raise(checking_server, monkeypatch,
                                                                                         fresh_clients):
    """An assume-role, credential_process or SSO profile resolves by calling out, which may fail or hang: the
    message that explains a refusal must not resolve them again, nor let a failure there replace the refusal."""
    import botocore.session
    from botocore.exceptions import CredentialRetrievalError

    monkeypatch.setenv("AWS_ENDPOINT_URL", checking_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLEFTINTHESHELL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-shown")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage._client()  # the client resolved its credentials; from now on resolving them again fails

    def fails(self):
        raise CredentialRetrievalError(provider="custom-process", error_msg="the role's session expired")

    monkeypatch.setattr(botocore.session.Session, "get_credentials", fails)
    with pytest.raises(storage.StorageError) as raised:
        storage.list_files("s3://some-bucket/prefix")
    message = str(raised.value)
    said = "the credentials (InvalidAccessKeyId; access key id AKIDLEFTINTHESHELL from env)"
    assert message.startswith(f"s3://some-bucket/prefix: LIST failed: the store at {checking_server} refused {said}")


def test_a_ranged_body_that_breaks_is_a_storage_error_naming_the_url(monkeypatch):
    """The shard reader's reads are ranged GETs whose bodies stream through `open_range`'s stream: a connection that
    broke there escaped as botocore's ResponseStreamingError, unnamed, through the training thread (read_bytes'
    bodies were explained, these were not)."""
    from botocore.exceptions import ResponseStreamingError

    from mixmae_scale.shards import transient

    class Body:
        def read(self, size=-1):
            raise ResponseStreamingError(error="Connection broken: IncompleteRead")

        def close(self):
            pass

    client = SimpleNamespace(get_object=lambda **_: {"Body": Body(), "ContentRange": "bytes 0-9/100"},
                             meta=SimpleNamespace(endpoint_url="http://127.0.0.1:9"))
    monkeypatch.setitem(storage._CLIENTS, os.getpid(), client)
    with storage.open_range("s3://bucket/shard.tar", 0, 10) as stream, pytest.raises(storage.StorageError) as raised:
        stream.read(4)
    assert str(raised.value).startswith("s3://bucket/shard.tar: GET failed: the connection to")
    assert not isinstance(raised.value, storage.StoreUnreachable) and transient.is_transient(raised.value)


def test_a_prefix_without_a_manifest_says_what_it_holds_and_the_command_that_makes_it_a_set(s3_bucket):
    """`mixmae shards verify s3://b/laion-part` (or `data.shards=` it) over the tars a download left, not yet adopted,
    said only `GET failed: no such object`; a local folder of tars names `mixmae shards adopt`. Now the store's
    prefix is said as the folder is: its tars and the command, an unfinished build, or nothing at all there."""
    import boto3

    from mixmae_scale.data.errors import DataError
    from mixmae_scale.data.manifest import load_manifest

    client = boto3.client("s3")
    for name in ("laion/00000.tar", "laion/00001.tar", "laion/00000.parquet", "begun/.progress/adopt/train/0.tar.json"):
        client.put_object(Bucket=s3_bucket, Key=name, Body=b"x")
    said = {}
    for prefix in ("laion", "begun", "nothing"):
        with pytest.raises(DataError) as caught:
            load_manifest(f"s3://{s3_bucket}/{prefix}")
        said[prefix] = str(caught.value)
        assert said[prefix].startswith(f"s3://{s3_bucket}/{prefix} is not a shard set (it has no dataset.json)")
        assert "\n" not in said[prefix]
    assert f"2 .tar files are there (00000.tar, 00001.tar): `mixmae shards adopt s3://{s3_bucket}/laion --out " \
        in said["laion"], said["laion"]
    assert "unfinished adoption" in said["begun"] and "run that command again" in said["begun"], said["begun"]
    assert "nothing is stored under it" in said["nothing"], said["nothing"]


def test_a_prefix_whose_only_tars_are_hidden_is_not_sent_to_adoption(s3_bucket):
    """`._00000.tar` (macOS's AppleDouble file, copied up with the set) was offered as '1 .tar file is there' with
    `mixmae shards adopt`, which skips hidden tars and would find nothing: the prefix says it holds no tars."""
    import boto3

    from mixmae_scale.data.errors import DataError
    from mixmae_scale.data.manifest import load_manifest

    client = boto3.client("s3")
    for name in ("mac/._00000.tar", "mac/.Trash-1000/old.tar", "mac/readme.txt"):
        client.put_object(Bucket=s3_bucket, Key=name, Body=b"x")
    with pytest.raises(DataError) as caught:
        load_manifest(f"s3://{s3_bucket}/mac")
    said = str(caught.value)
    assert "shards adopt" not in said and "it holds no shards or .tar files" in said, said
