"""The run store behind a URL (runs.remote): publish, download and verify, claims, a damaged object, and the
errors a user sees at session start. Against a real S3 HTTP server (moto's server mode) and file:// URLs."""

from __future__ import annotations

import json
import time

import pytest

from flannel_repro.errors import ArtifactWarning, ConfigError, RunMissing
from flannel_repro.runs.remote import RemoteStore, redact
from flannel_repro.runs.store import open_store
from tests.conftest import TINY

CFG = TINY.replace(steps=3)


def _digests(traj):
    return [traj.digest_hex(s) for s in range(traj.steps + 1)]


def _log_lines(cache):
    log = cache / "training.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(params=["s3", "file"])
def store_url(request, tmp_path):
    """A URL store: an S3 bucket on the test server, or a file:// folder."""
    if request.param == "s3":
        server, bucket = request.getfixturevalue("s3")
        return f"s3://{bucket}/runs"
    return (tmp_path / "shared").as_uri()


def test_published_run_is_downloaded_verified_and_bitwise_equal(store_url, tmp_path):
    a = open_store(store_url, cache=tmp_path / "cache-a", check=True).obtain(CFG)
    assert a.trained and not a.fetched
    remote = RemoteStore(store_url)
    manifest = remote.lookup(a.trajectory.path.stem)
    assert manifest is not None and manifest.key == a.trajectory.run_key
    assert manifest.numerics_class and manifest.run_key_material["repeat"] == 0

    b = open_store(store_url, cache=tmp_path / "cache-b", check=True).obtain(CFG)  # another machine: empty cache
    assert b.fetched and not b.trained
    assert _digests(b.trajectory) == _digests(a.trajectory)
    assert _log_lines(tmp_path / "cache-b") == []  # nothing trained there
    again = open_store(store_url, cache=tmp_path / "cache-b").obtain(CFG)  # now from the local cache
    assert not again.fetched and not again.trained


def _flip_byte(remote, manifest, offset_from_end=100):
    path = remote._path(manifest.object)
    data = bytearray(remote.fs.cat_file(path))
    data[-offset_from_end] ^= 0x01
    remote.fs.pipe_file(path, bytes(data))
    return bytes(data)


def test_damaged_object_is_detected_retrained_and_replaced(store_url, tmp_path):
    a = open_store(store_url, cache=tmp_path / "a").obtain(CFG)
    remote = RemoteStore(store_url)
    manifest = remote.lookup(a.trajectory.path.stem)
    _flip_byte(remote, manifest)

    b = open_store(store_url, cache=tmp_path / "b").obtain(CFG)  # the manifest's digest catches it first
    assert b.trained and "the store's object failed verification" in b.replaced and "blake2b" in b.replaced
    assert _digests(b.trajectory) == _digests(a.trajectory)
    fixed = remote.lookup(a.trajectory.path.stem)
    assert fixed.blake2b != manifest.blake2b  # republished over the damaged one
    c = open_store(store_url, cache=tmp_path / "c").obtain(CFG)
    assert c.fetched and _digests(c.trajectory) == _digests(a.trajectory)


def test_damage_that_matches_its_manifest_is_caught_by_the_artifact_digests(store_url, tmp_path):
    """An object rewritten with its manifest updated to match still fails: the run's own digests disagree."""
    from flannel_repro.runs.remote import Manifest, file_digest

    a = open_store(store_url, cache=tmp_path / "a").obtain(CFG)
    remote = RemoteStore(store_url)
    manifest = remote.lookup(a.trajectory.path.stem)
    data = _flip_byte(remote, manifest)
    local = tmp_path / "edited.safetensors"
    local.write_bytes(data)
    digest, size = file_digest(local)
    forged = Manifest(**{**manifest.__dict__, "blake2b": digest, "size": size})
    remote.fs.pipe_file(remote.manifest_path(manifest.run), forged.to_json())

    with pytest.warns(ArtifactWarning, match="failed verification"):
        b = open_store(store_url, cache=tmp_path / "b").obtain(CFG)
    assert b.trained and "failed verification" in b.replaced
    assert _digests(b.trajectory) == _digests(a.trajectory)


def test_no_train_store_names_the_missing_run(store_url, tmp_path):
    store = open_store(store_url, cache=tmp_path / "a", train=False)
    with pytest.raises(RunMissing, match=r"expected this run in the store .* got none .*--flannel-no-train"):
        store.obtain(CFG)
    assert _log_lines(tmp_path / "a") == []


def test_a_live_claim_is_waited_for_and_an_expired_one_taken_over(store_url, tmp_path):
    remote = RemoteStore(store_url, claim_ttl_s=0.5)
    remote.check()
    assert remote.exclusive  # moto honours If-None-Match; a local file system links
    ours, holder = remote.try_claim("run-x", "machine-a")
    assert ours is not None and holder is None
    none, holder = remote.try_claim("run-x", "machine-b")
    assert none is None and holder.owner == "machine-a"
    time.sleep(0.6)
    taken, holder = remote.try_claim("run-x", "machine-b")  # machine-a stopped renewing: taken over
    assert taken is not None and taken.generation == 1 and taken.owner == "machine-b"
    assert [c.owner for c in remote.claims()] == ["machine-b"]
    remote.release(taken)
    assert remote.claims() == []


