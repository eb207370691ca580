"""`patchflow report`: the self-contained HTML page of a run (curves, loss by timestep, samples, eval, config)."""
import base64
import html
import io
import json
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from browser import chromium_page
from patchflow.cli import main
from patchflow.config import load_config
from patchflow.report import bin_means, evenly_spaced, last_quarter, parse_log, write_report

CONFIG_NOTE = '# hand-edited: <script>alert("x")</script> & co\n'  # must come out escaped, never as markup
EVAL = {"n": 500, "fd": 1185.5959382156288, "per_class_accuracy": [0.25, 0.5],
        "canonical": {"model": {"rates": {"digit": 0.9358288770053476, "all": 0.77}, "counts": {"digit": 374}},
                      "table": "attribute  model\ndigit      93.6%  <ok>"}}


def record(step, loss, loss_by_t=None, **extra):
    r = {"step": step, "loss": loss, "loss_avg": loss * 1.01, "grad_norm": 0.5, "lr": 1e-3, "images_per_s": 200.0,
         "steps_per_s": 3.0, "mfu": 0.25, "bad_steps": 0, **extra}
    if loss_by_t is not None:
        r["loss_by_t"] = loss_by_t
    return r


def bins(scale):
    """Bin b holds scale * (b + 1): known means per bin."""
    return [scale * (b + 1) for b in range(10)]


def log_lines(with_t=True):
    """8 log windows (steps 10..80), one corrupt line (line 4), step 30 written twice (a resume: the second wins),
    one skipped step; the last two windows' loss_by_t average to 0.2 * (b + 1), bin 9 null in one of them."""
    t = (lambda s: bins(s)) if with_t else (lambda s: None)
    last = bins(0.1)
    last[9] = None
    rows = [record(10, 2.0, t(1.0)), record(20, 1.5, t(0.9)), record(30, 9.9, t(0.8)),
            "{\"step\": 35, \"loss\": 1.",  # a line cut by a kill
            record(30, 1.2, t(0.7)), record(40, 1.0, t(0.6)), record(50, 0.9, t(0.5)),
            {**record(55, 0.0), "loss": None, "loss_avg": None, "skipped": True, "bad_steps": 1},
            record(60, 0.8, t(0.3), bad_steps=1), record(70, 0.7, last if with_t else None, bad_steps=1),
            record(80, 0.6, t(0.3), bad_steps=1)]
    return [r if isinstance(r, str) else json.dumps(r) for r in rows]


def make_run(root, name="myrun", with_t=True, samples=(10, 40), gif_step=80):
    """A synthetic run directory: the digits preset's config, a log, sample grids (two PNGs, an animated GIF),
    eval.json and a demo grid."""
    run = root / name
    (run / "samples").mkdir(parents=True)
    (run / "config.toml").write_text(CONFIG_NOTE + load_config("digits").to_toml())
    (run / "log.jsonl").write_text("\n".join(log_lines(with_t)) + "\n")
    for i, step in enumerate(samples):
        Image.new("L", (70 + i, 36), 40 * i).save(run / "samples" / f"step_{step:07d}.png")
    if gif_step is not None:
        frames = [Image.new("RGB", (50, 26), c) for c in ("red", "blue")]
        frames[0].save(run / "samples" / f"step_{gif_step:07d}.gif", save_all=True, append_images=frames[1:],
                       duration=100, loop=0)
    (run / "eval.json").write_text(json.dumps(EVAL))
    Image.new("L", (90, 40), 200).save(run / "demo_grid.png")
    return run


class Tags(HTMLParser):
    """Every start tag's (name, attributes) of a page."""

    def __init__(self, text):
        super().__init__()
        self.tags = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def images(self):
        return [a for t, a in self.tags if t == "img"]


def decoded(src):
    """(format, image) of a data: URI, checking the declared MIME type matches the bytes."""
    m = re.fullmatch(r"data:(image/(png|gif));base64,([A-Za-z0-9+/=]+)", src)
    assert m, src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(m.group(3), validate=True)))
    assert image.format.lower() == m.group(2)
    return image.format, image


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report"))
    with pytest.warns(UserWarning, match=r"skipped 1 line.*line 4\)"):
        path = write_report(run)
    return run, path, path.read_text()


def test_report_is_written_in_the_run_and_self_contained(report):
    run, path, page = report
    assert path == run / "report.html" and path.is_file()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    tags = Tags(page).tags
    links = [a.get("src") or a.get("href") for t, a in tags if "src" in a or "href" in a]
    assert links and all(link.startswith("data:image/") for link in links)
    assert not [t for t, _ in tags if t in ("link", "script", "iframe", "object")]
    assert "url(" not in page and "@import" not in page


