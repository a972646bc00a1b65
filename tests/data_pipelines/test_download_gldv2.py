"""The GLDv2 downloader against a local HTTP server serving a tiny generated release."""

import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading

import pytest
from PIL import Image

from data_pipelines import download_gldv2, resumable_download, shard_markers, verified_tars

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES_PER_SHARD = 3


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _corrupt(body: bytes) -> bytes:
    middle = len(body) // 2
    return body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]


def make_release(split: str, num_shards: int, extra_ids: tuple[str, ...] = ()) -> tuple:
    """A tiny release: {url path: bytes} and {image id: jpeg bytes}."""
    tree, images = {}, {}
    for shard in range(num_shards):
        files = {}
        for k in range(IMAGES_PER_SHARD):
            image_id = hashlib.md5(f"{split}-{shard}-{k}".encode()).hexdigest()[:16]
            images[image_id] = _jpeg(shard * IMAGES_PER_SHARD + k)
            files[f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"] = images[image_id]
        body = _tar(files)
        tree[f"{split}/images_{shard:03d}.tar"] = body
        md5 = hashlib.md5(body).hexdigest()
        tree[f"md5sum/{split}/md5.images_{shard:03d}.txt"] = f"{md5}  images_{shard:03d}.tar\n"
    ids = list(images) + list(extra_ids)
    if split == "train":
        tree["metadata/train.csv"] = "id,url,landmark_id\n" + "".join(
            f"{i},http://x/{i}.jpg,{n % 2}\n" for n, i in enumerate(ids)
        )
        tree["metadata/train_clean.csv"] = "landmark_id,images\n0," + " ".join(ids[::2]) + "\n"
    else:
        tree[f"metadata/{split}.csv"] = "id\n" + "".join(f"{i}\n" for i in ids)
    if split == "index":
        tree["metadata/index_image_to_landmark.csv"] = "id,landmark_id\n"
    if split == "test":
        for task in ("recognition", "retrieval"):
            tree[f"ground_truth/{task}_solution_v2.1.csv"] = "id,images,Usage\n"
    tree = {k: v.encode() if isinstance(v, str) else v for k, v in tree.items()}
    return tree, images


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.tree, with Range support and the faults the server is told to inject."""

    def log_message(self, *args):  # Keep the test output quiet.
        pass

    def do_GET(self):
        server = self.server
        path = self.path.lstrip("/")
        with server.lock:
            server.requests.append((path, self.headers.get("Range")))
            corrupt = path in server.always_corrupt or path in server.corrupt_once
            server.corrupt_once.discard(path)
            interrupt = path in server.interrupt_once
            server.interrupt_once.discard(path)
        body = server.tree.get(path)
        if body is None:
            self.send_error(404)
            return
        if corrupt:
            body = _corrupt(body)
        total, start = len(body), 0
        ranged = self.headers.get("Range")
        if ranged and path not in server.ignore_range:
            start = int(ranged.removeprefix("bytes=").rstrip("-"))
            if start >= total:
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        else:
            self.send_response(200)
        body = body[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if interrupt:
            # The full Content-Length was promised; half arrives, then EOF.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(download_gldv2, "SPLITS", {"train": 4, "index": 2, "test": 2})
    monkeypatch.setattr(resumable_download, "RETRY_DELAY_S", 0.0)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.lock = threading.Lock()
    httpd.requests = []
    httpd.tree = {}
    httpd.corrupt_once, httpd.always_corrupt, httpd.interrupt_once = set(), set(), set()
    httpd.ignore_range = set()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def tar_requests(server, split="train"):
    return [r for r in server.requests if r[0].startswith(f"{split}/")]


def check_images(out, split, images):
    for image_id, data in images.items():
        path = os.path.join(out, split, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")
        with open(path, "rb") as f:
            assert f.read() == data, path


def test_clean_download(server, tmp_path):
    server.tree, images = make_release("train", 4)
    out = str(tmp_path)
    summary = download_gldv2.download_split("train", out, server.url, num_workers=3)
    assert summary["downloaded"] == [0, 1, 2, 3]
    assert summary["skipped"] == [] and summary["failed"] == {} and summary["missing"] == []
    check_images(out, "train", images)
    for name in ("train.csv", "train_clean.csv"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read() == server.tree[f"metadata/{name}"]
    for shard in range(4):
        with open(os.path.join(out, "tars", "train", f"images_{shard:03d}.tar"), "rb") as f:
            assert f.read() == server.tree[f"train/images_{shard:03d}.tar"]
        assert os.path.exists(os.path.join(out, "tars", "train", f"images_{shard:03d}.done"))
    with open(os.path.join(out, "missing-train.csv")) as f:
        assert f.read() == "id\n"
    report = download_gldv2.format_summary(summary)
    assert "4 downloaded, 0 skipped (already verified), 0 failed" in report


def test_interrupted_resumes_with_range_and_corrupted_once_refetches(server, tmp_path):
    server.tree, images = make_release("train", 4)
    server.interrupt_once.add("train/images_001.tar")
    server.corrupt_once.add("train/images_002.tar")
    # Shard 3 is interrupted and the server then ignores Range: a fresh 200.
    server.interrupt_once.add("train/images_003.tar")
    server.ignore_range.add("train/images_003.tar")
    out = str(tmp_path)
    summary = download_gldv2.download_split("train", out, server.url, num_workers=4)
    assert summary["downloaded"] == [0, 1, 2, 3] and summary["failed"] == {}
    half = len(server.tree["train/images_001.tar"]) // 2
    assert [r for r in server.requests if r[0] == "train/images_001.tar"] == [
        ("train/images_001.tar", None),
        ("train/images_001.tar", f"bytes={half}-"),
    ]
    # The corrupted copy was thrown away and fetched whole, not resumed.
    assert [r for r in server.requests if r[0] == "train/images_002.tar"] == [
        ("train/images_002.tar", None),
        ("train/images_002.tar", None),
    ]
    assert len([r for r in server.requests if r[0] == "train/images_003.tar"]) == 2
    check_images(out, "train", images)
    assert not [p for p in os.listdir(os.path.join(out, "tars", "train")) if p.endswith(".part")]


def test_part_file_from_an_earlier_run_is_resumed(server, tmp_path):
    server.tree, images = make_release("index", 2)
    body = server.tree["index/images_000.tar"]
    os.makedirs(tmp_path / "tars" / "index")
    (tmp_path / "tars" / "index" / "images_000.tar.part").write_bytes(body[:100])
    summary = download_gldv2.download_split("index", str(tmp_path), server.url, shards="0")
    assert summary["downloaded"] == [0] and summary["shards"] == [0]
    assert ("index/images_000.tar", "bytes=100-") in server.requests
    check_images(str(tmp_path), "index", {k: images[k] for k in list(images)[:IMAGES_PER_SHARD]})


def _run_cli(output_dir: str, base_url: str, *flags: str) -> subprocess.CompletedProcess:
    """Runs the download_gldv2 program on train's shards 0-3 (the real SPLITS
    table, so --shards picks the four a test serves)."""
    return subprocess.run(
        [sys.executable, "-m", "data_pipelines.download_gldv2", "--split=train", *flags]
        + [f"--output_dir={output_dir}", f"--base_url={base_url}", "--shards=0-3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_PROXY": "127.0.0.1"},
    )


@pytest.mark.e2e
def test_always_corrupted_shard_fails_and_the_others_complete(server, tmp_path):
    server.tree, images = make_release("train", 4)
    server.always_corrupt.add("train/images_002.tar")
    expected = hashlib.md5(server.tree["train/images_002.tar"]).hexdigest()
    actual = hashlib.md5(_corrupt(server.tree["train/images_002.tar"])).hexdigest()
    out = str(tmp_path / "lib")
    summary = download_gldv2.download_split("train", out, server.url, num_workers=2)
    assert summary["downloaded"] == [0, 1, 3] and list(summary["failed"]) == [2]
    reason = summary["failed"][2]
    assert f"{server.url}/train/images_002.tar" in reason
    assert expected in reason and actual in reason
    assert not os.path.exists(os.path.join(out, "tars", "train", "images_002.tar"))
    assert len(summary["missing"]) == IMAGES_PER_SHARD

    # The CLI, once.
    cli_out = str(tmp_path / "cli")
    result = _run_cli(cli_out, server.url)
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "images_002.tar" in failed[0]
    assert expected in failed[0] and actual in failed[0]
    assert "3 downloaded, 0 skipped (already verified), 1 failed" in result.stdout


def test_rerun_downloads_nothing_and_a_lost_marker_reextracts(server, tmp_path, caplog):
    server.tree, images = make_release("test", 2)
    server.tree["ground_truth/recognition_solution_v2.1.csv"] = b"id,landmarks,Usage\n"
    server.tree["ground_truth/retrieval_solution_v2.1.csv"] = b"id,images,Usage\n"
    out = str(tmp_path)
    first = download_gldv2.download_split("test", out, server.url)
    assert first["downloaded"] == [0, 1] and set(first["csvs"].values()) == {"downloaded"}
    server.requests.clear()

    second = download_gldv2.download_split("test", out, server.url)
    assert second["skipped"] == [0, 1] and second["downloaded"] == []
    assert set(second["csvs"].values()) == {"kept"}
    assert server.requests == []

    tar_dir = os.path.join(out, "tars", "test")
    os.remove(os.path.join(tar_dir, "images_000.done"))
    lost = next(iter(images))
    os.remove(os.path.join(out, "test", lost[0], lost[1], lost[2], f"{lost}.jpg"))
    caplog.set_level("INFO")
    third = download_gldv2.download_split("test", out, server.url)
    assert third["skipped"] == [0, 1] and tar_requests(server, "test") == []
    assert f"{os.path.join(tar_dir, 'images_000.done')}: no marker" in caplog.text
    assert os.path.exists(os.path.join(tar_dir, "images_000.done"))
    check_images(out, "test", images)


def test_ids_without_images_are_reported(server, tmp_path):
    absent = ("ffff000000000001", "eeee000000000002")
    server.tree, _ = make_release("index", 2, extra_ids=absent)
    summary = download_gldv2.download_split("index", str(tmp_path), server.url)
    assert summary["missing"] == list(absent)
    with open(tmp_path / "missing-index.csv") as f:
        assert f.read() == "id\n" + "".join(f"{i}\n" for i in absent)
    assert "2 ids of index.csv have no image" in download_gldv2.format_summary(summary)


def test_parse_shards_and_read_md5():
    assert download_gldv2.parse_shards("0-4,7", 10) == [0, 1, 2, 3, 4, 7]
    assert download_gldv2.parse_shards(None, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"shard 12 .*0-9"):
        download_gldv2.parse_shards("1,12", 10)
    with pytest.raises(ValueError, match=r"'3-x'"):
        download_gldv2.parse_shards("3-x", 10)
    with pytest.raises(ValueError, match=r"'5-2' is reversed"):
        download_gldv2.parse_shards("5-2", 10)
    digest = "0123456789abcdef0123456789ABCDEF"
    assert verified_tars.read_md5(f"{digest}  images_000.tar\n", "f") == digest.lower()
    with pytest.raises(ValueError, match=r"md5\.images_001\.txt.*'<html>'"):
        verified_tars.read_md5("<html> oops", "md5.images_001.txt")
    with pytest.raises(ValueError, match=r"unknown split 'val'.*train, index, test"):
        download_gldv2.download_split("val", "/tmp/unused")


@pytest.mark.parametrize("member", ["../evil.jpg", "a/../../evil.jpg", "/etc/evil.jpg"])
def test_unsafe_tar_member_is_refused(tmp_path, member):
    tar_path = str(tmp_path / "images_000.tar")
    with open(tar_path, "wb") as f:
        f.write(_tar({"0/1/2/0123456789abcdef.jpg": b"ok", member: b"bad"}))
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match=f"images_000.tar.*{member}"):
        verified_tars.extract_tar(tar_path, str(dest))
    assert not dest.exists() and not (tmp_path / "evil.jpg").exists()


@pytest.fixture
def counted(monkeypatch):
    """Records the tars each run hashes and extracts (the work a rerun must skip)."""
    calls: dict[str, list[str]] = {"hashed": [], "extracted": []}
    real_md5, real_extract = shard_markers.file_md5, download_gldv2.extract_tar

    def file_md5(path):
        calls["hashed"].append(os.path.basename(path))
        return real_md5(path)

    def extract_tar(path, dest):
        calls["extracted"].append(os.path.basename(path))
        return real_extract(path, dest)

    monkeypatch.setattr(shard_markers, "file_md5", file_md5)
    monkeypatch.setattr(download_gldv2, "extract_tar", extract_tar)

    def take():
        taken = {k: sorted(v) for k, v in calls.items()}
        for v in calls.values():
            v.clear()
        return taken

    return take


def _finished(server, tmp_path, counted, split="train", num_shards=4):
    """A first run over a fresh release; returns (out, tar_dir, images)."""
    server.tree, images = make_release(split, num_shards)
    out = str(tmp_path)
    first = download_gldv2.download_split(split, out, server.url, num_workers=2)
    assert first["downloaded"] == list(range(num_shards))
    assert len(counted()["hashed"]) == num_shards
    server.requests.clear()
    return out, os.path.join(out, "tars", split), images


def test_rerun_over_finished_shards_neither_downloads_nor_hashes(server, tmp_path, counted):
    out, _, images = _finished(server, tmp_path, counted)
    second = download_gldv2.download_split("train", out, server.url, num_workers=2)
    assert second["skipped"] == [0, 1, 2, 3] and second["downloaded"] == []
    assert server.requests == []
    assert counted() == {"hashed": [], "extracted": []}
    check_images(out, "train", images)


def test_a_tar_changed_since_verification_is_verified_again(server, tmp_path, counted, caplog):
    out, tar_dir, images = _finished(server, tmp_path, counted)
    # Shard 1 grew; shard 2 was rewritten in place (same size, later mtime);
    # shard 3 was touched only (same bytes, later mtime).
    grown = os.path.join(tar_dir, "images_001.tar")
    with open(grown, "ab") as f:
        f.write(b"\0" * 512)
    rewritten = os.path.join(tar_dir, "images_002.tar")
    with open(rewritten, "r+b") as f:
        body = f.read()
        f.seek(0)
        f.write(_corrupt(body))
    touched = os.path.join(tar_dir, "images_003.tar")
    for path in (rewritten, touched):
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    with caplog.at_level("INFO"):
        second = download_gldv2.download_split("train", out, server.url, num_workers=2)
    assert second["downloaded"] == [1, 2] and second["skipped"] == [0, 3]
    assert sorted(r[0] for r in tar_requests(server)) == [
        "train/images_001.tar",
        "train/images_002.tar",
    ]
    # Each changed tar hashed once as found, and once more as downloaded.
    assert counted() == {
        "hashed": ["images_001.tar", "images_001.tar.part", "images_002.tar"]
        + ["images_002.tar.part", "images_003.tar"],
        "extracted": ["images_001.tar", "images_002.tar"],
    }
    log = caplog.text
    assert f"{grown}: {len(server.tree['train/images_001.tar']) + 512} bytes" in log
    assert f"{rewritten}: modified since it was verified" in log
    assert f"{touched}: modified since it was verified" in log
    check_images(out, "train", images)
    # The touched shard's marker now records its new mtime: trusted again.
    third = download_gldv2.download_split("train", out, server.url, num_workers=2)
    assert third["skipped"] == [0, 1, 2, 3] and counted()["hashed"] == []


@pytest.mark.e2e
def test_verify_rehashes_every_tar_and_finds_a_silent_change(server, tmp_path, counted):
    out, tar_dir, images = _finished(server, tmp_path, counted)
    # A change that keeps size and mtime (bit rot, a copy tool that sets
    # mtimes): only --verify can see it.
    path = os.path.join(tar_dir, "images_002.tar")
    stat = os.stat(path)
    with open(path, "r+b") as f:
        body = f.read()
        f.seek(0)
        f.write(_corrupt(body))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    trusted = download_gldv2.download_split("train", out, server.url, num_workers=2)
    assert trusted["skipped"] == [0, 1, 2, 3] and counted()["hashed"] == []

    verified = download_gldv2.download_split("train", out, server.url, num_workers=2, verify=True)
    assert verified["skipped"] == [0, 1, 3] and verified["downloaded"] == [2]
    assert [r[0] for r in tar_requests(server)] == ["train/images_002.tar"]
    assert counted() == {
        "hashed": sorted([f"images_00{i}.tar" for i in range(4)] + ["images_002.tar.part"]),
        "extracted": ["images_002.tar"],
    }
    check_images(out, "train", images)

    # The command line's --verify: every tar hashed, none fetched.
    server.requests.clear()
    result = _run_cli(out, server.url, "--verify")
    assert result.returncode == 0, result.stderr
    assert "0 downloaded, 4 skipped (already verified), 0 failed" in result.stdout
    assert result.stderr.count("--verify: hashing") == 4 and tar_requests(server) == []


def test_an_unreadable_or_old_marker_is_verified_again(server, tmp_path, counted, caplog):
    out, tar_dir, images = _finished(server, tmp_path, counted)
    markers = [os.path.join(tar_dir, f"images_00{i}.done") for i in range(4)]
    md5 = hashlib.md5(server.tree["train/images_001.tar"]).hexdigest()
    with open(markers[0], "w") as f:
        f.write("{not json")
    with open(markers[1], "w") as f:  # What versions before --verify wrote.
        f.write(f"{md5}  images_001.tar\n")
    with open(markers[2], "w") as f:
        f.write("")
    # Shard 3's marker is whole but records another md5 than md5.images_003.txt.
    with open(markers[3]) as f:
        text = f.read()
    with open(markers[3], "w") as f:
        f.write(
            text.replace(hashlib.md5(server.tree["train/images_003.tar"]).hexdigest(), "0" * 32)
        )
    lost = next(iter(images))  # An image of shard 0: re-extracted.
    os.remove(os.path.join(out, "train", lost[0], lost[1], lost[2], f"{lost}.jpg"))

    with caplog.at_level("INFO"):
        second = download_gldv2.download_split("train", out, server.url, num_workers=2)
    assert second["skipped"] == [0, 1, 2, 3] and tar_requests(server) == []
    assert counted() == {
        "hashed": [f"images_00{i}.tar" for i in range(4)],
        # An unreadable marker says nothing of what was extracted, nor does
        # one for other bytes; an old marker for these bytes does.
        "extracted": ["images_000.tar", "images_002.tar", "images_003.tar"],
    }
    log = caplog.text
    assert f"{markers[0]}: unreadable marker" in log and f"{markers[2]}: unreadable marker" in log
    assert f"{markers[1]}: written by an older version" in log
    assert f"{markers[3]}: records md5 {'0' * 32}" in log
    check_images(out, "train", images)
    third = download_gldv2.download_split("train", out, server.url, num_workers=2)
    assert third["skipped"] == [0, 1, 2, 3] and counted() == {"hashed": [], "extracted": []}
