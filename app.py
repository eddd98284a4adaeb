"""A recognition page for your own photos: drop or pick photos, see each one's
landmark, confidence and 5 nearest gallery photos.

    make app                                       # installs requirements-app.txt (FastAPI, uvicorn) into .venv
    python app.py --spec S --index I               # models and a saved index (predict.py --save-index)
    python app.py --backbone NAME --pretrained-path W --index I   # no training (the index built with --backbone)
    python app.py --spec S --gallery-dir G         # no saved index: the gallery is embedded at start

Then open http://127.0.0.1:7860. Routes: GET / (the page), POST / (form field
`photos`, one or more files: the page with the answers), POST /api/recognize
(the same answers as JSON), GET /healthz.

The models and the index are loaded once, at start; the answers are those of
predict.py on the same files (the same resize, embeddings, retrieval and
re-ranking: recognizer.Recognizer), drawn with the report's row (report.py).
The page is rendered on the server and needs nothing from another host: it
works offline, and uploads never leave the machine. FastAPI rather than
Gradio: Gradio's page fetches its fonts from a CDN and brings a large
dependency tree; this page is one form and a table.

Safety: it listens on 127.0.0.1 unless --host says otherwise. An upload that
is empty, not an image, larger than --max-upload-mb or over 100 megapixels
gets a message and nothing else happens; uploads are decoded in memory, and
what the form parser spools to disk goes to a temporary folder of this
process, removed when it stops.
"""
import atexit
import contextlib
import html
import io
import os
import shutil
import tempfile
import threading

from types import SimpleNamespace

import torch

import ensemble
import features
import report
from dataset import BadImage, decode_rgb
from features import Images
from recognizer import (Recognizer, add_args as add_answer_args, check_args as check_answer_args, open_gallery,
                        settings_of)
from util import ArgumentParser, UserError, run_main

MAX_PIXELS = 100_000_000  # a decoded 100-megapixel RGB image is 300 MB


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ensemble.add_args(p)  # --spec or --backbone (no training) and their options, as predict.py
    p.add_argument("--index", help="a saved gallery index (predict.py --save-index), built with these models")
    p.add_argument("--gallery-dir", help="the gallery's folders: where the neighbours' photos are shown from "
                                         "(default: the folder the index was built from); without --index, "
                                         "embedded at start")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest photo accepted, MB (default 20)")
    p.add_argument("--max-files", type=int, default=16, help="most photos per request (default 16)")
    features.add_args(p)  # --device, --precision
    add_answer_args(p)  # --knn exact|faiss and the faiss flags, --calibrate, --min-confidence, as predict.py
    a = p.parse_args(argv)
    if (a.spec is None) == (a.backbone is None):
        p.error("give --spec (trained models) or --backbone (no training), not both")
    if a.index is None and a.gallery_dir is None:
        p.error("give --index (a saved one) or --gallery-dir (embedded at start)")
    if not a.max_upload_mb > 0 or a.max_files < 1:
        p.error("--max-upload-mb and --max-files must be positive")
    if a.image_size <= 0:
        p.error(f"--image-size {a.image_size}: must be positive")
    try:  # as predict.py, before the gallery is embedded
        check_answer_args(a)
    except UserError as e:
        p.error(str(e))
    return a


# as predict.py embeds a gallery (its defaults): the page's gallery is the one predict.py --save-index writes
GALLERY_EMBEDDING = SimpleNamespace(batch_size=64, num_workers=0, cache_dir=None)