def test_report_embeds_plots_samples_and_demo_as_valid_images(report):
    run, _, page = report
    images = Tags(page).images()
    plots = [a for a in images if a.get("class") == "plot"]
    assert len(plots) == 5  # loss, grad norm + lr, throughput + MFU, loss by timestep, its heatmap
    assert all(decoded(a["src"])[0] == "PNG" for a in plots)
    grids = [(a["alt"], *decoded(a["src"])) for a in images if a.get("class") == "grid"]
    assert [(alt, fmt, im.size) for alt, fmt, im in grids] == [
        ("samples at step 10", "PNG", (70, 36)), ("samples at step 40", "PNG", (71, 36)),
        ("samples at step 80", "GIF", (50, 26)), ("demo_grid.png", "PNG", (90, 40))]
    assert grids[2][2].n_frames == 2  # the GIF stays animated
    shown = [(a["width"], a["height"]) for a in images if a.get("class") == "grid"]
    assert shown == [("280", "144"), ("284", "144"), ("300", "156"), ("270", "120")]  # small grids: whole multiples
    assert len(images) == 9


def test_report_header_uses_the_last_record_of_each_step(report):
    _, _, page = report
    assert "<h1>myrun</h1>" in page
    assert '<p class="kind">class-conditional image DiT</p>' in page
    steps = load_config("digits").train.steps
    assert f"<dd>9 (last step 80 of {steps:,})</dd>" in page  # step 30 once; the cut line is not a record
    assert "<dd>0.606</dd>" in page  # loss_avg of step 80
    assert "9.9" not in page.split("<section>")[0]  # the overwritten step-30 record is gone
    assert "skipped steps</dt><dd>1</dd>" in page
    assert "log lines skipped</dt><dd>1 not JSON records (line 4)</dd>" in page


def test_report_sample_grids_are_in_step_order(report):
    _, _, page = report
    assert re.findall(r'data-step="(\d+)"', page) == ["10", "40", "80"]
    assert re.findall(r"<figcaption>step (\d+)</figcaption>", page) == ["10", "40", "80"]


def test_report_shows_loss_by_timestep_of_the_last_quarter(report):
    _, _, page = report
    assert "Mean loss, last 2 of 8 log windows" in page
    cells = re.findall(r"<tr><th>(\d\.\d) &ndash; \d\.\d</th><td>([^<]+)</td></tr>", page)
    assert cells == [(f"{b / 10:.1f}", f"{0.2 * (b + 1):.4g}") for b in range(9)] + [("0.9", "3")]


def test_report_shows_eval_figures(report):
    _, _, page = report
    for label, value in [("n", "500"), ("fd", "1186"), ("per_class_accuracy", "25.0%, 50.0%"),
                         ("model / rates / digit", "93.6%"), ("model / rates / all", "77.0%"),
                         ("model / counts / digit", "374")]:
        assert f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>" in page, label
    assert "<pre>attribute  model\ndigit      93.6%  &lt;ok&gt;</pre>" in page


def test_report_shows_the_config_verbatim_and_escaped(report):
    run, _, page = report
    text = (run / "config.toml").read_text()
    assert f"<pre>{html.escape(text)}</pre>" in page
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)" in page
    assert 'preset = &quot;DiT-Mini/4&quot;' in page


def test_run_without_loss_by_t_says_it_was_not_logged(tmp_path):
    run = make_run(tmp_path, with_t=False)
    with pytest.warns(UserWarning):
        page = write_report(run, tmp_path / "r.html").read_text()
    assert "Loss by timestep was not logged in this run" in page
    assert len([a for a in Tags(page).images() if a.get("class") == "plot"]) == 3
    assert not (run / "report.html").exists()  # --out is honoured


def test_codec_run_says_it_has_no_timesteps_and_out_may_be_a_folder(tmp_path):
    run = make_run(tmp_path, with_t=False)
    (run / "config.toml").write_text('[model]\narch = "autoencoder"\n')
    (tmp_path / "pages").mkdir()
    with pytest.warns(UserWarning):
        path = write_report(run, tmp_path / "pages")
    page = path.read_text()
    assert path == tmp_path / "pages" / "report.html"
    assert '<p class="kind">autoencoder (codec)</p>' in page
    assert "a codec (autoencoder) run has none" in page


def test_out_in_a_missing_folder_is_refused(tmp_path, capsys):
    run = make_run(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"the folder .*missing does not exist; create it"):
        write_report(run, tmp_path / "missing" / "r.html")
    assert main(["report", str(run), "--out", str(tmp_path / "missing" / "r.html")]) == 2
    assert "does not exist; create it" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_empty_log_says_no_steps_yet(tmp_path):
    run = make_run(tmp_path, samples=(), gif_step=None)
    (run / "log.jsonl").write_text("")
    page = write_report(run).read_text()
    assert "No training steps logged yet" in page
    assert "No sample grids in samples/" in page
    assert [a.get("class") for a in Tags(page).images()] == ["grid"]  # the demo grid only, no plots
    assert "<dd>0</dd>" in page and "none logged" in page


