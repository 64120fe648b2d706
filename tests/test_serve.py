"""The demo page (`python -m arjax serve`) end to end: a real server process on a free loopback
port, driven over HTTP and in headless Chromium.

The browser test needs Debian's chromium and chromium-driver (`make test` installs them where
it runs as root with apt-get); it is skipped, saying so, where they are not installed.
"""
import base64
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT

# One server for the module: keep its tests on one xdist worker (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("serve")

GRID_PIXELS = 296  # 4 x 4 images of 8 x 8, 1-pixel gaps, upscaled 8x: (4 * 9 + 1) * 8
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
URL_LINE = re.compile(r"arjax demo page: (http://127\.0\.0\.1:\d+/)")


def start_server(workdir, log_path, *args):
  """`python -m arjax serve` on port 0 (the OS picks a free one); its log goes to a file (a
  pipe nobody reads would fill and block the server)."""
  log = open(log_path, "w")
  process = subprocess.Popen(
      [sys.executable, "-m", "arjax", "serve", f"--workdir={workdir}", "--port=0", *args],
      cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log,
      stderr=subprocess.STDOUT)
  log.close()
  return process


@pytest.fixture(scope="module")
def server(smoke_run, tmp_path_factory):
  """The server on the shared smoke workdir (its config read from DIR/config.json): its URL."""
  _, workdir, _ = smoke_run
  log_path = tmp_path_factory.mktemp("serve") / "serve.log"
  process = start_server(workdir, log_path)
  try:
    deadline = time.monotonic() + 300  # start-up compiles; the machine may be loaded
    while True:
      found = URL_LINE.search(log_path.read_text())
      if found:
        break
      if process.poll() is not None or time.monotonic() > deadline:
        raise AssertionError(f"the server did not start (rc {process.poll()}):\n"
                             f"{log_path.read_text()}")
      time.sleep(0.2)
    yield found.group(1)
  finally:
    process.terminate()
    process.wait(timeout=30)


