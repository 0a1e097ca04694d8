"""tools/download.py against a local HTTP server on 127.0.0.1: no network at all.

Fixtures in tests/fixtures/download/ are real excerpts: the first rows (and an object and a verb row) of the official
code's compositional_visual_genome.csv, the first lines of its test.txt / vqa_text_test.csv, and three records of
VL-CheckList's data/Attribute/vaw/action.json with its corpus yaml. Images are tiny JPEGs made here.
"""
import csv
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from benchmarks import comvg, fetching, vlchecklist, vqav2, winoground
from benchmarks.comvg import load as load_comvg
from tools import download
from tools.cli import run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, "fixtures", "download")
VG = "/cs.stanford.edu/people/rak248"
CSV_PATH = "/raw.githubusercontent.com/eric-ai-lab/DSD/main/data/compositional_visual_genome.csv"


def fixture(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def jpeg(seed, size=8, kind="JPEG"):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, 120)).save(buf, kind)
    return buf.getvalue()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


class Server:
    """Serves {path: bytes} with Range support; 404 for any other path; counts requests; `stall[path]` (an Event)
    sends half of that file, then waits for the event and drops the connection."""

    def __init__(self, files):
        self.files, self.requests, self.stall = dict(files), [], {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    return self.send_error(404)
                start = int(rng[len("bytes="):].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    return self.send_error(416)
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                event = server.stall.get(self.path)
                if event is not None:
                    self.wfile.write(data[start:start + len(data) // 2])
                    self.wfile.flush()
                    event.wait(20)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def count(self, prefix=""):
        return sum(p.startswith(prefix) for p, _ in self.requests)

    def close(self):
        for event in self.stall.values():
            event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


COMVG_CSV = fixture("compositional_visual_genome.csv")
COMVG_IDS = sorted({r[k] for r in csv.DictReader(io.StringIO(COMVG_CSV.decode())) for k in ("pos_image_id",
                                                                                               "neg_image_id")})
ONLY_IN_VG2 = "180"  # served by VG_100K_2 only: VG_100K answers 404
PLAIN = [i for i in COMVG_IDS if i != ONLY_IN_VG2]  # served by VG_100K


def comvg_files():
    files = {CSV_PATH: COMVG_CSV}
    for i, image_id in enumerate(COMVG_IDS):
        folder = "VG_100K_2" if image_id == ONLY_IN_VG2 else "VG_100K"
        files[f"{VG}/{folder}/{image_id}.jpg"] = jpeg(i)
    return files


@pytest.fixture
def server():
    s = Server(comvg_files())
    yield s
    s.close()


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def fetch_comvg(root, server, **kw):
    return comvg.fetch(str(root), server.url, jobs=2, csv_sha256=sha256(COMVG_CSV), csv_size=len(COMVG_CSV),
                                **kw)


def leftovers(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".part")]


# ---- ComVG end to end -----------------------------------------------------------------------------------------------

def test_comvg_fetches_csv_and_only_its_images_with_vg2_fallback(tmp_path, server):
    root = tmp_path / "comvg"
    tally = fetch_comvg(root, server)
    assert tally == dict(fetched=1 + len(COMVG_IDS), present=0, failed=[])
    assert (root / "compositional_visual_genome.csv").read_bytes() == COMVG_CSV
    for image_id in COMVG_IDS:
        folder = "VG_100K_2" if image_id == ONLY_IN_VG2 else "VG_100K"
        assert (root / folder / f"{image_id}.jpg").read_bytes() == server.files[f"{VG}/{folder}/{image_id}.jpg"]
    assert (f"{VG}/VG_100K/{ONLY_IN_VG2}.jpg", None) in server.requests  # tried first, 404, then VG_100K_2
    assert not leftovers(root)

    items, report = load_comvg(str(root))  # the loader finds every image where the downloader put it
    assert len(items) == COMVG_CSV.count(b"\n") and report["missing_images"] == 0

    before = len(server.requests)  # a rerun: everything present, nothing requested
    assert fetch_comvg(root, server) == dict(fetched=0, present=1 + len(COMVG_IDS), failed=[])
    assert len(server.requests) == before


# ---- resume -------------------------------------------------------------------------------------------------------

def test_leftover_part_is_continued_with_a_range_request(tmp_path, server):
    root = tmp_path / "comvg"
    root.mkdir()
    half = len(COMVG_CSV) // 2
    (root / "compositional_visual_genome.csv.part").write_bytes(COMVG_CSV[:half])
    fetch_comvg(root, server)
    assert (CSV_PATH, f"bytes={half}-") in server.requests
    assert (root / "compositional_visual_genome.csv").read_bytes() == COMVG_CSV
    assert not leftovers(root)


def test_killed_run_leaves_no_done_file_and_the_rerun_completes(tmp_path, server):
    root = tmp_path / "comvg"
    server.stall[CSV_PATH] = threading.Event()
    proc = subprocess.Popen([sys.executable, "-m", "tools.download", "comvg", "--data-root", str(tmp_path),
                             "--mirror", server.url], cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = root / "compositional_visual_genome.csv.part"
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size == len(COMVG_CSV) // 2):
            assert time.monotonic() < deadline and proc.poll() is None, "the download never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    server.stall.pop(CSV_PATH).set()
    assert not (root / "compositional_visual_genome.csv").exists()  # the half file never counts as done

    tally = fetch_comvg(root, server)
    assert tally["failed"] == [] and tally["fetched"] == 1 + len(COMVG_IDS)
    assert (CSV_PATH, f"bytes={len(COMVG_CSV) // 2}-") in server.requests
    assert (root / "compositional_visual_genome.csv").read_bytes() == COMVG_CSV

    image = root / "VG_100K" / f"{PLAIN[0]}.jpg"  # a complete file is not fetched again; a lost one is
    image.unlink()
    before = server.count(f"{VG}/")
    tally = fetch_comvg(root, server)
    assert tally == dict(fetched=1, present=len(COMVG_IDS), failed=[])
    assert server.count(f"{VG}/") == before + 1


# ---- bad files are refused ------------------------------------------------------------------------------------------

def test_undecodable_image_is_refused_then_fetched_by_the_next_run(tmp_path, server):
    root = tmp_path / "comvg"
    bad = f"{VG}/VG_100K/{PLAIN[0]}.jpg"
    good = server.files[bad]
    server.files[bad] = b"<html>not an image</html>"
    tally = fetch_comvg(root, server)
    assert [name for name, _ in tally["failed"]] == [f"{PLAIN[0]}.jpg"]
    assert "not a readable image" in tally["failed"][0][1]
    assert not (root / "VG_100K" / f"{PLAIN[0]}.jpg").exists() and not leftovers(root)

    server.files[bad] = good
    tally = fetch_comvg(root, server)
    assert tally == dict(fetched=1, present=len(COMVG_IDS), failed=[])
    assert (root / "VG_100K" / f"{PLAIN[0]}.jpg").read_bytes() == good


def test_corrupted_files_on_disk_are_fetched_again(tmp_path, server):
    root = tmp_path / "comvg"
    fetch_comvg(root, server)
    image = root / "VG_100K" / f"{PLAIN[1]}.jpg"
    image.write_bytes(image.read_bytes()[:40])  # truncated JPEG
    (root / "compositional_visual_genome.csv").write_bytes(COMVG_CSV.replace(b"table", b"tabel"))
    tally = fetch_comvg(root, server)
    assert tally == dict(fetched=2, present=len(COMVG_IDS) - 1, failed=[])
    assert (root / "compositional_visual_genome.csv").read_bytes() == COMVG_CSV
    assert image.read_bytes() == server.files[f"{VG}/VG_100K/{PLAIN[1]}.jpg"]


def test_checksum_mismatch_is_refused_with_a_clear_message(tmp_path, server, capsys):
    path = tmp_path / "x.csv"
    with pytest.raises(fetching.FetchError, match="sha256 mismatch: got .* expected 0{64}; refused and removed"):
        fetching.fetch(server.url + CSV_PATH, str(path), len(COMVG_CSV), sha256="0" * 64, bar=False)
    assert not path.exists() and not leftovers(tmp_path)

    # the CLI with the real checksum: the fixture is not the published CSV, so it is refused and nothing else runs
    assert run_cli(download.main, ["comvg", "--data-root", str(tmp_path), "--mirror", server.url]) == 1
    out = capsys.readouterr().out
    assert "0 fetched, 0 already present, 1 failed" in out
    assert f"expected {comvg.COMVG_CSV_SIZE:,}; refused and removed" in out and "by hand:" in out
    assert not (tmp_path / "comvg" / "compositional_visual_genome.csv").exists()
    assert server.count(f"{VG}/") == 0


# ---- offline ------------------------------------------------------------------------------------------------------

def test_server_down_is_a_counted_failure_with_a_clear_line(tmp_path, capsys):
    dead = closed_port_url()
    assert run_cli(download.main, ["comvg", "--data-root", str(tmp_path), "--mirror", dead]) == 1
    out = capsys.readouterr().out
    assert "1 failed" in out and "Connection refused" in out and "offline?" in out
    assert not (tmp_path / "comvg").exists()  # a failed first fetch leaves no empty folder behind (not a data set)

    root = tmp_path / "comvg"  # the CSV there, the image server down: every image counted failed, none kept
    root.mkdir()
    (root / "compositional_visual_genome.csv").write_bytes(COMVG_CSV)
    tally = comvg.fetch(str(root), dead, jobs=1, csv_sha256=sha256(COMVG_CSV), csv_size=len(COMVG_CSV))
    assert tally["present"] == 1 and len(tally["failed"]) == len(COMVG_IDS)
    assert all("cannot reach" in why or "unreachable" in why for _, why in tally["failed"])


def test_winoground_offline_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli(download.main, ["winoground", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "HF_HUB_OFFLINE" in err[0]
    assert not (tmp_path / "winoground" / ".hf").exists()


def test_winoground_gated_message_says_what_to_do():
    from types import SimpleNamespace

    from huggingface_hub.errors import GatedRepoError
    response = SimpleNamespace(status_code=401, headers={}, request=None)
    line = fetching.hub_error(GatedRepoError("Access to dataset facebook/winoground is restricted.", response=response),
                              "facebook/winoground")
    assert "hf auth login" in line and "https://huggingface.co/datasets/facebook/winoground" in line


@pytest.mark.parametrize("in_folder", [True, False])
def test_winoground_unpacks_into_the_loader_layout(tmp_path, monkeypatch, in_folder):
    """huggingface_hub stood in for by a function writing the two files where hf_hub_download(local_dir=) puts them."""
    import huggingface_hub
    examples = b'{"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "a b", "caption_1": "b a"}\n'
    prefix = "images/" if in_folder else ""
    archive = zip_bytes({f"{prefix}ex_0_img_{k}.png": jpeg(k, kind="PNG") for k in (0, 1)})
    calls = []

    def fake_download(repo_id, repo_type, filename, local_dir):
        calls.append((repo_id, repo_type, filename))
        path = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(examples if filename.endswith(".jsonl") else archive)
        return path

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    root = tmp_path / "winoground"
    assert winoground.fetch(str(root)) == dict(fetched=2, present=0, failed=[])
    assert calls == [("facebook/winoground", "dataset", "data/examples.jsonl"),
                     ("facebook/winoground", "dataset", "data/images.zip")]
    assert (root / "examples.jsonl").read_bytes() == examples
    assert sorted(os.listdir(root / "images")) == ["ex_0_img_0.png", "ex_0_img_1.png"]
    assert not (root / ".hf").exists()
    assert winoground.fetch(str(root)) == dict(fetched=0, present=2, failed=[]) and len(calls) == 2


def test_mirrored_keeps_host_and_path():
    assert fetching.mirrored("https://cs.stanford.edu/people/rak248/VG_100K", "http://127.0.0.1:8/") == \
        "http://127.0.0.1:8/cs.stanford.edu/people/rak248/VG_100K"
    assert fetching.mirrored(comvg.COMVG_CSV_URL, None) == comvg.COMVG_CSV_URL


# ---- the other data sets: archives and referenced images ---------------------------------------------------------

def zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_vlchecklist_unpacks_only_data_and_corpus(tmp_path, capsys):
    members = {"VL-CheckList-main/data/Attribute/vaw/action.json": fixture("vlc_action.json"),
               "VL-CheckList-main/corpus/v1/Attribute/action/vaw.yaml": fixture("vlc_action_vaw.yaml"),
               "VL-CheckList-main/README.md": b"# not wanted"}
    s = Server({"/github.com/om-ai-lab/VL-CheckList/archive/refs/heads/main.zip": zip_bytes(members)})
    try:
        assert run_cli(download.main, ["vlchecklist", "--data-root", str(tmp_path), "--mirror", s.url]) == 0
        root = tmp_path / "vlchecklist"
        assert (root / "data" / "Attribute" / "vaw" / "action.json").read_bytes() == fixture("vlc_action.json")
        assert (root / "corpus" / "v1" / "Attribute" / "action" / "vaw.yaml").is_file()
        assert not (root / "README.md").exists() and not (root / "VL-CheckList-main.zip").exists()
        out = capsys.readouterr().out
        assert "1 fetched" in out and "DATASETS.md" in out
        assert vlchecklist.fetch(str(root), s.url)["present"] == 1 and s.count() == 1
    finally:
        s.close()


def test_damaged_archive_is_removed_and_counted_failed(tmp_path):
    good = zip_bytes({"refcocog/refs(google).p": b"x" * 1000})
    bad = bytearray(good)
    bad[good.index(b"xxxx")] ^= 0xFF  # one flipped byte in the stored data: the CRC check fails
    s = Server({"/a/refcocog.zip": bytes(bad)})
    try:
        tally = fetching.new_tally()
        ok = fetching.fetch_archive([s.url + "/a/refcocog.zip"], str(tmp_path / "refcocog.zip"), str(tmp_path), tally,
                                    rename=lambda n: n.split("/", 1)[1])
        assert not ok and "damaged" in tally["failed"][0][1]
        assert not (tmp_path / "refcocog.zip").exists() and not leftovers(tmp_path)
        s.files["/a/refcocog.zip"] = good
        assert fetching.fetch_archive([s.url + "/a/refcocog.zip"], str(tmp_path / "refcocog.zip"), str(tmp_path),
                                      fetching.new_tally(), rename=lambda n: n.split("/", 1)[1])
        assert (tmp_path / "refs(google).p").read_bytes() == b"x" * 1000
    finally:
        s.close()


def test_vqav2_files_and_only_the_images_they_use(tmp_path):
    files = {name: (f"https://raw.githubusercontent.com/eric-ai-lab/DSD/main/data/{name}", len(fixture(name)),
                    sha256(fixture(name))) for name in ("test.txt", "vqa_text_test.csv")}
    names = ["COCO_val2014_000000119630.jpg", "COCO_val2014_000000172319.jpg", "COCO_val2014_000000498381.jpg",
             "COCO_val2014_000000108327.jpg"]
    served = {f"/raw.githubusercontent.com/eric-ai-lab/DSD/main/data/{n}": fixture(n) for n in files}
    served.update({f"/images.cocodataset.org/val2014/{n}": jpeg(i) for i, n in enumerate(names)})
    s = Server(served)
    try:
        root = tmp_path / "vqav2"
        tally = vqav2.fetch(str(root), s.url, with_images=True, jobs=2, files=files)
        assert tally == dict(fetched=2 + len(names), present=0, failed=[])
        assert sorted(os.listdir(root / "val2014")) == sorted(names)
    finally:
        s.close()


def test_big_downloads_need_yes(tmp_path, capsys):
    assert run_cli(download.main, ["coco", "--with-images", "--data-root", str(tmp_path),
                                   "--mirror", closed_port_url()]) == 2
    err = capsys.readouterr().err
    assert "13.5 GB" in err and err.strip().splitlines()[-1].startswith("error: ") and "--yes" in err


# ---- CLI input -----------------------------------------------------------------------------------------------------

def test_unknown_data_set_is_one_error_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.download", "imagenet"], cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: unknown data set 'imagenet': choose from comvg, refcocog, vqav2, winoground, vlchecklist, coco, "
        "flickr30k, coco_order, flickr30k_order, imagecode, svo, clevr, pets, sugarcrepe"]


def test_bad_option_and_hints(capsys):
    assert run_cli(download.main, ["comvg", "--jobs", "0"]) == 2
    assert run_cli(download.main, ["comvg", "--no-such-option"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert all(s.HINT and s.FETCHES and s.manual_route("r") for s in download.FETCHABLE.values())
    assert download.hint("comvg").startswith("fetch it with: python -m tools.download comvg")
    assert download.hint("shapes") == ""
