"""Shards in object storage: a real S3-compatible server (moto's server mode) on localhost.

Real litdata shards are written locally, uploaded to the server, then discovered, mixed and
streamed through ``s3://`` URLs with ``storage_options`` naming the endpoint and credentials.
The server speaks https with a certificate from a throwaway test CA: litdata fetches chunks with
obstore, which refuses plain http (``SSL_CERT_FILE`` makes obstore trust the CA, ``verify`` boto3).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from midtrain.cli import run
from midtrain.data.mixture import MixtureSpec, resolve_mixture
from midtrain.data.shards import discover_shards, load_shard
from midtrain.errors import MidtrainError
from midtrain.rundir import find_latest, read_train_state
from tests.synthetic import write_tree

pytestmark = pytest.mark.slow  # spawns an S3 server process and training subprocesses

LAYOUT = {"1": 9_000, "2": 5_000, "c1": 4_000, "m1": 3_000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_test_ca(root: Path) -> tuple[Path, Path, Path]:
    """A CA certificate and a server certificate/key for 127.0.0.1 signed by it (valid for a day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, signer, ca: bool, *extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for ext in extensions:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = root / "ca.pem", root / "server.pem", root / "server.key"
    paths[0].write_bytes(cert("midtrain test CA", ca_key, "midtrain test CA", ca_key, True))
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    paths[1].write_bytes(cert("127.0.0.1", key, "midtrain test CA", ca_key, False, san, usage))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """``storage_options`` for an https moto S3 server started for this module (stopped at its end)."""
    ca, cert, key = _write_test_ca(tmp_path_factory.mktemp("tls"))
    port = _free_port()
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port), "-c", str(cert), "-k", str(key)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on port {port} (exit code {proc.poll()})") from None
            time.sleep(0.2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(ca))  # obstore (litdata's chunk downloads) trusts the test CA
        yield {
            "endpoint_url": f"https://127.0.0.1:{port}",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
            "verify": str(ca),
        }
    proc.terminate()
    proc.wait(timeout=30)


def _client(options: dict):
    import boto3

    return boto3.Session().client("s3", **options)


def _upload(options: dict, local: Path, url: str) -> None:
    """Copy the directory ``local`` to ``s3://bucket/prefix`` (the bucket is created when missing)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = _client(options)
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(local).as_posix()}", Body=path.read_bytes())


@pytest.fixture(scope="module")
def remote_tree(s3_server, tmp_path_factory) -> tuple[Path, str]:
    """The same shard tree locally and under a fresh ``s3://`` prefix (plus non-shard dirs that are ignored)."""
    tmp_path = tmp_path_factory.mktemp("tree")
    local = write_tree(tmp_path / "data", LAYOUT, chunk_tokens=1_100, sequential=True)
    url = f"s3://midtrain-{uuid.uuid4().hex[:12]}/corpus/data"
    _upload(s3_server, local, url)
    write_tree(tmp_path / "extra", {"val": 2_000, "tokenizer": 1_000}, chunk_tokens=1_100)  # not shard names
    _upload(s3_server, tmp_path / "extra", url)
    return local, url


def _summary(shards) -> list[tuple]:
    return [(s.id, s.type, s.tokens, s.num_chunks, s.dtype_code, s.min_chunk_tokens, s.chunk_dims) for s in shards]


def test_discovery_lists_the_prefix_and_reads_token_counts(s3_server, remote_tree):
    local, url = remote_tree
    remote = discover_shards(url, storage_options=s3_server)
    assert [s.id for s in remote] == ["main/1", "main/2", "c1", "m1"]
    assert _summary(remote) == _summary(discover_shards(local))
    assert [s.path for s in remote] == [f"{url}/1", f"{url}/2", f"{url}/c1", f"{url}/m1"]
    assert remote[0].samples(33) == discover_shards(local)[0].samples(33)
    shard = load_shard("val", "val", f"{url}/c1/", storage_options=s3_server)  # a validation path
    assert (shard.tokens, shard.path) == (LAYOUT["c1"], f"{url}/c1")


