"""`patchflow serve`: the HTTP API (results, reproducibility, concurrency, errors) and the studio page in a real
headless Chromium, over three tiny runs: class-conditional (pixels), text-to-image and text-to-video."""
import base64
import io
import json
import os
import shlex
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="patchflow serve needs fastapi (pip install 'patchflow[serve]')")
pytest.importorskip("uvicorn", reason="patchflow serve needs uvicorn (pip install 'patchflow[serve]')")
httpx = pytest.importorskip("httpx", reason="the API tests talk HTTP through httpx")

from patchflow.cli import main  # noqa: E402
from patchflow.config import load_config  # noqa: E402
from patchflow.data.moving_digits import MovingDigitsDataset  # noqa: E402
from patchflow.serve import RequestError, Studio, build_app  # noqa: E402
from patchflow.train.run import train  # noqa: E402

from browser import chromium_page  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
TEXT_PROMPT = "a red 7 on a black background, in the center"
VIDEO_PROMPT = "a red 7 moving left on a black background"
COMMON = ["train.steps=2", "train.batch_size=4", "train.log_every=1", "train.sample_every=0",
          "train.checkpoint_every=2", "train.num_threads=1", "sample.steps=3"]
TEXT = ["model.input_size=32", "model.in_channels=3", "model.patch_size=8", "model.hidden_size=32", "model.depth=2",
        "model.num_heads=2", "model.text_dim=384", "model.pooled_dim=384", "text.cache=\"off\""]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, session_cache):
    """name -> run directory: `digits` (class), `t2i` (text-to-image), `t2v` (text-to-video, 4 frames)."""
    base = tmp_path_factory.mktemp("served")
    os.environ["PATCHFLOW_CACHE"] = str(session_cache)
    threads = torch.get_num_threads()
    sets = {
        "digits": ("digits", ["model.preset=\"DiT-Micro/4\""]),
        "t2i": (None, ["model.arch=\"mmdit\"", "data.dataset=\"color-digits\"", *TEXT]),
        "t2v": (None, ["model.arch=\"video\"", "model.frames=4", "data.dataset=\"moving-digits\"", "data.frames=4",
                       "flow.context_prob=0.5", *TEXT]),
    }
    out = {}
    for name, (preset, extra) in sets.items():
        out[name] = base / name
        train(load_config(preset, COMMON + extra), out[name], progress=False)
    torch.set_num_threads(threads)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs):
    """The app over the three runs, served by uvicorn on a free localhost port in a thread."""
    import uvicorn

    studio = Studio([runs["digits"], runs["t2i"], runs["t2v"]], device="cpu")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(studio), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    studio.loaded.wait(120)
    assert studio.load_error is None, studio.load_error
    yield studio, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server[1], timeout=120) as client:
        yield client


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def gif_frames(data: bytes) -> np.ndarray:
    from PIL import ImageSequence

    with Image.open(io.BytesIO(data)) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def still_b64() -> tuple[str, np.ndarray]:
    frame = MovingDigitsDataset("val", frames=1).render(0)[0][0]
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode(), frame


# ---------------------------------------------------------------------------------------------- the API


def test_runs_lists_every_run_with_what_it_takes(api):
    runs = {r["name"]: r for r in api.get("/api/runs").json()["runs"]}
    assert list(runs) == ["digits", "t2i", "t2v"]
    assert [runs[n]["kind"] for n in runs] == ["class", "text", "video"]
    assert runs["digits"]["num_classes"] == 10 and runs["digits"]["sizes"] is False
    assert runs["t2i"]["num_classes"] is None and runs["t2i"]["size_step"] == 8
    assert runs["t2v"]["frames"] == 4 and runs["t2v"]["first_frame"] is True
    assert all(r["steps"] == 3 and (r["height"], r["width"]) == (32, 32) for r in runs.values())