class Page:
    """The models, kept in memory, and the Recognizer of the gallery; answers RGB images. One
    answer at a time (a lock): requests queue rather than each holding a batch of activations."""

    def __init__(self, a):
        self.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = a.precision
        ens = ensemble.load(a, self.device)
        gallery, todo = open_gallery(ens, a.index, a.gallery_dir)
        if todo:  # no saved index: the gallery is embedded once, at start
            emb = features.embed_all(SimpleNamespace(**vars(GALLERY_EMBEDDING), precision=a.precision), ens,
                                     [Images("gallery", [os.path.join(a.gallery_dir, p) for p, _ in todo])],
                                     self.device)
            gallery.extend(todo, emb.features["gallery"])
        self.models = [(m.load(self.device), m) for m in ens.members]
        heads = [m.metric_classify for m, _ in self.models] if ens.classifies else None
        self.rec = Recognizer(ens, gallery, heads, settings_of(a, self.device))
        self.lock = threading.Lock()
        where = os.path.basename(os.path.normpath(a.index if a.index is not None else a.gallery_dir))
        kind = "trained" if ens.classifies else "pretrained, no training"
        self.about = (f"gallery: {len(gallery)} photos of {len(set(gallery.labels.tolist()))} landmarks ({where}); "
                      f"model(s): {', '.join(m.name for m in ens.members)} ({kind})")
        if self.rec.calibration is not None:
            self.about += f"; answers below {a.min_confidence:.0%} confidence are 'not sure'"
        print(f"{self.about}; on {self.device}", flush=True)

    def __call__(self, images):
        """Recognizer.answers of the images (RGB uint8 arrays)."""
        with self.lock:
            zqs = [features.embed_member(m, member, images, self.device, self.precision) for m, member in self.models]
            res = self.rec.answer(zqs, images=images)
        return self.rec.answers(res)


