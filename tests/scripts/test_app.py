"""The web UI, scripts/app.py, driven in a real browser (Debian's headless Chromium through selenium) against
the tiny test models: a prompt typed and Generate pressed gives a video of the requested size, uploads
condition the frames their mode says, mistakes appear in the page as one line, requests wait in a queue, and
nothing outside the app's output directory is served.

    python tests/scripts/test_app.py --screenshot assets/results/app.png

starts the app with the shipped model, generates the default prompt and saves the README's screenshot.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import av
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
APP_START_TIMEOUT = 180  # s: imports, model loading and Gradio's start on a busy 2-core machine
PAGE_TIMEOUT = 60  # s: for anything the page should show
# Requests to the app must not go through a proxy from the environment.
LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ------------------------------------------------------------------------------------------- the app


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningApp:
    """`python scripts/app.py` in a subprocess, with its console in `log_path`."""

    def __init__(self, model_flags, output_dir, log_path):
        self.output_dir, self.log_path = str(output_dir), str(log_path)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "scripts/app.py", "--port", str(port), "--output-dir", self.output_dir, *model_flags],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )
        self.wait_until_serving()

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def wait_until_serving(self):
        deadline = time.monotonic() + APP_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the app exited with code {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                LOCAL_HTTP.open(self.url, timeout=5).close()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"the app did not serve {self.url} within {APP_START_TIMEOUT} s:\n{self.log()[-3000:]}")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def app(tiny_model_flags, tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    running = RunningApp(tiny_model_flags, root / "outputs", root / "app.log")
    yield running
    running.stop()


def start_browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver")
    driver = start_browser()
    yield driver
    driver.quit()


# -------------------------------------------------------------------------------------------- the page


def by_css(driver, selector):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def wait_for(driver, find, what, timeout=PAGE_TIMEOUT):
    """The first truthy result of `find(driver)`; fails naming `what`, with any error the page shows."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(find)
    except TimeoutException:
        errors = [toast.text for toast in by_css(driver, ".toast-body")]
        pytest.fail(f"the page did not show {what} within {timeout} s; its messages: {errors}")


def open_page(driver, app):
    driver.get(app.url)
    wait_for(driver, lambda d: by_css(d, "#prompt textarea"), "the prompt box")


def field(driver, elem_id):
    return by_css(driver, f"#{elem_id} textarea, #{elem_id} input")[0]


def type_into(driver, elem_id, text):
    box = field(driver, elem_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(text))


def choose_mode(driver, mode):
    by_css(driver, f"#mode input[value='{mode}']")[0].click()


def upload(driver, elem_id, path):
    file_input = wait_for(driver, lambda d: by_css(d, f"#{elem_id} input[type=file]"), f"the {elem_id} upload")[0]
    file_input.send_keys(str(path))
    # the upload is done when the component shows the file instead of the drop zone
    wait_for(driver, lambda d: by_css(d, f"#{elem_id} img, #{elem_id} video"), f"the uploaded {elem_id}")


def record_output_texts(driver):
    """From now on, keep every text the output panel shows (progress and queue messages last milliseconds)."""
    driver.execute_script("""
        window.outputTexts = [];
        new MutationObserver(() => {
            const text = document.querySelector('#output').innerText;
            if (text) window.outputTexts.push(text);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    """)


def recorded_output_texts(driver):
    return driver.execute_script("return window.outputTexts")


def generate(driver):
    """Press Generate and return the src of the video the page then shows."""
    by_css(driver, "#generate")[0].click()

    def video_src(d):
        videos = by_css(d, "#output video")
        return videos[0].get_attribute("src") if videos else None

    return wait_for(driver, video_src, "a generated video")


def download_frames(src, tmp_path):
    """The frames of the video at `src`, uint8 [T, H, W, 3]."""
    path = tmp_path / os.path.basename(src)
    with LOCAL_HTTP.open(src, timeout=30) as response:
        path.write_bytes(response.read())
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def mean_error(a, b):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


# ------------------------------------------------------------------------------------------------ cases