def test_first_publish_wins_and_the_loser_uses_it(store_url, tmp_path):
    """Two machines that could not coordinate both trained a key: the second publish is refused (conditional
    create), nothing is overwritten, and the second machine uses the published run."""
    a = open_store(store_url, cache=tmp_path / "a").obtain(CFG)
    remote = RemoteStore(store_url)
    first = remote.lookup(a.trajectory.path.stem)
    store_b = open_store(store_url, cache=tmp_path / "b")
    store_b.root.mkdir()
    store_b.remote.exclusive = False  # as on a store without conditional creates: no claims, both train
    store_b.remote.checked = True
    store_b.remote.lookup = lambda run: None  # it did not see the publication before training
    b = store_b._through_remote(  # the path a run takes under its local lock
        store_b.remote,
        CFG,
        store_b.root / a.trajectory.path.name,
        a.trajectory.run_key,
        a.trajectory.key_material,
        None,
        0,
        None,
        None,
        None,
    )
    assert b.trained
    del store_b.remote.lookup
    assert RemoteStore(store_url).lookup(a.trajectory.path.stem) == first  # the first publish stands
    assert _digests(b.trajectory) == _digests(a.trajectory)


def test_store_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown protocol 'nosuch'"):
        RemoteStore("nosuch://bucket/runs")
    with pytest.raises(ConfigError, match=r"gs:// file system needs a package .*flannel-repro\[gcs\]"):
        RemoteStore("gs://bucket/runs")
    with pytest.raises(ConfigError, match="expected a URL with a bucket or folder"):
        RemoteStore("s3://")


def test_urls_are_shown_without_credentials():
    assert redact("s3://AKIAXXXX:secret@bucket/runs?token=abc") == "s3://bucket/runs"
    assert redact("https://user:pw@host:9000/p/q#frag") == "https://host:9000/p/q"
    assert redact("/a/local/path") == "/a/local/path"


def test_credentials_never_reach_artifacts_manifests_or_logs(s3, tmp_path, monkeypatch):
    server, bucket = s3
    # moto accepts any key: a unique secret shows whether it is written anywhere
    secret = "flannelSECRET" + "x7" * 10
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    url = f"s3://{bucket}/runs"
    got = open_store(url, cache=tmp_path / "cache", check=True).obtain(CFG)
    remote = RemoteStore(url)
    written = [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    written += [remote.fs.cat_file(p) for p in remote.fs.find(remote.root)]
    assert written and not any(secret.encode() in blob for blob in written)
    assert got.trained
    meta = json.dumps(got.trajectory.metadata)
    assert secret not in meta and "AWS_SECRET" not in meta


def test_prune_on_the_store_and_its_cache(store_url, tmp_path, monkeypatch, capsys):
    from flannel_repro import cli
    from flannel_repro.runs.prune import scan_store
    from flannel_repro.training import determinism

    cache = tmp_path / "cache"
    got = open_store(store_url, cache=cache).obtain(CFG)
    remote = RemoteStore(store_url, claim_ttl_s=0.0)
    remote.check()
    stale, _ = remote.try_claim("seed1-cpu-torch-r0-000000000000", "gone-machine")  # expires at once
    remote.fs.pipe_file(remote._path("notes.txt"), b"a user's file beside the store")
    assert {str(o.path) for o in scan_store(remote)} == {remote.claim_relpath(stale)}  # current runs are kept

    monkeypatch.setattr(determinism, "code_version", lambda: "0123456789abcdef")  # as after an edit of the code
    assert cli.main(["prune", "--artifacts", store_url, "--cache", str(cache), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 3 object(s)" in out and "flannel-repro code" in out
    assert remote.lookup(got.trajectory.path.stem) is not None  # a dry run deletes nothing

    assert cli.main(["prune", "--artifacts", store_url, "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "deleted 3 object(s)" in out and f"in {cache}" in out  # the store's, then the cache's
    assert not got.trajectory.path.exists()
    assert remote.lookup(got.trajectory.path.stem) is None and remote.objects() == [] and remote.claims() == []
    assert remote.fs.cat_file(remote._path("notes.txt")) == b"a user's file beside the store"  # not ours: kept


def test_obtain_if_free_leaves_a_run_another_machine_claimed(store_url, tmp_path):
    """The local scheduler never waits: a run whose claim another machine holds is left to it."""
    from flannel_repro.runs.store import RunStore, key_of, run_key_material, run_name
    from flannel_repro.data.corpus import load_data

    store = open_store(store_url, cache=tmp_path / "a")
    material = run_key_material(CFG, load_data(CFG).hashes, 0)
    name = run_name(CFG, 0, key_of(material))
    other = RemoteStore(store_url)
    other.check()
    claim, _ = other.try_claim(name, "another-machine")
    assert claim is not None
    assert store.obtain_if_free(CFG) is None
    assert _log_lines(tmp_path / "a") == []
    other.release(claim)
    got = store.obtain_if_free(CFG)
    assert got is not None and got.trained
    assert isinstance(store, RunStore)