def test_mixture_over_remote_shards_equals_local(s3_server, remote_tree):
    local, url = remote_tree
    for spec in (
        MixtureSpec(mix_weights_str="main:0.7,code:0.2,math:0.1", divide_by_tokens=True),
        MixtureSpec(proportional_sampling=True),
        MixtureSpec(literal_weights_str="main/2:0.5,c1:0.5"),
    ):
        remote = resolve_mixture(spec, discover_shards(url, storage_options=s3_server))
        assert remote.weights_by_id() == resolve_mixture(spec, discover_shards(local)).weights_by_id()


@pytest.mark.filterwarnings("ignore:The given buffer is not writable")
def test_litdata_streams_remote_shards_with_the_storage_options(s3_server, remote_tree, tmp_path):
    from litdata import StreamingDataset, TokensLoader

    local, url = remote_tree
    shard = discover_shards(url, storage_options=s3_server)[2]
    loader = TokensLoader(block_size=65)
    remote = StreamingDataset(
        shard.path, item_loader=loader, shuffle=False, storage_options=s3_server, cache_dir=str(tmp_path / "cache")
    )
    ours = StreamingDataset(str(local / "c1"), item_loader=TokensLoader(block_size=65), shuffle=False)
    assert len(remote) == len(ours) == shard.samples(65)
    assert all(torch.equal(remote[i], ours[i]) for i in range(len(ours)))


def test_remote_errors_name_the_problem(s3_server, remote_tree):
    _, url = remote_tree
    bucket = url.removeprefix("s3://").split("/")[0]
    client = _client(s3_server)
    with pytest.raises(MidtrainError, match=r"No shards under s3://.*/nothing/here"):
        discover_shards(f"s3://{bucket}/nothing/here", storage_options=s3_server)
    with pytest.raises(MidtrainError, match=r"Cannot list s3://no-such-bucket-x1/data: .*NoSuchBucket"):
        discover_shards("s3://no-such-bucket-x1/data", storage_options=s3_server)

    url, key = f"s3://{bucket}/broken", "broken"
    client.put_object(Bucket=bucket, Key=f"{key}/c1/index.json", Body=(remote_tree[0] / "c1/index.json").read_bytes())
    client.put_object(Bucket=bucket, Key=f"{key}/c2/chunk-0-0.bin", Body=b"\0")  # a shard dir without index.json
    with pytest.raises(MidtrainError, match=r"Shard directory s3://.*/c2 has no index.json"):
        discover_shards(url, storage_options=s3_server)
    client.put_object(Bucket=bucket, Key=f"{key}/c2/index.json", Body=b'{"chunks": [')
    with pytest.raises(MidtrainError, match=r"Corrupt index.json in s3://.*/c2"):
        discover_shards(url, storage_options=s3_server)

    dead = {**s3_server, "endpoint_url": f"https://127.0.0.1:{_free_port()}"}  # nothing listens there
    with pytest.raises(MidtrainError, match=r"Cannot list .*EndpointConnectionError.*Check the bucket"):
        discover_shards(url, storage_options=dead)
    plain = {**s3_server, "endpoint_url": s3_server["endpoint_url"].replace("https:", "http:")}
    with pytest.raises(MidtrainError, match=r"plain-http endpoint http://127.0.0.1:\d+: .* serve it over https"):
        discover_shards(url, storage_options=plain)
    with pytest.raises(MidtrainError, match=r"storage_options \['endpoint_url', 'endpoint_urll'.*not all boto3"):
        discover_shards(url, storage_options={"endpoint_url": s3_server["endpoint_url"], "endpoint_urll": "x"})


MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 512}