def test_an_image_is_the_sample_its_settings_reproduce(server, api, tmp_path):
    studio, _ = server
    r = api.post("/api/generate", json={"run": "t2i", "prompt": TEXT_PROMPT, "seed": 5, "steps": 2, "guidance": 2.5})
    image = png(r)
    assert image.shape == (32, 32, 3)
    settings = json.loads(r.headers["x-patchflow-settings"])
    assert settings.pop("seconds") > 0  # the time the sample took
    assert settings == {"run": "t2i", "seed": 5, "steps": 2, "guidance": 2.5, "sampler": "euler",
                        "prompt": TEXT_PROMPT, "negative_prompt": None, "height": 32, "width": 32}
    direct = studio.runs["t2i"].pipe(prompt=TEXT_PROMPT, n=1, seed=5, steps=2, guidance=2.5)[0]
    assert np.array_equal(image, direct)
    # the page's command line draws the same pixels
    job = api.post("/api/jobs", json={"run": "t2i", "prompt": TEXT_PROMPT, "seed": 5, "steps": 2, "guidance": 2.5})
    state = wait(api, job.json()["id"])
    command = shlex.split(state["items"][0]["settings"]["command"])
    assert command[:3] == ["patchflow", "sample", str(studio.runs["t2i"].path)]
    out = tmp_path / "again.npz"
    assert main(command[1:-2] + ["--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert np.array_equal(np.load(out)["images"][0], image)


def test_a_class_sample_and_a_grid_of_several(server, api):
    studio, _ = server
    one = png(api.post("/api/generate", json={"run": "digits", "label": 3, "seed": 7}))
    assert one.shape == (32, 32)  # a grey PNG of the one-channel digits
    expected = studio.runs["digits"].pipe(labels=3, n=1, seed=7)[0]
    assert np.array_equal(one.reshape(expected.shape), expected)
    grid = png(api.post("/api/generate", json={"run": "digits", "label": 3, "seed": 7, "n": 3}))
    assert grid.shape[:2] == (2 + 34, 2 + 3 * 34)  # one row of three, 2-pixel gaps
    # sample k of n is seed + k drawn alone
    assert np.array_equal(grid[2:34, 2 + 34:34 + 34].reshape(expected.shape),
                          studio.runs["digits"].pipe(labels=3, n=1, seed=8)[0])


def test_a_clip_is_a_gif_and_a_first_frame_is_kept(server, api):
    studio, _ = server
    r = api.post("/api/generate", json={"run": "t2v", "prompt": VIDEO_PROMPT, "seed": 1})
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif", r.text
    clip = gif_frames(r.content)
    direct = studio.runs["t2v"].pipe(prompt=VIDEO_PROMPT, n=1, seed=1)[0]
    assert clip.shape == direct.shape == (4, 32, 32, 3)
    # a GIF frame holds 256 colours: exact for flat drawings, close for these noisy untrained frames
    assert np.abs(clip.astype(int) - direct).mean() < 16
    job = studio.job(api.post("/api/jobs", json={"run": "t2v", "prompt": VIDEO_PROMPT, "seed": 1}).json()["id"])
    assert job.finished.wait(60) and np.array_equal(job.samples[0], direct)
    data, frame = still_b64()
    r = api.post("/api/generate", json={"run": "t2v", "prompt": VIDEO_PROMPT, "seed": 1,
                                        "first_frame": f"data:image/png;base64,{data}", "frames": 8})
    assert r.status_code == 200, r.text
    clip = gif_frames(r.content)
    assert clip.shape == (8, 32, 32, 3)
    assert np.abs(clip[0].astype(int) - frame).mean() < 2  # pixels: the given frame is held exactly
    assert json.loads(r.headers["x-patchflow-settings"])["first_frame"] is True


def test_four_simultaneous_requests_all_complete(api, server):
    bodies = [{"run": "t2i", "prompt": TEXT_PROMPT, "seed": s} for s in range(3)] + \
             [{"run": "t2v", "prompt": VIDEO_PROMPT, "seed": 0}]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: httpx.post(f"{server[1]}/api/generate", json=b, timeout=300), bodies))
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.headers["content-type"] for r in responses] == ["image/png"] * 3 + ["image/gif"]
    images = [png(r) for r in responses[:3]]
    assert not np.array_equal(images[0], images[1])  # each its own seed
    assert np.array_equal(images[0], png(api.post("/api/generate", json=bodies[0])))  # and deterministic