def post(url, body):
  """POST /generate: (status, reply JSON, headers)."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(url + "generate", data=data,
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=300) as response:
      return response.status, json.load(response), response.headers
  except urllib.error.HTTPError as e:
    return e.code, json.load(e), e.headers


def png_pixels(data_url):
  prefix = "data:image/png;base64,"
  assert data_url.startswith(prefix), data_url[:40]
  png = base64.b64decode(data_url[len(prefix):])
  assert png.startswith(b"\x89PNG\r\n\x1a\n")
  return np.asarray(Image.open(io.BytesIO(png)))


@pytest.mark.parametrize("body, field, says", [
    ({"label": 10}, "label", "[0, 10)"),
    ({"label": -1}, "label", "[0, 10)"),
    ({"label": "three"}, "label", "expected a number"),
    ({"cfg_scale": -0.5}, "cfg_scale", ">= 0"),
    ({"cfg_scale": "strong"}, "cfg_scale", "expected a number"),
    ({"temperature": 0}, "temperature", "> 0"),
    ({"temperature": "-1"}, "temperature", "> 0"),
    ({"num_steps": 0}, "num_steps", "> 0"),
    ({"num_steps": 2.5}, "num_steps", "expected an integer"),
    ({"seed": "x"}, "seed", "expected a number"),
    ({"cfg_schedule": "cosine"}, "cfg_schedule", "'constant', 'linear'"),
    ({"cfg": 2}, "cfg", "unknown field"),
    (b"{not json", "body", "not JSON"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field, says):
  status, reply, _ = post(server, body)
  assert status == 400
  assert reply["field"] == field
  assert reply["error"].startswith(field) or field == "body"
  assert says in reply["error"]


def test_requests_of_one_shape_reuse_one_compiled_sampler(server):
  # Start-up compiled the default request (the smoke config guides: cfg_scale 3): another
  # class, scale, ramp or seed is the same program.
  status, guided, headers = post(server, {"label": 3, "cfg_scale": "2", "seed": "7",
                                          "cfg_schedule": "constant"})
  assert status == 200 and guided["compiled"] is False
  assert guided["num_images"] == 16 and guided["request"]["label"] == 3
  assert png_pixels(guided["image"]).shape == (GRID_PIXELS, GRID_PIXELS)
  assert guided["sampling_seconds"] > 0
  assert headers["Server-Timing"] == f"sample;dur={guided['sampling_seconds'] * 1000:.1f}"

  # Unguided sampling is another program: compiled once, then reused.
  status, first, _ = post(server, {"cfg_scale": 1, "seed": 1})
  assert status == 200 and first["compiled"] is True
  status, second, _ = post(server, {"cfg_scale": 1.0, "seed": 2, "temperature": 0.5, "label": 9})
  assert status == 200 and second["compiled"] is False

  # The seed decides the grid.
  _, again, _ = post(server, {"cfg_scale": 1, "seed": 1})
  assert again["image"] == first["image"] and again["image"] != second["image"]


def test_the_grid_is_what_sample_draws(server, smoke_run):
  # Same checkpoint (EMA), same sampler, same seeds: image i of the grid is image i of
  # `python -m arjax sample` for that class.
  from arjax.commands import sample as generate
  from arjax.serving import server as serve
  from arjax.training.experiment import Experiment

  _, workdir, _ = smoke_run
  config = serve.workdir_config(workdir)
  config.sample.update(seed=7, cfg_scale=2.0, cfg_schedule="constant", temperature=0.9,
                       num_images=16, batch_size=16, labels="3")
  exp = Experiment(config)
  params, _ = generate.restore_params(exp, workdir, use_ema=True)
  drawn = generate.sample_images(exp, params, generate.parse_labels("3", 16, 10), progress=False)

  status, reply, _ = post(server, {"label": 3, "seed": 7, "cfg_scale": 2, "temperature": 0.9,
                                   "cfg_schedule": "constant"})
  assert status == 200
  expected = np.asarray(Image.open(io.BytesIO(serve.grid_png(drawn))))
  np.testing.assert_array_equal(png_pixels(reply["image"]), expected)


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="Chromium is not installed (Debian: apt-get install chromium "
                    "chromium-driver; `make test` installs them when it runs as root)")
@pytest.mark.skipif(importlib.util.find_spec("selenium") is None,
                    reason="selenium is not installed (pip install -e '.[test]')")
def test_page_samples_a_grid_in_headless_chromium(server, tmp_path):
  from selenium import webdriver
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select, WebDriverWait

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                   f"--user-data-dir={tmp_path / 'profile'}"):
    options.add_argument(argument)
  # An explicit driver path: Selenium Manager (which would download one) never runs.
  browser = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
  try:
    browser.get(server)
    wait = WebDriverWait(browser, 120)
    button = browser.find_element(By.ID, "generate")
    wait.until(lambda _: button.is_enabled())  # /info has filled in the classes and defaults
    assert len(Select(browser.find_element(By.ID, "label")).options) == 10

    Select(browser.find_element(By.ID, "label")).select_by_value("7")
    for field, value in (("cfg_scale", "2"), ("seed", "5")):
      browser.find_element(By.ID, field).clear()
      browser.find_element(By.ID, field).send_keys(value)
    button.click()
    grid = browser.find_element(By.ID, "grid")
    wait.until(lambda _: grid.get_attribute("src") and button.is_enabled())
    assert png_pixels(grid.get_attribute("src")).shape == (GRID_PIXELS, GRID_PIXELS)
    assert browser.execute_script("return arguments[0].naturalWidth", grid) == GRID_PIXELS
    timing = browser.find_element(By.ID, "timing").text
    assert re.fullmatch(r"sampled in \d+\.\d{3} s on the server(?: \(compiled a new program\))?; \d+\.\d{3} s round trip\.",
                        timing), timing
    assert float(browser.find_element(By.ID, "sampling_seconds").text) > 0
    assert browser.find_element(By.ID, "error").text == ""

    # A bad value: the server's message is shown and its input marked.
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    button.click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda _: error.text)
    assert error.text.startswith("temperature=0")
    assert "invalid" in browser.find_element(By.ID, "temperature").get_attribute("class")
  finally:
    browser.quit()


def test_missing_or_empty_workdir_is_refused_before_serving(tmp_path):
  missing = start_server(tmp_path / "missing", tmp_path / "missing.log")
  assert missing.wait(timeout=300) != 0
  log = (tmp_path / "missing.log").read_text()
  assert f"--workdir={tmp_path / 'missing'} does not exist" in log
  assert "arjax demo page" not in log

  empty = tmp_path / "empty"
  empty.mkdir()
  refused = start_server(empty, tmp_path / "empty.log", "--config=configs/digits.py:smoke")
  assert refused.wait(timeout=300) != 0
  log = (tmp_path / "empty.log").read_text()
  assert f"--workdir={empty} holds no checkpoint: train first" in log
  assert "arjax demo page" not in log
  assert os.listdir(empty) == []  # nothing written into it
