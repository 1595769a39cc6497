"""sample.py --live (live.py, live.html) on the shipped toy student: the server on the loopback address (frames in
order and equal to the offline stream, a posted prompt switching at the next chunk, bad requests refused without
effect, dead connections costing nothing, restarts, Ctrl-C), and one end-to-end run in headless Chromium."""

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
from live import MAX_BODY, MAX_PROMPT, Live, encode_frame, host_warning

ROOT = Path(__file__).resolve().parent.parent
A = "a red circle moves right fast on a gray background"
B = "a blue triangle moves down slowly on a white background and the camera pans left"
FPS = 50  # playback rate of these tests: fast, and still far below what the toy generates
AHEAD = 6  # frames the generator may run ahead: two toy chunks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def png(data):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def toy(one_thread):
    """The shipped toy student, its text encoder and VAE (what `python sample.py --live` streams)."""
    return sample.load_toy(sample.TOY_STUDENT, torch.device("cpu"), torch.float32)


def settings(*args, fps=FPS):
    cfg = sample.configure(sample.SampleConfig(), ["--live", "--port=0", f"--fps={fps}", "--out=", *args])
    kind, jobs = sample.check(cfg)
    assert kind == "toy"
    return cfg, jobs[0][0]


class Server:
    """run_live in a thread on a Live served at 127.0.0.1:<free port>, as `sample.py --live` runs it."""

    def __init__(self, toy, *args, fps=FPS):
        model, te, vae = toy
        self.cfg, schedule = settings(*args, fps=fps)
        self.live = Live(fps, AHEAD, lambda text: sample.toy_words(te.tokenizer, [text]), seed=self.cfg.seed)
        self.url = self.live.serve("127.0.0.1", 0)
        self.port = self.live.server.server_address[1]
        self.log = []
        self.thread = threading.Thread(target=sample.run_live, daemon=True,
                                       args=(self.cfg, model, te, vae, model, schedule, self.live, self.log.append))
        self.thread.start()

    def get(self, path, timeout=15):
        with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()

    def state(self):
        return json.loads(self.get("/state")[2])

    def post(self, path, body=None, raw=None, headers=None):
        """-> (status, parsed JSON reply)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        c.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        out = r.status, json.loads(r.read() or b"{}")
        c.close()
        return out

    def frames(self, n, after=-1):
        """The next n frames after `after` as a client sees them: [(index, chunk, video, bytes)]."""
        out = []
        while len(out) < n:
            status, h, data = self.get(f"/frame?after={after}")
            assert status == 200
            after = int(h["X-Frame"])
            out.append((after, int(h["X-Chunk"]), int(h["X-Video"]), data))
        return out

    def wait(self, cond, what, timeout=20):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.state()
            if cond(s):
                return s
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; state {self.state()}")

    def blocked(self):
        """Pause and wait until the generator is parked (its buffer full): the next chunk it starts is then
        state['generated_chunks']."""
        assert self.post("/pause") == (200, {"paused": True})
        last = None
        for _ in range(200):
            s = self.state()
            key = (s["generated_chunks"], s["waiting_frames"], s["frame"])
            if key == last and s["waiting_frames"] == AHEAD:
                return s
            last = key
            time.sleep(0.15)
        raise AssertionError(f"the generator did not park: {self.state()}")

    def close(self):
        self.live.close()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture()
def server(toy):
    s = Server(toy, f"--prompt={A}")
    yield s
    s.close()


def stream_frames(models, cfg, schedule):
    """The frames sample.py writes with these settings and prompt schedule, with no page: uint8 [N, H, W, 3]."""
    model, te, vae = models
    got = []
    sample.stream_video(cfg, model, vae, sample.encode_schedule(te, schedule, torch.device("cpu"), torch.float32),
                        None, on_chunk=lambda k, cache, x0, frames: got.append(sample.to_uint8(frames)),
                        log=lambda *a: None)
    return np.concatenate(got)


def offline(toy, schedule, n_chunks, seed=0):
    """The toy student's first n_chunks chunks for this schedule: uint8 [3 n_chunks, 16, 16, 3]."""
    return stream_frames(toy, settings(f"--num_frames={3 * n_chunks}", f"--seed={seed}")[0], schedule)