def check_upload(name, data, max_bytes):
    """The upload decoded to RGB, or raises ValueError with the message shown."""
    from PIL import Image, UnidentifiedImageError
    if not data:
        raise ValueError("empty file")
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes / 2**20:g} MB (--max-upload-mb)")
    try:  # the header alone: the size is known before anything is decoded
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError:
        raise ValueError(f"more than {MAX_PIXELS // 10**6} megapixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ValueError("not an image (JPEG, PNG, WebP, BMP or TIFF)") from None
    if w * h > MAX_PIXELS:
        raise ValueError(f"{w} x {h} is more than {MAX_PIXELS // 10**6} megapixels")
    try:
        return decode_rgb(data, name)
    except BadImage as e:
        raise ValueError(e.reason) from None


class BodyLimit:
    """ASGI middleware: a request body beyond `limit` bytes is refused (413) before it
    is parsed, whether it declares its length or streams it."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return msg
        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = page_html(None, [f"the request is larger than {self.limit / 2**20:.0f} MB: send fewer or smaller "
                                "photos"]).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/html; charset=utf-8")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


FORM = """<form method="post" action="/" enctype="multipart/form-data" id="upload">
<label class="drop" id="drop">Drop photos here, or pick them:
<input type="file" name="photos" id="photos" multiple accept="image/*"></label>
<button type="submit" id="go">Recognise</button></form>
<script>
// dropping files anywhere on the zone sends them (no library, nothing fetched)
const zone = document.getElementById('drop'), input = document.getElementById('photos');
zone.addEventListener('dragover', e => { e.preventDefault(); zone.classList.add('over'); });
zone.addEventListener('dragleave', () => zone.classList.remove('over'));
zone.addEventListener('drop', e => { e.preventDefault(); input.files = e.dataTransfer.files;
  document.getElementById('upload').submit(); });
// picking photos sends them too; the button stays for keyboards and for browsers without scripts
input.addEventListener('change', () => { if (input.files.length) document.getElementById('upload').submit(); });
</script>"""
APP_CSS = ("<style>.drop{display:block;border:2px dashed #aaa;border-radius:8px;padding:1.5em;margin:1em 0;"
           "max-width:40em}.drop.over{border-color:#36c;background:#eef4ff}button{font-size:1em;padding:4px 14px}"
           "</style>")


def page_html(about, messages=(), rows=""):
    """The page: `about` (what it serves, Page.about; None: nothing said), messages, the answers' rows."""
    about = "" if about is None else f'<p class="muted about">{html.escape(about)}</p>'
    msgs = "".join(f'<p class="msg">{html.escape(m)}</p>' for m in messages)
    table = ('<table class="queries"><tr><th>photo</th><th>landmark</th>'
             + "".join(f"<th>{k}</th>" for k in range(1, 6)) + f"</tr>{rows}</table>") if rows else ""
    return report.page("Landmark recognition", f"{APP_CSS}<h1>Landmark recognition</h1>{about}{FORM}{msgs}{table}")


async def answer_request(request, page, max_files, max_bytes):
    """([(file name, RGB image, Page's answer)], [message per refused file]) of a request's photos
    (form field `photos`)."""
    form = await request.form(max_files=max_files, max_fields=10)
    files = [f for f in form.getlist("photos") if hasattr(f, "filename")]
    if not files:
        return [], ["choose one or more photos"]
    checked, messages = [], []
    for f in files:
        name = os.path.basename(f.filename or "upload")
        data = await f.read(max_bytes + 1)
        try:
            checked.append((name, check_upload(name, data, max_bytes)))
        except ValueError as e:
            messages.append(f"{name}: {e}")
    await form.close()
    results = []
    if checked:  # the model runs in a worker thread: the server goes on answering
        from starlette.concurrency import run_in_threadpool
        results = await run_in_threadpool(page, [im for _, im in checked])
    return [(n, im, r) for (n, im), r in zip(checked, results)], messages


def create_app(a, workdir):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    page = Page(a)
    rec, about = page.rec, page.about
    thumbs = report.Thumbnails(limit=20000)
    max_bytes = int(a.max_upload_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        # on shutdown (Ctrl-C, SIGTERM): uvicorn re-raises the signal after it, so atexit would not run
        shutil.rmtree(workdir, ignore_errors=True)

    api = FastAPI(title="Landmark recognition", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def answers(request):
        return answer_request(request, page, a.max_files, max_bytes)

    @api.get("/", response_class=HTMLResponse)
    def index():
        return page_html(about)

    @api.post("/", response_class=HTMLResponse)
    async def recognise(request: Request):
        done, messages = await answers(request)
        rows = "".join(report.render_row({"id": n, "image": im, "prediction": r["prediction"], "sure": r["sure"],
                                          "calibrated": r["calibrated"], "answers": r["answers"],
                                          "neighbours": [(p, lid, c) for _, p, lid, c in r["neighbours"]]},
                                         rec.name_of, thumbs) for n, im, r in done)
        return HTMLResponse(page_html(about, messages, rows), status_code=200 if done or not messages else 400)

    @api.post("/api/recognize")
    async def recognise_json(request: Request):
        done, messages = await answers(request)
        return JSONResponse({"results": [{"file": n, "landmark": r["landmark"], "landmark_id": r["landmark_id"],
                                          "guess": r["guess"], "sure": r["sure"], "confidence": r["confidence"],
                                          "neighbours": [{"path": g, "landmark": rec.name_of(lid), "cosine": c}
                                                         for g, _, lid, c in r["neighbours"]]}
                                         for n, _, r in done], "errors": messages},
                            status_code=200 if done or not messages else 400)

    @api.get("/healthz")
    def healthz():
        return {"ok": True, "gallery": len(rec.gallery)}

    return BodyLimit(api, a.max_files * max_bytes + 2**20)


def main(argv=None):
    a = parse_args(argv)
    import importlib.util
    for mod in ("fastapi", "multipart", "uvicorn"):
        if importlib.util.find_spec(mod) is None:
            raise UserError(f"app.py needs {mod}: make app (pip install -r requirements-app.txt)")
    import uvicorn
    # Every temporary file of this process (the form parser spools large uploads to
    # disk) goes to one folder of its own, removed when it stops.
    workdir = tempfile.mkdtemp(prefix="landmark-app-")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    tempfile.tempdir = workdir
    app = create_app(a, workdir)
    print(f"open http://{a.host}:{a.port}", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
