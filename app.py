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
re-ranking: predict.folder_answer), drawn with the report's row (report.py).
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
import argparse
import atexit
import contextlib
import html
import io
import os
import shutil
import tempfile
import threading

import numpy as np
import torch

import predict
import report
from dataset import BadImage, decode_rgb
from util import UserError, run_main

MAX_PIXELS = 100_000_000  # a decoded 100-megapixel RGB image is 300 MB


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--spec", help='JSON: {"models": [{"enet_type", "checkpoint", "image_size"}]}')
    p.add_argument("--backbone", metavar="NAME", help="in place of --spec: no training (as predict.py --backbone)")
    p.add_argument("--pretrained-path", default=None, help="with --backbone: its ImageNet weights file")
    p.add_argument("--image-size", type=int, default=256, help="with --backbone: the input size (default 256)")
    p.add_argument("--pool", choices=["avg", "gem"], default="avg", help="with --backbone: global pooling")
    p.add_argument("--whiten", choices=["auto", "pca", "off"], default="auto", help="with --backbone: as predict.py")
    p.add_argument("--index", help="a saved gallery index (predict.py --save-index), built with these models")
    p.add_argument("--gallery-dir", help="the gallery's folders: where the neighbours' photos are shown from "
                                         "(default: the folder the index was built from); without --index, "
                                         "embedded at start")
    p.add_argument("--idx2landmark", default=None, help="the label map of --spec's models (names the classes)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest photo accepted, MB (default 20)")
    p.add_argument("--max-files", type=int, default=16, help="most photos per request (default 16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--precision", choices=sorted(predict.PRECISIONS), default="fp32")
    p.add_argument("--trust-checkpoint", action="store_true", help="as predict.py (only for files you trust)")
    p.add_argument("--rerank-vote", choices=["auto", "sum", "max"], default="auto", help="as predict.py")
    p.add_argument("--rerank-cls-power", type=predict._auto_or_power, default=None, metavar="auto|P",
                   help="as predict.py")
    predict.add_search_args(p)  # --knn exact|faiss and the faiss flags, as predict.py
    a = p.parse_args(argv)
    if (a.spec is None) == (a.backbone is None):
        p.error("give --spec (trained models) or --backbone (no training), not both")
    if a.index is None and a.gallery_dir is None:
        p.error("give --index (a saved one) or --gallery-dir (embedded at start)")
    if not a.max_upload_mb > 0 or a.max_files < 1:
        p.error("--max-upload-mb and --max-files must be positive")
    return a


