"""`python -m arjax serve` end to end: a real server process (the slot engine) on a free loopback
port, driven over HTTP by concurrent clients and in headless Chromium.

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
import signal
import socket
import subprocess
import sys
import threading
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


def wait_for_url(process, log_path, timeout=300):
  deadline = time.monotonic() + timeout  # start-up compiles; the machine may be loaded
  while True:
    found = URL_LINE.search(log_path.read_text())
    if found:
      return found.group(1)
    if process.poll() is not None or time.monotonic() > deadline:
      raise AssertionError(f"the server did not start (rc {process.poll()}):\n"
                           f"{log_path.read_text()}")
    time.sleep(0.2)


@pytest.fixture(scope="module")
def server(smoke_run, tmp_path_factory):
  """The server on the shared smoke workdir (its config read from DIR/config.json): its URL.
  8 slots and a queue of 4, so that the tests can fill both."""
  _, workdir, _ = smoke_run
  log_path = tmp_path_factory.mktemp("serve") / "serve.log"
  process = start_server(workdir, log_path, "--slots=8", "--queue_size=4")
  try:
    yield wait_for_url(process, log_path)
  finally:
    process.terminate()
    process.wait(timeout=60)


def post(url, body):
  """POST /generate: (status, reply JSON, headers); a stream's lines as a list."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(url + "generate", data=data,
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=300) as response:
      if response.headers["Content-Type"] == "application/x-ndjson":
        return response.status, [json.loads(line) for line in response], response.headers
      return response.status, json.load(response), response.headers
  except urllib.error.HTTPError as e:
    return e.code, json.load(e), e.headers


def get(url, path):
  with urllib.request.urlopen(url + path.lstrip("/"), timeout=60) as response:
    data = response.read()
    return json.loads(data) if response.headers["Content-Type"] == "application/json" else data.decode()


def delete(url, path):
  request = urllib.request.Request(url + path.lstrip("/"), method="DELETE")
  with urllib.request.urlopen(request, timeout=60) as response:
    return json.load(response)


def wait_job(url, job_id, timeout=300):
  deadline = time.monotonic() + timeout
  while True:
    job = get(url, f"/jobs/{job_id}")
    if job["status"] in ("done", "timed_out", "cancelled", "failed", "rejected"):
      return job
    assert time.monotonic() < deadline, job["status"]
    time.sleep(0.05)


def metric(url, name):
  found = re.search(rf"^{re.escape(name)} (\S+)$", get(url, "/metrics"), re.M)
  assert found, name
  return float(found.group(1))


def wait_idle(url, timeout=60):
  """Until no slot is live and nothing waits."""
  deadline = time.monotonic() + timeout
  while metric(url, "arjax_live_slots") or metric(url, "arjax_queue_length"):
    assert time.monotonic() < deadline, get(url, "/metrics")
    time.sleep(0.05)


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
    ({"labels": [1, 12]}, "labels", "[0, 10)"),
    ({"labels": "1,2"}, "labels", "expected a non-empty list"),
    ({"labels": [1], "label": 1}, "labels", "not both"),
    ({"count": 10**9}, "count", "[1, 256]"),
    ({"count": 0}, "count", "[1, 256]"),
    ({"count": [4]}, "count", "expected a number"),
    ({"cfg_scale": -0.5}, "cfg_scale", ">= 0"),
    ({"cfg_scale": "strong"}, "cfg_scale", "expected a number"),
    ({"temperature": 0}, "temperature", "> 0"),
    ({"temperature": "-1"}, "temperature", "> 0"),
    ({"num_steps": 0}, "num_steps", "> 0"),
    ({"num_steps": -3}, "num_steps", "> 0"),
    ({"num_steps": 2.5}, "num_steps", "expected an integer"),
    ({"num_steps": 10**6}, "num_steps", "at most 1000"),
    ({"seed": "x"}, "seed", "expected a number"),
    ({"timeout_s": 0}, "timeout_s", "(0, 300]"),
    ({"stream": "yes"}, "stream", "expected true or false"),
    ({"cfg_schedule": "cosine"}, "cfg_schedule", "'constant', 'linear'"),
    ({"cfg": 2}, "cfg", "unknown field"),
    ([1, 2], "body", "JSON object"),
    (b"{not json", "body", "not JSON"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field, says):
  status, reply, _ = post(server, body)
  assert status == 400
  assert reply["field"] == field
  assert reply["error"].startswith(field) or field == "body"
  assert says in reply["error"]


