"""Shared fixtures. Models here are real MixMAE modules at a small shape so that CPU tests stay fast."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def small_shape():
    from mixmae_scale.models.swin import SwinShape

    # 128 px: stages at 32, 16, 8, 4 tokens; a 4x4 mask grid; 16 windows in stage 1, 4 in stage 2.
    return SwinShape(img_size=128, patch_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                     window_size=(8, 8, 8, 4))


@pytest.fixture
def small_mixmae(small_shape):
    import torch

    from mixmae_scale.models.mixmae import MixMAE

    torch.manual_seed(0)
    return MixMAE(small_shape, decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()


@pytest.fixture
def gloo_of_one(tmp_path):
    """A gloo process group of one rank in this process, without DeepSpeed: what the checkpoint store's barriers and
    an evaluation's all-reduce meet in. Every run folder the test's code locked is released after it: a lock is held
    by this process until released (engine/run_lock.py), so it would outlive the test and its group."""
    import torch.distributed as dist

    from mixmae_scale.engine import run_lock

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    run_lock.release_all()


@pytest.fixture
def world_of_one(tmp_path, monkeypatch):
    """A gloo process group of one rank in this process, as DeepSpeed's engine wants one (a real engine's
    checkpoints in a unit test). DeepSpeed keeps the groups it derives in module globals, which would outlive the
    group (scaling/in_process.py forgets them alike)."""
    import importlib

    import deepspeed
    import torch.distributed as dist

    from mixmae_scale.engine.distributed import skip_shm_allreduce_op

    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    importlib.reload(deepspeed.utils.groups)
    skip_shm_allreduce_op()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    deepspeed.init_distributed("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
        importlib.reload(deepspeed.utils.groups)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The real demo dataset, small: 10 classes x 30 train / 8 val images, 64 samples per shard."""
    from mixmae_scale.shards.convert import ConvertOptions, convert
    from mixmae_scale.shards.demo import build_demo_images

    root = tmp_path_factory.mktemp("demo")
    build_demo_images(root / "images", train_per_class=30, val_per_class=8, seed=0)
    convert(root / "images", root / "shards", ConvertOptions(layout="imagenet", samples_per_shard=64,
                                                             shard_bytes=None))
    return root / "shards"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode) on the loopback, and the standard AWS environment that
    points boto3 (and every subprocess a test starts) at it. Yields the endpoint URL."""
    import logging

    from free_port import free_port
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the loopback S3 server, named after the test."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-" + os.urandom(3).hex()
    boto3.client("s3").create_bucket(Bucket=name)
    return name