class Recognizer:
    """The models and the gallery index in memory; answers RGB images. One answer
    at a time (a lock): requests queue rather than each holding a batch of
    activations."""

    def __init__(self, a, workdir):
        from gallery import load_index, model_signature
        self.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        index = a.index
        if index is None:  # embed the gallery once, through predict.py's own path
            index = os.path.join(workdir, "index")
            predict.run_folders(predict.options(a, index=None, save_index=index, num_workers=0,
                                                device=self.device.type))
        opts = predict.options(a)  # predict.py's options, those of the page among them
        self.setup = s = predict.load_setup(opts, self.device)
        signature = s.signature if s.zero else model_signature(s.models, s.ckpts, s.pres)
        idx = load_index(index, signature)
        self.g_emb, self.g_labels, self.g_rel = idx["emb"], idx["labels"], idx["paths"]
        self.names = s.known | idx["names"]
        root = a.gallery_dir or idx["gallery_dir"]
        self.g_paths = [os.path.join(root, p) if root else p for p in self.g_rel]
        self.precision, self.whitening = a.precision, None
        if s.zero is None:
            self.models = [(predict.load_model(m["enet_type"], c, self.device, a.trust_checkpoint,
                                               image_size=int(m["image_size"])), int(m["image_size"]))
                           for m, c in zip(s.models, s.ckpts)]
            self.heads = [m.metric_classify for m, _ in self.models]
        else:  # the whitening is learnt on the gallery once, not per request
            self.models, self.heads = [(s.zmodel, s.size)], None
            self.whitening = predict.gallery_whitening(s, self.g_emb)
        self.search = predict.search_of(opts)
        if self.search.kind == "faiss":  # the saved index's own faiss index when it fits, else built once here
            self.search.index = predict.folder_faiss(opts, idx, len(self.g_rel),
                                                     [self.whitening[1]] if self.whitening else self.g_emb)
        self.lock = threading.Lock()
        print(f"gallery: {len(self.g_rel)} photos of {len(set(self.g_labels.tolist()))} landmarks; "
              f"{len(self.models)} model(s) on {self.device}", flush=True)

    def name_of(self, label):
        return self.names.get(label, str(label))

    def __call__(self, images):
        """[{'landmark', 'landmark_id', 'confidence', 'neighbours': [(path under the
        gallery, photo path, landmark id, cosine)], 'answers': {part: (id, conf)}}]."""
        with self.lock:
            zqs = [predict.embed_images(m, images, size, self.device, self.precision) for m, size in self.models]
            res, _, _ = predict.folder_answer(self.setup, zqs, self.g_emb, self.heads, self.g_labels, self.device,
                                              whitening=self.whitening, search=self.search)
        sims, nn = res["neighbours"]
        parts = {k: report._answers(res[k]) for k in ("classifier", "retrieval") if k in res and self.heads}
        out = []
        for i, pred in enumerate(report._answers(res["ensemble"])):
            out.append({"landmark": self.name_of(pred[0]) if pred else "", "landmark_id": pred[0] if pred else None,
                        "confidence": pred[1] if pred else 0.0, "prediction": pred,
                        "answers": {k: v[i] for k, v in parts.items()},
                        "neighbours": [(self.g_rel[j], self.g_paths[j], int(self.g_labels[j]), float(c))
                                       for c, j in zip(sims[i], nn[i]) if np.isfinite(c)]})
        return out


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
</script>"""
APP_CSS = ("<style>.drop{display:block;border:2px dashed #aaa;border-radius:8px;padding:1.5em;margin:1em 0;"
           "max-width:40em}.drop.over{border-color:#36c;background:#eef4ff}button{font-size:1em;padding:4px 14px}"
           "</style>")


def page_html(rec, messages=(), rows=""):
    about = "" if rec is None else (f'<p class="muted">gallery: {len(rec.g_rel)} photos of '
                                    f'{len(set(rec.g_labels.tolist()))} landmarks</p>')
    msgs = "".join(f'<p class="msg">{html.escape(m)}</p>' for m in messages)
    table = ('<table class="queries"><tr><th>photo</th><th>landmark</th>'
             + "".join(f"<th>{k}</th>" for k in range(1, 6)) + f"</tr>{rows}</table>") if rows else ""
    return report.page("Landmark recognition", f"{APP_CSS}<h1>Landmark recognition</h1>{about}{FORM}{msgs}{table}")


def create_app(a, workdir):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    rec = Recognizer(a, workdir)
    thumbs = report.Thumbnails(limit=20000)
    max_bytes = int(a.max_upload_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        # on shutdown (Ctrl-C, SIGTERM): uvicorn re-raises the signal after it, so atexit would not run
        shutil.rmtree(workdir, ignore_errors=True)

    api = FastAPI(title="Landmark recognition", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    async def answers(request):
        """[(file name, answer or None, message or None)] of the request's photos."""
        form = await request.form(max_files=a.max_files, max_fields=10)
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
        if checked:  # the model runs in a worker thread: the server goes on answering
            from starlette.concurrency import run_in_threadpool
            results = await run_in_threadpool(rec, [im for _, im in checked])
        else:
            results = []
        return [(n, im, r) for (n, im), r in zip(checked, results)], messages

    @api.get("/", response_class=HTMLResponse)
    def index():
        return page_html(rec)

    @api.post("/", response_class=HTMLResponse)
    async def recognise(request: Request):
        done, messages = await answers(request)
        rows = "".join(report.render_row({"id": n, "image": im, "prediction": r["prediction"],
                                          "answers": r["answers"],
                                          "neighbours": [(p, lid, c) for _, p, lid, c in r["neighbours"]]},
                                         rec.name_of, thumbs) for n, im, r in done)
        return HTMLResponse(page_html(rec, messages, rows), status_code=200 if done or not messages else 400)

    @api.post("/api/recognize")
    async def recognise_json(request: Request):
        done, messages = await answers(request)
        return JSONResponse({"results": [{"file": n, "landmark": r["landmark"], "landmark_id": r["landmark_id"],
                                          "confidence": r["confidence"],
                                          "neighbours": [{"path": g, "landmark": rec.name_of(lid), "cosine": c}
                                                         for g, _, lid, c in r["neighbours"]]}
                                         for n, _, r in done], "errors": messages},
                            status_code=200 if done or not messages else 400)

    @api.get("/healthz")
    def healthz():
        return {"ok": True, "gallery": len(rec.g_rel)}

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