def test_a_bad_request_leaves_the_others_served(server):
  status, job, _ = post(server, {"count": 64, "seed": 5})
  assert status == 202
  assert post(server, {"count": -1})[0] == 400  # while `job` decodes
  assert post(server, b"\xff\xfe")[0] == 400
  status, lines, _ = post(server, {"count": 2, "label": 4, "stream": True})
  assert status == 200 and lines[-1]["status"] == "done"
  assert [line["index"] for line in lines if "index" in line] == [0, 1] or \
      sorted(line["index"] for line in lines if "index" in line) == [0, 1]
  assert wait_job(server, job["id"])["status"] == "done"


def test_served_images_are_what_sample_draws(server, smoke_run):
  # Same checkpoint (EMA), same sampler, same seeds: image i of a request is image i of
  # `python -m arjax sample` for that class, whatever else the slots hold.
  from arjax.commands import sample as generate
  from arjax.serving import server as serve
  from arjax.training.experiment import Experiment

  _, workdir, _ = smoke_run
  settings = {"seed": 7, "cfg_scale": 2, "temperature": 0.9, "cfg_schedule": "constant"}
  status, other, _ = post(server, {"count": 40, "seed": 1})  # shares the slots meanwhile
  assert status == 202
  status, lines, _ = post(server, dict(settings, labels=[3, 5], count=16, stream=True))
  assert status == 200 and lines[-1]["status"] == "done"
  assert wait_job(server, other["id"])["status"] == "done"

  config = serve.workdir_config(workdir)
  config.sample.update(seed=7, cfg_scale=2.0, cfg_schedule="constant", temperature=0.9,
                       num_images=16, batch_size=16, labels="3,5")
  exp = Experiment(config)
  params, _ = generate.restore_params(exp, workdir, use_ema=True)
  drawn = generate.sample_images(exp, params, generate.parse_labels("3,5", 16, 10), progress=False)
  served = {line["index"]: png_pixels(line["image"]) for line in lines if "index" in line}
  assert sorted(served) == list(range(16))
  got = np.stack([served[i] for i in range(16)])[..., None]
  # tests/test_determinism.py's bound: another batch may flip a rounding (1 level).
  assert np.abs(got.astype(int) - drawn).max() <= 1 and np.mean(got == drawn) > 0.99
  grid = png_pixels(lines[-1]["grid"])
  assert grid.shape == (GRID_PIXELS, GRID_PIXELS)
  assert not np.array_equal(got[0], got[2])  # same class, other index: the check can fail