def test_text_to_video_with_the_requested_size_and_a_progress_bar(app, browser, tmp_path):
    open_page(browser, app)
    # the form starts at what the tiny model was trained for (its inference.json)
    names = ("num_frames", "height", "width", "steps", "guidance")
    defaults = {name: field(browser, name).get_attribute("value") for name in names}
    assert defaults == dict(num_frames="4", height="64", width="64", steps="2", guidance="4")
    type_into(browser, "prompt", "a blue square moving up")
    for name, value in dict(num_frames=6, height=96, width=128, steps=20).items():
        type_into(browser, name, value)
    record_output_texts(browser)

    frames = download_frames(generate(browser), tmp_path)

    assert frames.shape == (6, 96, 128, 3)
    progress = " ".join(recorded_output_texts(browser))
    assert re.search(r"\b\d+/20 steps", progress) and "sampling" in progress, progress


def write_image(path, seed):
    """A picture with structure (blocks of colour), so that H.264 codes it well."""
    blocks = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((80, 60), Image.NEAREST).save(path)
    return path


def write_video(path, num_frames, seed):
    # imported here: run as a script (the screenshot), this file does not have the repository on sys.path
    from utils.media import write_mp4

    frames = [np.asarray(Image.open(write_image(path.with_suffix(f".{i}.png"), seed + i))) for i in range(num_frames)]
    write_mp4(np.stack(frames), 8, str(path))
    return path


# mode, {component: make_file(directory, seed)}, numbers to type, and the frames of a 4-frame clip that the
# mode's last upload fixes
CONDITIONED_MODES = [
    ("Image to video", dict(image=lambda d, seed: write_image(d / f"first_{seed}.png", seed)), {}, [0]),
    ("Connect two images", dict(image=lambda d, seed: write_image(d / f"first_{seed}.png", seed),
                                last_image=lambda d, seed: write_image(d / f"last_{seed}.png", seed)), {}, [3]),
    ("Extend a video", dict(video=lambda d, seed: write_video(d / f"clip_{seed}.mp4", 5, seed)), dict(kept_frames=2),
     [0, 1]),
]
# Mean absolute difference of two generations' frames: one made from different uploads differs by about 45 grey
# levels; the others change only through attention to them (about 1) and H.264 (about 2).
CHANGED_FRAME_ERROR = 20.0
UNCHANGED_FRAME_ERROR = 8.0


@pytest.mark.parametrize("mode, uploads, numbers, last_upload_frames", CONDITIONED_MODES,
                         ids=[row[0] for row in CONDITIONED_MODES])
def test_uploads_condition_the_frames_of_their_mode(app, browser, tmp_path, mode, uploads, numbers, last_upload_frames):
    """With the same prompt and seed, another file in the mode's last upload changes exactly the frames that
    the mode conditions on it."""

    def generate_from_uploads(seeds):
        open_page(browser, app)
        choose_mode(browser, mode)
        for elem_id, make_file in uploads.items():
            upload(browser, elem_id, make_file(tmp_path, seeds[elem_id]))
        for name, value in numbers.items():
            type_into(browser, name, value)
        return download_frames(generate(browser), tmp_path)

    first_seeds = {elem_id: 1 for elem_id in uploads}
    first = generate_from_uploads(first_seeds)
    second = generate_from_uploads({**first_seeds, list(uploads)[-1]: 100})

    assert first.shape == second.shape == (4, 64, 64, 3)
    for index in range(4):
        error = mean_error(first[index], second[index])
        if index in last_upload_frames:
            assert error > CHANGED_FRAME_ERROR, f"frame {index} should come from the upload: difference {error:.1f}"
        else:
            assert error < UNCHANGED_FRAME_ERROR, f"frame {index} should not: difference {error:.1f}"


# mode, uploads, numbers to type, the message (a regular expression; the pipeline words the last one)
MISTAKES = [
    ("Image to video", {}, {}, r"Image to video needs an image: upload one"),
    ("Text to video", {}, dict(num_frames=1), r"Frames: give a whole number of at least 2"),
    ("Edit a video", dict(video=lambda d: write_video(d / "long.mp4", 6, seed=1)), {}, r"Edit a video: .*\b4 frames"),
]