def test_many_sample_grids_are_thinned_evenly_keeping_the_last(tmp_path):
    run = make_run(tmp_path, samples=range(100, 3100, 100), gif_step=None)  # 30 grids
    with pytest.warns(UserWarning):
        page = write_report(run).read_text()
    shown = [int(s) for s in re.findall(r'data-step="(\d+)"', page)]
    assert len(shown) == 12 and shown[0] == 100 and shown[-1] == 3000 and shown == sorted(shown)
    assert "12 of 30 grids, evenly spaced." in page
    assert evenly_spaced(list(range(5)), 3) == [0, 2, 4] and evenly_spaced([1, 2], 12) == [1, 2]


def test_parse_log_dedupes_steps_and_counts_bad_lines():
    log = parse_log(['{"step": 2, "loss": 1.0}', "", '{"step": 1, "loss": 3.0}', "not json", '[1, 2]',
                     '{"loss": 1.0}', '{"step": 2, "loss": 0.5, "loss_by_t": [1, 2]}', '{"step": 3, "loss": NaN}'])
    assert [(r["step"], r["loss"]) for r in log.records] == [(1, 3.0), (2, 0.5), (3, None)]
    assert log.bad_lines == [4, 5, 6]
    assert log.records[1]["loss_by_t"] is None  # not 10 bins: ignored rather than misdrawn
    rows = [{"loss_by_t": bins(1.0)}, {"loss_by_t": [None] * 10}, {"loss_by_t": bins(3.0)}]
    assert bin_means(rows) == pytest.approx(bins(2.0))
    assert last_quarter(list(range(9))) == [7, 8] and last_quarter([5]) == [5]


def test_a_folder_that_is_not_a_run_raises_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"not a run directory: it has no config\.toml and no log\.jsonl"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        write_report(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="is a file, not a run directory"):
        write_report(tmp_path / "notes.txt")
    assert not (tmp_path / "report.html").exists()


def test_cli_report_exit_codes(tmp_path, capsys):
    run = make_run(tmp_path)
    with pytest.warns(UserWarning):
        assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"report written to {run / 'report.html'}"
    assert (run / "report.html").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchflow report: error: ") and "no such folder" in err
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


@pytest.mark.usefixtures("digit_classifier")  # scores digits: the session's one classifier, not a training of its own
def test_report_of_a_real_tiny_demo_run_opens_in_chromium(tmp_path):
    from safetensors.numpy import load_file

    run = tmp_path / "tiny"
    sets = ["model.preset=\"DiT-Micro/4\"", "train.batch_size=8", "train.steps=4", "train.log_every=1",
            "train.sample_every=2", "train.checkpoint_every=4", "train.peak_tflops=1", "sample.n=4",
            "sample.steps=2", "train.num_threads=1"]
    assert main(["demo", "--out", str(run), "--quiet"] + [a for s in sets for a in ("--set", s)]) == 0
    page = write_report(run).read_text()
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    images = Tags(page).images()
    plots = [a for a in images if a.get("class") == "plot"]
    assert len(plots) == 5 and all("loss_by_t" in r for r in logged)
    assert "Mean loss, last 1 of 4 log windows" in page  # the last of 4 windows (a quarter), as logged
    cells = re.findall(r"<tr><th>\d\.\d &ndash; \d\.\d</th><td>([^<]+)</td></tr>", page)
    assert cells == ["&ndash;" if v is None else f"{v:.4g}" for v in logged[-1]["loss_by_t"]]
    grids = [(a["alt"], decoded(a["src"])[1].size) for a in images if a.get("class") == "grid"]
    assert grids == [(f"samples at step {s}", Image.open(run / "samples" / f"step_{s:07d}.png").size)
                     for s in (2, 4)] + [("demo_grid.png", Image.open(run / "demo_grid.png").size)]
    assert "<dd>4 (last step 4 of 4)</dd>" in page
    params = sum(v.size for v in load_file(str(run / "model.safetensors")).values())
    assert f"<dd>{params:,} (" in page
    evaluated = json.loads((run / "eval.json").read_text())
    assert re.search(rf"<th>accuracy</th><td>{100 * evaluated['accuracy']:.1f}%</td>", page)
    with chromium_page() as browser:
        browser.goto((run / "report.html").as_uri())
        browser.wait_for_load_state("load")
        widths = browser.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == len(images) >= 8 and all(w > 0 for w in widths), widths


def test_every_image_loads_in_a_browser(report):
    _, path, _ = report
    with chromium_page() as page:
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        widths = page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
        visible = page.evaluate("[...document.images].filter(i => i.getBoundingClientRect().width > 0).length")
    assert len(widths) == 9 and all(w > 0 for w in widths), widths
    assert visible == 9