def test_a_burst_of_mixed_requests_compiles_nothing_and_loses_nothing(server):
  # The bounded load test: benchmarks/serve_load.py's clients, 6 at once, mixed classes,
  # counts, guidance, ramps, temperatures and seeds, through a queue of 4 (429s are waited
  # out and sent again); every request must come back whole, once, with nothing traced.
  wait_idle(server)
  result = subprocess.run(
      [sys.executable, "benchmarks/serve_load.py", f"--url={server}", "--clients=6",
       "--requests=12", "--seed=1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  report = json.loads(result.stdout)["server"]
  assert report["lost"] == [] and report["duplicated"] == [] and report["errors"] == []
  assert report["traces_during_run"] == 0
  assert report["images"] == sum(r["count"] for r in __import__(
      "benchmarks.serve_load", fromlist=["request_mix"]).request_mix(12, 1))
  assert report["images_per_second"] > 0


def test_a_full_queue_answers_429(server):
  wait_idle(server)
  replies = [post(server, {"count": 256, "seed": k}) for k in range(6)]
  statuses = [status for status, _, _ in replies]
  # 8 slots draw 256 images in 32 rounds: the first request still waits for some of its
  # slots when the fifth arrives, so 4 wait and the rest are refused.
  assert statuses[:4] == [202] * 4 and 429 in statuses[4:], statuses
  refused = next(r for status, r, _ in replies if status == 429)
  headers = next(h for status, _, h in replies if status == 429)
  assert refused["error"].startswith("the queue is full") and "--queue_size=4" in refused["error"]
  assert headers["Retry-After"] == "1"
  for status, job, _ in replies:
    if status == 202:
      assert delete(server, f"/jobs/{job['id']}")["status"] in ("cancelled", "done")
  wait_idle(server)
  assert metric(server, 'arjax_requests_total{outcome="queue_full"}') >= 1


def test_a_client_that_disconnects_frees_its_slots(server):
  wait_idle(server)
  port = int(server.rsplit(":", 1)[1].strip("/"))
  body = json.dumps({"count": 256, "stream": True}).encode()
  with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
    client.sendall(b"POST /generate HTTP/1.0\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    reader = client.makefile("rb")
    while reader.readline() not in (b"\r\n", b""):
      pass  # the headers
    first = json.loads(reader.readline())
    assert first["count"] == 256
    assert metric(server, "arjax_live_slots") > 0
    reader.close()  # the socket closes only when its file does too
  # Gone after one line: its job is cancelled and its slots are free within a step or two.
  job = wait_job(server, first["id"])
  assert job["status"] == "cancelled" and "client went away" in job["error"]
  assert job["done"] < 256
  wait_idle(server, timeout=30)


def test_a_request_that_times_out_frees_its_slots(server):
  wait_idle(server)
  status, job, _ = post(server, {"count": 256, "timeout_s": 0.2})
  assert status == 202
  job = wait_job(server, job["id"])
  assert job["status"] == "timed_out" and job["error"].startswith("timed out after 0.2 s")
  assert job["done"] < 256 and "grid" not in job
  assert sum(image is not None for image in job["images"]) == job["done"]  # kept
  wait_idle(server, timeout=30)


def test_metrics_page_is_prometheus_text(server):
  # One finished request of its own, so the latency quantiles exist whichever tests ran before.
  status, job, _ = post(server, {"count": 1})
  assert status == 202 and wait_job(server, job["id"])["status"] == "done"
  text = get(server, "/metrics")
  for name, kind in (("arjax_queue_length", "gauge"), ("arjax_live_slots", "gauge"),
                     ("arjax_images_per_second", "gauge"), ("arjax_images_total", "counter"),
                     ("arjax_request_latency_seconds", "summary")):
    assert f"# TYPE {name} {kind}" in text
  assert re.search(r'^arjax_request_latency_seconds\{quantile="0.5"\} \d+\.\d+$', text, re.M)
  assert re.search(r'^arjax_request_latency_seconds\{quantile="0.95"\} \d+\.\d+$', text, re.M)
  assert re.search(r'^arjax_slots\{engine="slots"\} 8$', text, re.M)
  assert metric(server, "arjax_images_total") > 0


def test_sigterm_finishes_running_requests_and_rejects_queued_ones(smoke_run, tmp_path):
  _, workdir, _ = smoke_run
  log_path = tmp_path / "serve.log"
  process = start_server(workdir, log_path, "--slots=2")
  try:
    url = wait_for_url(process, log_path)
    streams = {}

    def client(name, body):
      streams[name] = post(url, dict(body, stream=True))

    # 2 slots: `running` holds both for 100 rounds; the other two wait behind it.
    threads = [threading.Thread(target=client, args=("running", {"count": 200}))]
    threads[0].start()
    while not metric(url, "arjax_live_slots"):
      time.sleep(0.02)
    for name in ("queued_1", "queued_2"):
      threads.append(threading.Thread(target=client, args=(name, {"count": 4})))
      threads[-1].start()
    while metric(url, "arjax_queue_length") < 3:
      time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    for t in threads:
      t.join(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  log = log_path.read_text()
  assert "shutdown: rejected 2 queued request(s); finishing 1 running" in log, log
  assert log.rstrip().endswith("serve: stopped")
  status, lines, _ = streams["running"]
  assert status == 200 and lines[-1]["status"] == "done"
  assert len([line for line in lines if "index" in line]) == 200
  for name in ("queued_1", "queued_2"):
    status, lines, _ = streams[name]
    assert status == 200 and lines[-1]["status"] == "rejected", lines[-1]
    assert "shutting down" in lines[-1]["error"]


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


def test_bad_engine_flags_are_refused_before_serving(smoke_run, tmp_path):
  _, workdir, _ = smoke_run
  refused = start_server(workdir, tmp_path / "slots.log", "--slots=0")
  assert refused.wait(timeout=300) != 0
  log = (tmp_path / "slots.log").read_text()
  assert "error: --slots=0: an integer >= 1" in log and "arjax demo page" not in log