def test_an_inpainted_image_keeps_the_unmasked_pixels_and_its_command_redraws_it(api, runs, tmp_path):
    data, frame = still_b64()
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    body = {"run": "t2i", "prompt": TEXT_PROMPT, "seed": 2, "init_image": f"data:image/png;base64,{data}",
            "mask": base64.b64encode(buffer.getvalue()).decode()}
    r = api.post("/api/generate", json=body)
    image, settings = png(r), json.loads(r.headers["X-Patchflow-Settings"])
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False  # a pixel run: every pixel outside the mask is the input's
    assert np.array_equal(image[outside], frame[outside]) and not np.array_equal(image[~outside], frame[~outside])
    assert settings["init_image"] and settings["mask"] and settings["strength"] == 1.0 and settings["seconds"] > 0
    job = api.post("/api/jobs", json={**body, "strength": 0.5}).json()
    done = wait(api, job["id"])
    command = done["items"][0]["settings"]["command"]
    assert "--init-image input.png --mask mask.png --strength 0.5" in command
    Image.fromarray(frame).save(tmp_path / "input.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = shlex.split(command)[2:]
    args[args.index("--out") + 1] = str(tmp_path / "again.npz")
    args = [str(tmp_path / a) if a in ("input.png", "mask.png") else a for a in args]
    assert main(["sample", *args, "--quiet"]) == 0
    with np.load(tmp_path / "again.npz") as f:
        assert np.array_equal(f["images"][0], png(api.get(done["items"][0]["url"])))


BAD = [
    ("not json", 422, "not valid JSON"),
    ("[1, 2]", 422, "JSON object"),
    ({"run": "t2i", "prompt": "x", "colour": "red"}, 422, "colour: unknown field"),
    ({"run": "t2i", "prompt": "x", "steps": 0}, 422, "steps"),
    ({"run": "t2i", "prompt": "x", "steps": "many"}, 422, "steps"),
    ({"run": "t2i", "prompt": "x", "n": 100}, 422, "n:"),
    ({"run": "t2i", "prompt": "x", "guidance": -1}, 422, "guidance"),
    ({"run": "t2i", "prompt": "x", "seed": -3}, 422, "seed"),
    ({"run": "t2i", "prompt": "   "}, 400, "prompt is empty"),
    ({"run": "t2i"}, 400, "prompt is empty"),
    ({"run": "t2i", "label": 3}, 400, "send prompt"),
    ({"run": "digits", "prompt": "a 3"}, 400, "send label"),
    ({"run": "digits", "label": 10}, 422, "classes 0..9"),
    ({"run": "digits"}, 400, "label is required"),
    ({"run": "nope", "prompt": "x"}, 404, "no run 'nope'"),
    ({"run": "t2i", "prompt": "x", "frames": 4}, 400, "frames: run 't2i' makes images"),
    ({"run": "t2i", "prompt": "x", "height": 30, "width": 32}, 422, "multiples of 8"),
    ({"run": "t2i", "prompt": "x", "height": 32}, 400, "both height and width"),
    ({"run": "t2i", "prompt": "x", "sampler": "ddpm"}, 422, "choose one of: 'euler', 'heun'"),
    ({"run": "t2v", "prompt": "x", "first_frame": "bm90IGFuIGltYWdl"}, 400, "first_frame is not an image"),
    ({"run": "t2v", "prompt": "x", "first_frame": "%%%"}, 400, "not valid base64"),
    ({"run": "t2v", "prompt": "x", "frames": 1000}, 422, "frames"),
    ({"run": "t2i", "prompt": "x", "mask": "STILL"}, 400, "mask needs the image it masks: give init_image"),
    ({"run": "t2i", "prompt": "x", "init_image": "STILL", "strength": 1.5}, 422, "strength"),
    ({"run": "t2i", "prompt": "x", "strength": 0.5}, 400, "strength goes with init_image"),
    ({"run": "t2i", "prompt": "x", "init_image": "STILL", "mask": "bm90IGFuIGltYWdl"}, 400, "mask is not an image"),
    ({"run": "t2i", "prompt": "x", "init_image": "%%%"}, 400, "init_image is not valid base64"),
    ({"run": "t2v", "prompt": "x", "init_image": "STILL"}, 400, "init_image: run 't2v' makes clips"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_a_4xx_json_error_and_the_server_lives_on(api, body, status, message):
    if isinstance(body, dict):
        body = {k: still_b64()[0] if v == "STILL" else v for k, v in body.items()}
    if isinstance(body, str):
        r = api.post("/api/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = api.post("/api/generate", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]
    assert png(api.post("/api/generate", json={"run": "digits", "label": 1, "steps": 1})).shape[:2] == (32, 32)


def test_an_oversized_body_is_refused_before_it_is_read(api):
    r = api.post("/api/generate", content=b"{" + b" " * (13 * 2**20) + b"}",
                 headers={"content-type": "application/json"})
    assert r.status_code == 413 and "at most 12 MiB" in r.json()["error"]
    big = base64.b64encode(b"\0" * (8 * 2**20 + 2**19)).decode()  # under the body limit, over the image limit
    r = api.post("/api/generate", json={"run": "t2v", "prompt": "x", "first_frame": big})
    assert r.status_code == 413 and "at most 8 MiB" in r.json()["error"]


def test_a_chunked_body_is_cut_off_at_the_limit(api):
    chunks = (b" " * 2**20 for _ in range(64))  # no Content-Length: httpx sends Transfer-Encoding: chunked
    r = api.post("/api/generate", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 12.0 MiB" in r.json()["error"], r.text
    small = json.dumps({"run": "digits", "label": 2, "steps": 1}).encode()
    r = api.post("/api/generate", content=iter([small[:10], small[10:]]), headers={"content-type": "application/json"})
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert png(r).shape[:2] == (32, 32)  # a small chunked body still reaches the app whole


def wait(api, job_id: str) -> dict:
    for _ in range(1200):
        state = api.get(f"/api/jobs/{job_id}").json()
        if state["status"] in ("done", "error"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_jobs_report_progress_and_their_items(api):
    r = api.post("/api/jobs", json={"run": "digits", "label": 2, "n": 2, "steps": 3})
    assert r.status_code == 202
    state = wait(api, r.json()["id"])
    assert state["status"] == "done" and state["progress"] == {"done": 6, "total": 6}
    assert [i["settings"]["seed"] for i in state["items"]] == [0, 1]
    assert png(api.get(state["items"][1]["url"])).shape[:2] == (32, 32)
    assert api.get(f"/api/jobs/{state['id']}/items/2").status_code == 404
    assert api.get("/api/jobs/404-0").status_code == 404


def test_a_full_queue_says_try_later(runs):
    studio = Studio([runs["digits"]], device="cpu", max_queue=1)
    studio.loaded.wait(60)
    release = threading.Event()
    studio._sample = lambda job: release.wait(30)  # the worker is busy until released
    from patchflow.serve import GenerateRequest

    req = GenerateRequest(label=1)
    first = studio.submit(req)
    while first.status != "running":
        time.sleep(0.01)
    second = studio.submit(req)
    with pytest.raises(RequestError, match="waiting already") as e:
        studio.submit(req)
    assert e.value.status == 503
    assert studio.position(second) == 0
    release.set()
    assert second.finished.wait(30) and first.status == second.status == "done"


def test_a_token_guards_the_api_and_the_page_keeps_it_in_a_cookie(runs):
    from starlette.testclient import TestClient

    studio = Studio([runs["digits"]], device="cpu")
    studio.loaded.wait(60)
    token = "s3cret-Token_1"
    with TestClient(build_app(studio, token)) as client:
        refused = client.get("/api/runs")
        assert refused.status_code == 401 and "Authorization: Bearer TOKEN" in refused.json()["error"]
        assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret-Token_2"}).status_code == 401
        assert client.post("/api/generate", content=b"x" * (13 * 2**20)).status_code == 401  # before the body
        assert client.get("/api/health").status_code == 200 and client.get("/").status_code == 200
        runs_ok = client.get("/api/runs", headers={"Authorization": f"Bearer {token}"})
        assert runs_ok.status_code == 200 and [r["name"] for r in runs_ok.json()["runs"]] == ["digits"]
        page = client.get(f"/?token={token}", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/"
        assert "HttpOnly" in page.headers["set-cookie"] and "SameSite=Strict" in page.headers["set-cookie"]
        state = client.post("/api/jobs", json={"label": 3, "steps": 2}).json()  # the cookie alone now
        while state["status"] not in ("done", "error"):
            time.sleep(0.05)
            state = client.get(f"/api/jobs/{state['id']}").json()
        assert png(client.get(state["items"][0]["url"])).shape[:2] == (32, 32)
        client.cookies.clear()
        assert client.get(state["items"][0]["url"]).status_code == 401


def test_serve_errors_exit_2_with_a_message(runs, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "config.toml" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(runs["digits"]), "--port", str(taken.getsockname()[1])]) == 2
    assert "pick another --port" in capsys.readouterr().err
    broken = tmp_path / "broken"  # a run whose weights are gone: the server stops instead of answering 503s
    shutil.copytree(runs["digits"], broken)
    for f in [*broken.glob("*.safetensors"), *broken.glob("checkpoints/*/*.safetensors")]:
        f.unlink()
    assert main(["serve", str(broken), "--port", str(free_port())]) == 2
    assert f"could not load run {str(broken)!r}" in capsys.readouterr().err
    assert main(["serve", str(runs["digits"]), "--token", "short"]) == 2
    assert "--token must be at least 8 characters" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["serve", str(runs["digits"]), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the page


def test_the_studio_page_in_chromium(server, tmp_path):
    _, url = server
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a picture")
    with chromium_page(1280, 860) as page:
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        assert page.eval_on_selector_all("#run option", "o => o.map(e => e.value)") == ["digits", "t2i", "t2v"]

        # a class run: the class picker, no prompt box
        page.select_option("#run", "digits")
        assert page.is_visible("#label") and not page.is_visible("#prompt")
        page.select_option("#label", "4")
        page.fill("#n", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery figure').length === 2", timeout=60000)

        # bad input: an empty prompt, then an upload that is not an image -- messages on the page
        page.select_option("#run", "t2v")
        page.fill("#prompt", "")
        page.click("#generate")
        page.wait_for_selector("#error:not(.hidden)")
        assert "prompt is empty" in page.inner_text("#error")
        page.fill("#prompt", VIDEO_PROMPT)
        page.set_input_files("#first-frame", str(not_an_image))
        page.click("#generate")
        page.wait_for_function("document.querySelector('#error').textContent.includes('not an image')")
        page.set_input_files("#first-frame", [])

        # a clip and a text-to-image sample
        page.fill("#n", "1")
        page.fill("#seed", "3")
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery figure').length === 3", timeout=60000)
        assert page.is_hidden("#error")
        page.select_option("#run", "t2i")
        page.fill("#prompt", TEXT_PROMPT)
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery figure').length === 4", timeout=60000)

        loaded = page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
        assert loaded == [32] * 4
        captions = page.eval_on_selector_all("#gallery figcaption", "cs => cs.map(c => c.textContent)")
        assert TEXT_PROMPT in captions[0] and "seed 3" in captions[0]
        assert VIDEO_PROMPT in captions[1] and "seed 3" in captions[1] and "4 frames" in captions[1]
        assert ["seed 0" in captions[2], "seed 1" in captions[3]] == [True, True]  # a job's items in seed order
        assert all("class 4" in c and "--label 4" in c for c in captions[2:])
        kinds = [httpx.get(url + src).headers["content-type"] for src in
                 page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.getAttribute('src'))")]
        assert kinds == ["image/png", "image/gif", "image/png", "image/png"]

        # an edit: upload an image, paint a mask over its right half, and inpaint it
        data, frame = still_b64()
        (tmp_path / "still.png").write_bytes(base64.b64decode(data))
        assert page.is_hidden("#mask-box")
        page.set_input_files("#init-image", str(tmp_path / "still.png"))
        page.wait_for_function("document.querySelector('#paint-mask').width === 32")
        box = page.locator("#paint-mask").bounding_box()
        page.fill("#brush", "8")
        page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + 4)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] - 4, steps=12)
        page.mouse.up()
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('#gallery figure').length === 5", timeout=60000)
        caption = page.eval_on_selector("#gallery figcaption", "c => c.textContent")
        assert "inpainted at strength 1" in caption and "--mask mask.png" in caption and " s · t2i" in caption
        edited = png(httpx.get(url + page.eval_on_selector("#gallery img", "i => i.getAttribute('src')")))
        assert np.array_equal(edited[:, :16], frame[:, :16])  # the unpainted left half is the upload's
        assert not np.array_equal(edited[:, 20:], frame[:, 20:])
        page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
    assert Image.open(tmp_path / "studio.png").size[0] == 1280
    if os.environ.get("PATCHFLOW_UPDATE_DOCS") == "1":  # refresh docs/studio.png on purpose, never as a side effect
        shutil.copyfile(tmp_path / "studio.png", DOCS / "studio.png")


def test_a_run_on_class_folders_names_its_classes(tmp_path):
    from patchflow.serve import GenerateRequest

    for c, colour in (("ant", 40), ("bee", 200)):
        for i in range(2):
            (tmp_path / "data" / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (32, 32), colour + i).save(tmp_path / "data" / c / f"{i}.png")
    run = tmp_path / "run"
    train(load_config("digits", COMMON + ["model.preset=\"DiT-Micro/4\"", "model.num_classes=2",
                                          "data.dataset=\"folder\"", "data.channels=1", "data.image_size=32",
                                          f"data.path=\"{tmp_path / 'data'}\"",
                                          'repa.encoder=""']),  # no world encoder of these two folders
          run, progress=False)
    assert json.loads((run / "classes.json").read_text()) == ["ant", "bee"]
    studio = Studio([run], device="cpu")
    assert studio.runs_info()[0]["class_names"] == ["ant", "bee"]
    job = studio.submit(GenerateRequest(label=1, steps=1))
    assert job.finished.wait(60) and job.items[0][2]["class_name"] == "bee"


def test_requests_pick_an_adapter_by_name_and_get_what_sample_lora_draws(runs, tmp_path):
    from patchflow.config import load_config as load_run
    from patchflow.lora.adapters import add_adapters, split_adapter
    from patchflow.lora.apply import write
    from patchflow.lora.config import LoRAConfig
    from patchflow.models import build_model
    from patchflow.pipeline import Pipeline
    from patchflow.serve import GenerateRequest

    model_cfg = load_run(runs["t2i"] / "config.toml").model
    model = build_model(model_cfg)
    add_adapters(model, LoRAConfig(rank=2))
    g = torch.Generator().manual_seed(0)
    adapter = {k: torch.randn(v.shape, generator=g) for k, v in split_adapter(model.state_dict())[1].items()}
    from patchflow.lora.files import Adapter

    path = write(Adapter(adapter, 2, 2.0, arch="mmdit"), model_cfg, "kohya", tmp_path / "style.safetensors")
    (tmp_path / "typo.safetensors").write_bytes(b"not an adapter")
    studio = Studio([runs["t2i"], runs["digits"]], device="cpu", loras=[str(path), str(tmp_path / "typo.safetensors")])
    studio.wait_loaded()
    info = {r["name"]: r for r in studio.runs_info()}
    assert info["t2i"]["loras"] == ["style"] and info["digits"]["loras"] == []  # offered where it fits
    assert list(studio.unused_loras) == ["typo"]  # fits nothing: said at start, with each run's reason
    assert "run 't2i'" in studio.unused_loras["typo"] and "run 'digits'" in studio.unused_loras["typo"]

    def draw(**kw):
        job = studio.submit(GenerateRequest(run="t2i", prompt=TEXT_PROMPT, seed=3, steps=2, **kw))
        assert job.finished.wait(120) and job.status == "done", job.error
        return job

    styled = draw(lora="style", lora_scale=0.5)
    want = Pipeline.load(runs["t2i"], device="cpu", loras=[f"{path}:0.5"])(prompt=TEXT_PROMPT, n=1, seed=3, steps=2)
    assert np.array_equal(styled.samples[0], want[0])
    settings = styled.items[0][2]
    assert settings["lora"] == "style" and settings["lora_scale"] == 0.5
    assert f"--lora {path}:0.5" in settings["command"]
    plain = draw()  # the run itself again
    assert np.array_equal(plain.samples[0], studio.runs["t2i"].pipe.__class__.load(runs["t2i"], device="cpu")(
        prompt=TEXT_PROMPT, n=1, seed=3, steps=2)[0])
    assert not np.array_equal(plain.samples[0], styled.samples[0])
    with pytest.raises(RequestError, match="has no adapter 'style'") as e:
        studio.submit(GenerateRequest(run="digits", label=1, lora="style"))
    assert e.value.status == 422