@pytest.mark.parametrize("mode, uploads, numbers, message", MISTAKES, ids=[row[0] for row in MISTAKES])
def test_mistakes_are_one_line_in_the_page(app, browser, tmp_path, mode, uploads, numbers, message):
    open_page(browser, app)
    choose_mode(browser, mode)
    for elem_id, make_file in uploads.items():
        upload(browser, elem_id, make_file(tmp_path))
    for name, value in numbers.items():
        type_into(browser, name, value)
    by_css(browser, "#generate")[0].click()

    def error_message(d):  # a toast fades in: its text is empty until it is shown
        return next((toast.text for toast in by_css(d, ".toast-body.error .toast-text") if toast.text), None)

    shown = wait_for(browser, error_message, "an error message")
    assert re.fullmatch(message, shown), shown
    page = browser.find_element("tag name", "body").text
    assert "Traceback" not in page and "File \"" not in page
    assert not by_css(browser, "#output video")


def test_a_second_generation_waits_for_the_first(app, browser):
    """One generation at a time: a short request made while a long one runs is queued and ends after it."""
    open_page(browser, app)
    type_into(browser, "steps", 200)
    long_request_tab = browser.current_window_handle
    by_css(browser, "#generate")[0].click()
    wait_for(browser, lambda d: "steps" in by_css(d, "#output")[0].text, "the long generation's progress")

    browser.switch_to.new_window("tab")
    try:
        open_page(browser, app)  # 2 steps
        record_output_texts(browser)
        generate(browser)
        assert "queue:" in " ".join(recorded_output_texts(browser))
    finally:
        browser.close()
        browser.switch_to.window(long_request_tab)
    assert by_css(browser, "#output video"), "the short request ended before the long one"


def test_only_outputs_and_uploads_are_served(app):
    """Gradio's file route gives the app's own output directory and nothing else: not the repository, not the
    models, not other temporary files."""
    videos = os.path.join(app.output_dir, "videos")
    os.makedirs(videos, exist_ok=True)
    inside = os.path.join(videos, "served.mp4")
    with open(inside, "wb") as f:
        f.write(b"\0" * 16)
    outside = os.path.join(os.path.dirname(app.output_dir), "app.log")

    def status(path):
        try:
            with LOCAL_HTTP.open(f"{app.url}gradio_api/file={path}", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status(inside) == 200
    for path in (outside, os.path.join(REPO, "scripts", "app.py"), "scripts/app.py", "/etc/passwd",
                 os.path.join(app.output_dir, "..", "app.log")):
        assert status(path) == 403, path


BAD_FLAGS = [
    (["--port", "70000"], "--port 70000: give a port between 1 and 65535"),
    (["--model-path", "no/such/dir"], ("--model-path no/such/dir: model directory not found; give a pipeline "
                                       "directory or an STDiT directory written by save_pretrained or "
                                       "scripts/convert_checkpoint.py stdit2 or stdit3")),
    (["--model-path", "{stdit2}"], "--vae-path is required with --model-path {stdit2}"),
    (["--host", "192.0.2.1"], "--host 192.0.2.1 --port 7860: cannot listen there"),  # an address of no machine here
    # then the choices, quoted or not depending on the Python version
    (["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[row[1].split(":")[0] for row in BAD_FLAGS])
def test_bad_flags_are_one_line_errors(flags, message, tiny_models, capsys):
    from scripts.app import main
    from utils.errors import EXIT_USER_ERROR, run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [flag.format(**tiny_models) for flag in flags])
    assert exit_info.value.code == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message.format(**tiny_models)}") and error.count("\n") == 1, error


def test_a_port_in_use_is_a_one_line_error_before_the_model_loads(app, capsys):
    from scripts.app import main
    from utils.errors import run_cli

    port = app.url.rstrip("/").rsplit(":", 1)[1]
    with pytest.raises(SystemExit):
        run_cli(main, ["--port", port, "--model-path", "assets/default_model"])
    assert capsys.readouterr().err == f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)\n"


# ------------------------------------------------------------------------------------- README screenshot


def save_screenshot(path):
    """Serve the shipped model, generate the page's example prompt and save a screenshot of the page."""
    with tempfile.TemporaryDirectory() as root:
        running = RunningApp([], os.path.join(root, "outputs"), os.path.join(root, "app.log"))
        driver = start_browser()
        try:
            open_page(driver, running)
            generate(driver)
            first_frame_shown = "return document.querySelector('#output video').readyState >= 2"
            wait_for(driver, lambda d: d.execute_script(first_frame_shown), "the video's first frame")
            driver.save_screenshot(path)
        finally:
            driver.quit()
            running.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Save the README's screenshot of the web UI.")
    parser.add_argument("--screenshot", required=True, help="PNG file to write")
    save_screenshot(parser.parse_args().screenshot)
