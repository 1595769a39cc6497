"""
The live page of `python sample.py --live`: watch the stream in a browser while it is generated, and steer it.

    python sample.py --live                      # the toy student; open the printed http://127.0.0.1:8000/
    python sample.py --live --ckpt rewardforcing.pt --wan Wan2.1-T2V-1.3B --port 8080

Three parties share one `Live` object:
- the generator (sample.py's stream loop, in the main thread) pushes each decoded chunk's frames, and waits while
  `ahead` frames are already waiting to be shown: the page's buffer is bounded, generation runs at most that far
  ahead of the picture, and a prompt sent from the page is seen within about that many frames;
- the playback clock (a thread) takes one frame every 1/fps seconds, encodes it (PNG for small frames, JPEG for
  large ones) and publishes it into a ring of the last `ring` frames, which is all any client ever reads;
- the HTTP handlers (the standard library's threading server): a client asks for the first frame after the one it
  has and waits for it (a long poll), so a slow or vanished client costs nothing but its own thread, and every tab
  sees the same frames.

Endpoints (JSON bodies; a POST must say Content-Type: application/json, which a foreign web page cannot send here
without a preflight this server does not answer):
    GET  /                 the page (live.html beside this file)
    GET  /frame?after=N    the oldest published frame with index > N (waits up to 10 s; 204 if none came);
                           headers X-Frame (index), X-Chunk (its chunk), X-Video (restarts so far)
    GET  /state            the live figures: chunk, prompt, FPS, latency, switches, paused, recache, seed, ...
    POST /prompt           {"prompt": "..."}: takes effect at the next chunk the generator starts
    POST /pause, /resume   stop / restart the playback clock (the generator stops when the buffer is full)
    POST /recache          {"on": true|false}: re-encode the window under a new prompt at the next switch
    POST /restart          {"seed": N} or {}: a new video from that seed (default: the last seed + 1)
"""

import io
import json
import threading
import time
import queue
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PAGE = Path(__file__).resolve().parent / "live.html"
MAX_PROMPT = 500  # characters of a prompt sent from the page
MAX_BODY = 4096  # bytes of a request body
POLL_S = 10.0  # longest wait of GET /frame
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_warning(host):
    """The warning printed when the page is served beyond this machine, or None."""
    if host in LOOPBACK:
        return None
    return (f"warning: --host={host} serves the live page beyond this machine: anyone who reaches this port can watch "
            "the stream and send prompts (there is no login)")