def _train_config(out: Path, data_path: str, val_path: str, storage_options: dict | None) -> Path:
    cfg = {
        "model_config": MODEL,
        "out_dir": str(out),
        "precision": "32-true",
        "accelerator": "cpu",
        "devices": 1,
        "data": {
            "class_path": "midtrain.data.ShardedMixedDataset",
            "init_args": {
                "data_path": data_path,
                "val_data_path": {"v": val_path},
                "mix_weights_str": "main:0.6,code:0.3,math:0.1",
                "storage_options": storage_options,
                "num_workers": 2,
            },
        },
        "train": {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 4, "save_interval": 3},
        "eval": {"interval": 3, "max_samples": 16, "final_validation": True},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(out: Path) -> dict[tuple[int, str], float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in rows for k, v in r.items() if k == "loss" or k.startswith("val/")}


def test_training_and_resume_stream_remote_shards(s3_server, remote_tree, tmp_path, capsys):
    """A few training steps and a resume read the shards from the server; losses equal a local run's."""
    bucket = remote_tree[1].removeprefix("s3://").split("/")[0]
    local = write_tree(tmp_path / "corpus", {**LAYOUT, "val": 3_000}, chunk_tokens=1_100)  # token IDs < 512
    _upload(s3_server, local, f"s3://{bucket}/train")
    here = tmp_path / "local"
    run("pretrain", ["--config", str(_train_config(here, str(local), str(local / "val"), None))])

    remote = tmp_path / "remote"
    cfg = _train_config(remote, f"s3://{bucket}/train", f"s3://{bucket}/train/val", s3_server)
    capsys.readouterr()
    plan = run("inspect", ["--config", str(cfg)])  # the dry run: mixture table of the remote shards
    assert f"data_path: s3://{bucket}/train (4 shards, 21,000 tokens)" in capsys.readouterr().out
    fresh = ["--out_dir", str(tmp_path / "fresh")]  # `here` has finished; inspect plans from where a run continues
    assert [(r.shard_id, r.tokens, r.weight) for r in plan] == [
        (r.shard_id, r.tokens, r.weight) for r in run("inspect", ["--config", str(here.with_suffix(".yaml")), *fresh])
    ]
    cache = tmp_path / "litdata-cache"
    env = {**os.environ, "LITDATA_CACHE_DIR": str(cache), "AWS_EC2_METADATA_DISABLED": "true"}
    for args in (["--train.max_additional_steps", "3"], ["--resume", "auto"]):  # steps 1-3, then resume 4-6
        cmd = [sys.executable, "-m", "midtrain", "pretrain", "--config", str(cfg), *args]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert read_train_state(find_latest(remote))["step"] == 6
    expected, got = _metrics(here), _metrics(remote)
    assert sorted(k for k in got if k[1] == "loss") == [(s, "loss") for s in range(1, 7)]
    assert got.keys() == expected.keys() and got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert sorted(p.name for p in cache.rglob("chunk-*.bin")), "litdata cached the streamed chunks"


def test_similarity_and_evaluate_take_remote_paths(s3_server, remote_tree, monkeypatch):
    """Both commands read shards through the storage layer; credentials and endpoint come from the environment."""
    from midtrain.eval.losses import ValSet, parse_val_sets
    from midtrain.eval.similarity import resolve_source

    local, url = remote_tree
    env = {"endpoint_url": "AWS_ENDPOINT_URL", "aws_access_key_id": "AWS_ACCESS_KEY_ID",
           "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY", "region_name": "AWS_DEFAULT_REGION",
           "verify": "AWS_CA_BUNDLE"}  # fmt: skip
    for option, name in env.items():
        monkeypatch.setenv(name, s3_server[option])
    whole, code, one = (resolve_source(spec) for spec in (url, f"{url}:code", f"{url}/c1/"))
    assert _summary(whole.shards) == _summary(resolve_source(str(local)).shards)
    assert [s.id for s in code.shards] == [s.id for s in one.shards] == ["c1"]
    assert one.shards[0].path == f"{url}/c1"
    assert parse_val_sets([f"v={url}/c1/"]) == [ValSet("v", f"{url}/c1", "tokens")]