def test_frames_arrive_in_order_are_the_stream_and_two_tabs_see_the_same(server, toy):
    first = server.frames(24)
    second = server.frames(24)  # a second client ("tab") from the start of the ring
    assert [f[0] for f in first] == list(range(24))  # every frame, in order: the ring keeps 2 s
    assert [f[1] for f in first] == [i // 3 for i in range(24)]  # 3 frames per toy chunk
    assert {f[2] for f in first} == {0}
    assert [f[3] for f in second] == [f[3] for f in first]  # the same bytes for the same index
    ref = offline(toy, [(0.0, A)], 8)
    assert np.array_equal(np.stack([png(f[3]) for f in first]), ref)  # the page shows exactly the stream
    # paced at the video's fps: 24 more frames take about 24 / FPS s, not the generator's speed
    latest = server.state()["frame"]  # from the newest frame on: every one still to be played
    t0 = time.monotonic()
    server.frames(24, after=latest)
    assert 24 / FPS * 0.7 < time.monotonic() - t0 < 24 / FPS * 3 + 1.0


def test_a_posted_prompt_switches_at_the_next_chunk(server, toy):
    s = server.blocked()
    k = s["generated_chunks"]  # the next chunk the generator starts
    assert server.post("/prompt", {"prompt": "  " + B + " "}) == (202, {"accepted": B})
    assert server.state()["pending_prompt"] == B
    assert server.post("/resume") == (200, {"paused": False})
    s = server.wait(lambda s: s["prompt"] == B, "the new prompt on screen")
    assert s["switches"] == [[0, k, B]]
    assert s["latency_s"] is not None and 0 < s["latency_s"] < 5 and s["pending_prompt"] is None
    # the frames are those of the same stream with the prompt scheduled at chunk k
    got = server.frames(3 * (k + 2))
    ref = offline(toy, [(0.0, A), (3 * k / FPS, B)], k + 2)
    assert [f[0] for f in got] == list(range(3 * (k + 2)))
    assert np.array_equal(np.stack([png(f[3]) for f in got]), ref)
    assert not np.array_equal(ref[3 * k:], offline(toy, [(0.0, A)], k + 2)[3 * k:])  # and the switch shows


def test_bad_requests_get_4xx_and_change_nothing(server):
    server.blocked()
    before = server.state()
    long = "a " * (MAX_PROMPT // 2 + 1)
    bad = [
        (server.post("/prompt", {"prompt": ""}), 400),
        (server.post("/prompt", {"prompt": "   "}), 400),
        (server.post("/prompt", {"prompt": 5}), 400),
        (server.post("/prompt", {"prompt": long}), 400),
        (server.post("/prompt", {"prompt": "a purple dragon <script>"}), 400),  # words the toy does not know
        (server.post("/prompt", {"text": A}), 400),
        (server.post("/prompt", raw=b"{not json"), 400),
        (server.post("/prompt", raw=b'"just a string"'), 400),
        (server.post("/prompt", raw=b"x" * (MAX_BODY + 1)), 413),
        (server.post("/prompt", {"prompt": A}, headers={"Content-Type": "text/plain"}), 415),
        (server.post("/prompt", {"prompt": A}, headers={"Host": "evil.example:80"}), 403),  # DNS rebinding
        (server.post("/recache", {"on": "yes"}), 400),
        (server.post("/recache", {}), 400),
        (server.post("/restart", {"seed": -1}), 400),
        (server.post("/restart", {"seed": "7"}), 400),
        (server.post("/restart", {"seed": True}), 400),
        (server.post("/pause", {"now": 1}), 400),
        (server.post("/state"), 405),
        (server.post("/nowhere"), 404),
    ]
    for (status, reply), want in bad:
        assert status == want and reply.get("error"), (status, reply)
    assert "'dragon', 'purple'" in bad[4][0][1]["error"] and "500" in bad[3][0][1]["error"]
    for path in ("/frame?after=x", "/nowhere", "/prompt"):
        with pytest.raises(urllib.error.HTTPError) as e:
            server.get(path)
        assert e.value.code == {"/frame?after=x": 400, "/nowhere": 404, "/prompt": 405}[path]
    time.sleep(0.3)
    assert server.state() == before  # paused: nothing moved, nothing switched, nothing waits
    assert server.live.prompts.empty()


def test_dead_and_stuck_connections_stall_nothing(server):
    stuck = []
    for req in (b"", b"GET /frame?after=-1 HTTP/1.1\r\nHost: 127", b"GET /frame?after=-1 HTTP/1.1\r\n"
                b"Host: 127.0.0.1\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.sendall(req)  # then never read, never finish
        stuck.append(s)
    for _ in range(5):  # clients that go away mid-request (a closed tab)
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"GET /frame?after=1000000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.close()
    s0 = server.state()
    t0 = time.monotonic()
    got = server.frames(40, after=s0["frame"])  # frames still to be made, not the ring's
    assert [f[0] for f in got] == list(range(got[0][0], got[0][0] + 40))
    assert time.monotonic() - t0 < 40 / FPS * 3 + 2.0
    assert server.state()["generated_chunks"] >= s0["generated_chunks"] + 10
    for s in stuck:
        s.close()


def test_restart_starts_a_new_video_from_a_new_seed_with_the_prompt_reached(toy, tmp_path):
    srv = Server(toy, f"--prompt={A}", f"--out={tmp_path / 'live.mp4'}", "--seed=3")
    try:
        srv.frames(6)
        assert srv.post("/prompt", {"prompt": B})[0] == 202
        srv.wait(lambda s: s["prompt"] == B, "the new prompt")
        assert srv.post("/restart", {"seed": 11}) == (202, {"seed": 11})
        s = srv.wait(lambda s: s["video"] == 1 and s["frame"] >= 0 and s["chunk"] >= 2, "the second video")
        assert s["seed"] == 11 and s["prompt"] == B and s["switches"] == []
        first = [f for f in srv.frames(60, after=s["frame"] - 60) if f[2] == 1]
        assert first[0][1] == 0  # the new video starts at its chunk 0 ...
        assert np.array_equal(np.stack([png(f[3]) for f in first[:6]]), offline(toy, [(0.0, B)], 2, seed=11))
        assert srv.post("/restart", {})[1] == {"seed": 12}  # ... and a plain restart takes the next seed
        srv.wait(lambda s: s["video"] == 2, "the third video")
    finally:
        srv.close()
    frames0 = sample_frames(tmp_path / "live.mp4")
    assert len(frames0) > 6 and frames0[0].shape == (128, 128, 3)  # closed, playable, 8x upscaled
    assert (tmp_path / "live_001.mp4").exists() and len(sample_frames(tmp_path / "live_001.mp4")) >= 6
    assert any("restart: video 1, seed 11" in line for line in srv.log)


def sample_frames(path):
    import imageio.v2 as imageio

    with imageio.get_reader(str(path)) as r:
        return [f for f in r]


def test_ctrl_c_closes_a_valid_mp4_and_exits_130(tmp_path):
    out = tmp_path / "live.mp4"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # SIGINT as a terminal's Ctrl-C sends it (default disposition: a job started in the background, as CI may start
    # this suite, inherits SIGINT ignored)
    p = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--live", "--port=0", f"--fps={FPS}",
                          f"--out={out}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = None
        for line in p.stdout:
            if line.startswith("live: open "):
                url = line.split()[2]
                break
        assert url and url.startswith("http://127.0.0.1:")
        after = -1
        for _ in range(20):
            with urllib.request.urlopen(f"{url}frame?after={after}", timeout=15) as r:
                after = int(r.headers["X-Frame"])
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130
    wrote = [line for line in rest.splitlines() if line.startswith(f"wrote {out}")]
    n = int(wrote[0].split(": ")[1].split()[0])
    frames = sample_frames(out)
    assert len(frames) == n >= 20 and frames[0].shape == (128, 128, 3)


def test_frames_go_to_the_page_as_png_when_small_and_jpeg_when_large():
    g = np.random.default_rng(0)
    small = g.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    data, ctype = encode_frame(small)
    assert ctype == "image/png" and np.array_equal(png(data), small)  # lossless: the toy's pixels exactly
    y, x = np.mgrid[0:480, 0:832]  # Wan's frame size; smooth, as video frames are
    large = np.stack([x * 255 // 831, y * 255 // 479, (x + y) * 255 // 1310], -1).astype(np.uint8)
    data, ctype = encode_frame(large)
    assert ctype == "image/jpeg" and data[:2] == b"\xff\xd8" and len(data) < large.nbytes / 4
    assert np.abs(png(data).astype(int) - large).mean() < 2


def test_the_wan_path_streams_to_the_page_too(tmp_path, one_thread):
    """--live with --ckpt / --wan (tiny random files of the real layout, tests/tiny.py): Wan's VAE gives 9 pixel
    frames for the first chunk and 12 after, and the page shows exactly what the mp4 gets."""
    import tiny

    student, wan, _ = tiny.write_files(tmp_path / "tiny")
    cfg = sample.configure(sample.SampleConfig(), ["--live", "--port=0", f"--fps={FPS}", f"--ckpt={student}",
                                                   f"--wan={wan}", "--height=32", "--width=32", "--num_frames=33",
                                                   "--prompt=a cat <b>walks</b>", f"--out={tmp_path / 'w.mp4'}"])
    kind, jobs = sample.check(cfg)
    assert kind == "wan"
    model, te, vae = sample.load_real(cfg, torch.device("cpu"), torch.float32)
    live = Live(FPS, 24, lambda text: "", seed=cfg.seed)
    url = live.serve("127.0.0.1", 0)
    t = threading.Thread(target=sample.run_live, args=(cfg, model, te, vae, model, jobs[0][0], live, lambda *a: None),
                         daemon=True)
    t.start()
    try:
        got, after = [], -1
        while len(got) < 33:
            with urllib.request.urlopen(f"{url}frame?after={after}", timeout=30) as r:
                after = int(r.headers["X-Frame"])
                got.append((int(r.headers["X-Chunk"]), png(r.read())))
        state = json.loads(urllib.request.urlopen(f"{url}state", timeout=30).read())
        assert state["prompt"] == "a cat <b>walks</b>"  # the text as sent: the page shows it with textContent
        end = time.monotonic() + 30
        while not json.loads(urllib.request.urlopen(f"{url}state", timeout=30).read())["finished"]:
            assert time.monotonic() < end
            time.sleep(0.05)
    finally:
        live.close()
        t.join(30)
    assert [c for c, _ in got] == [0] * 9 + [1] * 12 + [2] * 12  # 1 + 4 (3 - 1) pixel frames, then 4 x 3
    assert len(sample_frames(tmp_path / "w.mp4")) == 33
    ref = stream_frames((model, te, vae), cfg, jobs[0][0])
    assert np.array_equal(np.stack([f for _, f in got]), ref)  # the stream, exactly


def test_live_settings_are_checked(capsys):
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None
    assert "beyond this machine" in host_warning("0.0.0.0")
    for args, msg in ([["--prompts=p.txt"], "not with --prompts or --interactive"],
                      [["--interactive=true"], "not with --prompts or --interactive"],
                      [["--port=70000"], "--port=70000: takes 0 .. 65535"],
                      [["--sink_mode=full"], "--sink_mode=full"],
                      [["--live_ahead=-1"], "--live_ahead=-1: must be >= 0"]):
        with pytest.raises(SystemExit, match=msg.replace("(", r"\(").replace(".", r"\.")):
            settings(*args)
    with pytest.raises(SystemExit, match="an .mp4 file path"):  # no mp4 is only for --live
        sample.check(sample.configure(sample.SampleConfig(), ["--out="]))
    cfg, _ = settings()
    assert cfg.num_frames == 0  # --live: no end
    assert sample.check(sample.configure(sample.SampleConfig(), []))[0] == "toy"
    cfg = sample.configure(sample.SampleConfig(), [])
    sample.check(cfg)
    assert cfg.num_frames == 160
    with socket.socket() as busy:  # a port another program holds: one line, before any frame
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit, match=f"--port={busy.getsockname()[1]}: cannot serve there"):
            sample.main(["--live", f"--port={busy.getsockname()[1]}", "--out="])


# ----------------------------------------------------------------------------- the page in a real browser

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


class WebDriver:
    """The W3C WebDriver protocol over HTTP, the few commands this test needs (chromedriver speaks it)."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([DRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                self.call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,720"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": args}}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["value"]

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def js(self, script):
        return self.s("POST", "/execute/sync", {"script": script, "args": []})

    def quit(self):
        try:
            self.s("DELETE", "")
        finally:
            self.proc.kill()


def test_the_page_in_headless_chromium(toy):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("no chromium / chromedriver here: apt-get install chromium chromium-driver (.ci/run does)")
    srv = Server(toy, f"--prompt={A}", fps=16)  # the video's real rate
    try:
        browser = WebDriver()
        try:
            browser.s("POST", "/url", {"url": srv.url})
            frame = lambda: int(browser.js("return document.getElementById('frame').dataset.frame || -1"))  # noqa
            seen = set()
            end = time.monotonic() + 30
            while len(seen) < 5 and time.monotonic() < end:  # the picture changes, frame after frame
                seen.add(frame())
                time.sleep(0.05)
            assert len(seen - {-1}) >= 4, seen
            assert browser.js("return document.getElementById('frame').naturalWidth") == 16
            box = browser.s("POST", "/element", {"using": "css selector", "value": "#prompt"})
            assert browser.js("return document.getElementById('chunk').textContent").isdigit()  # the figures arrived
            browser.s("POST", f"/element/{list(box.values())[0]}/value", {"text": B})  # type (key by key) ...
            shown = srv.state()["chunk"]
            browser.s("POST", f"/element/{list(box.values())[0]}/value", {"text": "\ue007"})  # ... then Enter
            end = time.monotonic() + 30
            while browser.js("return document.getElementById('current').textContent") != B:
                assert time.monotonic() < end, "the page never showed the new prompt"
                time.sleep(0.05)
            took = int(browser.js("return document.querySelector('#switches li:last-child').dataset.chunk"))
            assert srv.state()["switches"][-1] == [0, took, B]  # the page reports the server's switch
            # the next chunk the generator started: at most AHEAD frames (2 chunks) past the picture, plus the one
            # being generated and one for the state's age
            assert shown < took <= shown + AHEAD // 3 + 2, (shown, took)
            assert browser.js("return document.getElementById('prompt').value") == ""
            assert browser.js("return document.getElementById('latency').textContent").endswith(" s")
            if os.environ.get("LIVE_SCREENSHOT"):  # README's picture: LIVE_SCREENSHOT=data/toy/live.png pytest -k chromium
                time.sleep(1.0)
                Path(os.environ["LIVE_SCREENSHOT"]).write_bytes(base64.b64decode(browser.s("GET", "/screenshot")))
        finally:
            browser.quit()
    finally:
        srv.close()