def encode_frame(frame):
    """uint8 numpy [H, W, 3] -> (bytes, content type): PNG up to 256x256 (the toy's crisp pixels), JPEG above."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(frame)
    if frame.shape[0] * frame.shape[1] <= 256 * 256:
        img.save(buf, "PNG")
        return buf.getvalue(), "image/png"
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue(), "image/jpeg"


class Live:
    """The state the generator, the playback clock and the page share (see the module docstring).

    fps: playback rate. ahead: frames the generator may be ahead of the picture. check_prompt(text) -> '' or a
    one-line reason the model cannot take it (the toy's vocabulary). seed, recache: the first video's settings."""

    def __init__(self, fps, ahead, check_prompt=lambda text: "", seed=0, recache=False, ring=None):
        self.fps, self.ahead, self.check_prompt = fps, max(1, ahead), check_prompt
        self.cv = threading.Condition()  # guards everything below; notified on every change
        self.waiting = deque()  # (video, chunk, prompt, frame uint8 [H, W, 3]) generated, not yet shown
        self.ring = deque(maxlen=ring or max(32, 2 * fps))  # (index, video, chunk, bytes, content type) shown
        self.index = -1  # the last published frame
        self.prompts = queue.Queue()  # accepted prompt texts for the stream loop (sample.stream_video's new_prompts)
        self.paused, self.recache, self.closed = False, recache, False
        self.seed, self.video, self.restart_seed = seed, 0, None
        self.finished = False  # the current video reached its last frame
        self.generated = 0  # chunks of the current video whose frames were pushed
        self.shown = dict(chunk=-1, prompt="")  # what the picture shows now
        self.switches = []  # [video, chunk, prompt] of every switch, in order
        self.posted = None  # the last accepted prompt until its first frame is shown: dict(text, t, chunk)
        self.latency_s = None  # from the last switching prompt's POST to its first frame on the page
        self.gen_fps = None  # frames per second of generation (time outside push), smoothed
        self._last_push = None
        self.clock = threading.Thread(target=self._play, name="live-clock", daemon=True)
        self.clock.start()
        self.server = None

    # -- the generator's side ---------------------------------------------------------------------------------

    def start_video(self, seed):
        """A new video begins: forget the old one's unshown frames."""
        with self.cv:
            self.seed, self.restart_seed, self.finished, self.generated = seed, None, False, 0
            self.waiting.clear()
            self._last_push = None
            self.cv.notify_all()

    def stop_requested(self):
        """True once a restart or close asks the current video to end (checked between chunks)."""
        return self.restart_seed is not None or self.closed

    def switched(self, chunk, prompt):
        """The stream loop switched to `prompt` at `chunk` (a page prompt, or the schedule's)."""
        with self.cv:
            self.switches.append([self.video, chunk, prompt])
            if self.posted is not None and self.posted["text"] == prompt:
                self.posted["chunk"] = chunk  # its latency ends when this chunk's first frame is shown

    def push(self, chunk, prompt, frames):
        """Queue chunk `chunk`'s frames (uint8 numpy [f, H, W, 3]) for the page; waits while `ahead` frames are
        waiting already (paused, or generating faster than real time). Returns early on a restart or close."""
        now = time.monotonic()
        with self.cv:
            if self._last_push is not None and now > self._last_push:
                fps = len(frames) / (now - self._last_push)
                self.gen_fps = fps if self.gen_fps is None else 0.8 * self.gen_fps + 0.2 * fps
            self.generated = chunk + 1
            for frame in frames:
                while len(self.waiting) >= self.ahead and not self.stop_requested():
                    self.cv.wait(0.25)  # timed: Ctrl-C reaches the main thread
                if self.stop_requested():
                    return
                self.waiting.append((self.video, chunk, prompt, frame))
                self.cv.notify_all()
            self._last_push = time.monotonic()

    def end_video(self):
        with self.cv:
            self.finished = True
            self.cv.notify_all()

    def wait_restart(self):
        """After a video's last frame: wait for a restart (returns its seed) or close (None)."""
        with self.cv:
            while self.restart_seed is None and not self.closed:
                self.cv.wait(0.25)
            return None if self.closed else self.restart_seed

    def begin_restart(self):
        """The generator takes a requested restart: returns its seed and counts the new video (whose frames the
        clock then tells from the old one's; start_video clears what is left of those)."""
        with self.cv:
            self.video += 1
            self.cv.notify_all()
            return self.restart_seed

    # -- the playback clock -----------------------------------------------------------------------------------

    def _play(self):
        due = time.monotonic()
        while True:
            with self.cv:
                while not self.closed and (self.paused or not self.waiting):
                    self.cv.wait(0.25)
                    due = max(due, time.monotonic())  # after a pause or a dry spell: no burst to catch up
                if self.closed:
                    return
                video, chunk, prompt, frame = self.waiting.popleft()
                self.cv.notify_all()  # room for the generator
            data, ctype = encode_frame(frame)
            time.sleep(max(0.0, due - time.monotonic()))
            with self.cv:
                if video != self.video:  # a restart came while this frame was encoded
                    continue
                self.index += 1
                self.ring.append((self.index, video, chunk, data, ctype))
                first = chunk != self.shown["chunk"]
                self.shown = dict(chunk=chunk, prompt=prompt)
                if first and self.posted is not None and self.posted["chunk"] == chunk:
                    self.latency_s = time.monotonic() - self.posted["t"]
                    self.posted = None
                self.cv.notify_all()
            due += 1.0 / self.fps

    # -- the page's side ----------------------------------------------------------------------------------------

    def frame_after(self, after, timeout=POLL_S):
        """The oldest frame in the ring with index > after, waiting up to `timeout` s; None if none came."""
        end = time.monotonic() + timeout
        with self.cv:
            while not self.closed:
                for item in self.ring:
                    if item[0] > after:
                        return item
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cv.wait(min(left, 0.5))
        return None

    def state(self):
        with self.cv:
            return dict(frame=self.index, chunk=self.shown["chunk"], prompt=self.shown["prompt"], video=self.video,
                        seed=self.seed, generated_chunks=self.generated, waiting_frames=len(self.waiting),
                        paused=self.paused, recache=self.recache, finished=self.finished and not self.waiting,
                        fps=self.fps, generation_fps=self.gen_fps, latency_s=self.latency_s,
                        pending_prompt=self.posted["text"] if self.posted else None,
                        switches=[s for s in self.switches if s[0] == self.video][-50:], max_prompt=MAX_PROMPT)

    def post_prompt(self, text):
        """A prompt from the page -> (the prompt taken, whitespace tidied, ''), or (None, the reason). A taken prompt
        takes effect at the next chunk."""
        if not isinstance(text, str) or not text.strip():
            return None, "the prompt must be a non-empty string"
        text = " ".join(text.split())
        if len(text) > MAX_PROMPT:
            return None, f"the prompt has {len(text)} characters; at most {MAX_PROMPT}"
        if err := self.check_prompt(text):
            return None, err
        with self.cv:
            self.posted = dict(text=text, t=time.monotonic(), chunk=None)
            self.prompts.put(text)
            self.cv.notify_all()
        return text, ""

    def set(self, **kw):
        """paused / recache / restart_seed from the page."""
        with self.cv:
            for k, v in kw.items():
                setattr(self, k, v)
            self.cv.notify_all()

    # -- the server ---------------------------------------------------------------------------------------------

    def serve(self, host="127.0.0.1", port=8000):
        """Start the HTTP server in a daemon thread; returns its URL (port 0: a free port)."""
        self.server = ThreadingHTTPServer((host, port), make_handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="live-http", daemon=True).start()
        h, p = self.server.server_address[:2]
        return f"http://{'127.0.0.1' if h in ('0.0.0.0', '::') else h}:{p}/"

    def close(self):
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def make_handler(live):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "reward-forcing-live"
        timeout = 60  # s: a connection that sends nothing for this long is dropped (its thread ends)

        def handle(self):
            try:
                super().handle()
            except (ConnectionError, TimeoutError):  # the client went away, or stalled: nothing to report
                pass

        def log_message(self, *args):  # the terminal belongs to the progress bar
            pass

        def send(self, status, body=b"", ctype="application/json", headers=()):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def error(self, status, message):
            self.send(status, json.dumps({"error": message}).encode())

        def host_ok(self):
            """On a loopback address, the Host header must name it (a DNS-rebinding page names its own host)."""
            bound = live.server.server_address[0]
            if bound not in LOOPBACK:
                return True
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            return host in LOOPBACK

        def handle_one(self, method):
            try:
                if not self.host_ok():
                    return self.error(HTTPStatus.FORBIDDEN, "unexpected Host header")
                url = urlsplit(self.path)
                route = ROUTES.get(url.path)
                if route is None:
                    return self.error(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")
                if route[0] != method:
                    return self.send(HTTPStatus.METHOD_NOT_ALLOWED, json.dumps({"error": f"use {route[0]}"}).encode(),
                                     headers=[("Allow", route[0])])
                body = None
                if method == "POST":
                    if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                        return self.error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json")
                    try:
                        n = int(self.headers.get("Content-Length") or 0)
                    except ValueError:
                        return self.error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
                    if n > MAX_BODY or n < 0:
                        self.close_connection = True  # the body is not read
                        return self.error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"bodies are at most {MAX_BODY} bytes")
                    try:
                        body = json.loads(self.rfile.read(n) or b"{}")
                    except (ValueError, UnicodeDecodeError):
                        return self.error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
                    if not isinstance(body, dict):
                        return self.error(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
                route[1](self, parse_qs(url.query), body)
            except (ConnectionError, TimeoutError):
                self.close_connection = True  # the client went away: nothing else to do

        def do_GET(self):
            self.handle_one("GET")

        def do_POST(self):
            self.handle_one("POST")

        def do_PUT(self):
            self.handle_one("PUT")

        def do_DELETE(self):
            self.handle_one("DELETE")

    def page(h, query, body):
        h.send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8",
               [("Content-Security-Policy", "default-src 'self'; img-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
                                            "script-src 'self' 'unsafe-inline'")])

    def frame(h, query, body):
        try:
            after = int(query.get("after", ["-1"])[0])
        except ValueError:
            return h.error(HTTPStatus.BAD_REQUEST, "after= takes a frame index")
        item = live.frame_after(after)
        if item is None:
            return h.send(HTTPStatus.NO_CONTENT)
        index, video, chunk, data, ctype = item
        h.send(HTTPStatus.OK, data, ctype, [("X-Frame", str(index)), ("X-Chunk", str(chunk)), ("X-Video", str(video))])

    def state(h, query, body):
        h.send(HTTPStatus.OK, json.dumps(live.state()).encode())

    def prompt(h, query, body):
        if set(body) != {"prompt"}:
            return h.error(HTTPStatus.BAD_REQUEST, 'send {"prompt": "..."}')
        text, err = live.post_prompt(body["prompt"])
        if err:
            return h.error(HTTPStatus.BAD_REQUEST, err)
        h.send(HTTPStatus.ACCEPTED, json.dumps({"accepted": text}).encode())

    def pause(h, query, body, on=True):
        if body:
            return h.error(HTTPStatus.BAD_REQUEST, "takes no fields")
        live.set(paused=on)
        h.send(HTTPStatus.OK, json.dumps({"paused": on}).encode())

    def recache(h, query, body):
        if set(body) != {"on"} or not isinstance(body["on"], bool):
            return h.error(HTTPStatus.BAD_REQUEST, 'send {"on": true} or {"on": false}')
        live.set(recache=body["on"])
        h.send(HTTPStatus.OK, json.dumps({"recache": body["on"]}).encode())

    def restart(h, query, body):
        seed = body.get("seed", live.seed + 1)
        if set(body) - {"seed"} or not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            return h.error(HTTPStatus.BAD_REQUEST, 'send {} or {"seed": N} with 0 <= N < 2^63')
        live.set(restart_seed=seed, paused=False)
        h.send(HTTPStatus.ACCEPTED, json.dumps({"seed": seed}).encode())

    ROUTES = {"/": ("GET", page), "/frame": ("GET", frame), "/state": ("GET", state), "/prompt": ("POST", prompt),
              "/pause": ("POST", pause), "/resume": ("POST", lambda h, q, b: pause(h, q, b, on=False)),
              "/recache": ("POST", recache), "/restart": ("POST", restart)}
    return Handler
