"""Load test of `python -m arjax serve`: N concurrent clients on loopback, mixed requests.

    python benchmarks/serve_load.py --workdir=DIR [--engines=slots,sequential] [--clients=16]
        [--requests=64] [--slots=32] [--out=FILE.json]
    python benchmarks/serve_load.py --url=http://127.0.0.1:PORT/ [--clients=4] [--requests=12]

With --workdir it starts one server per engine on a free port (`--engine=slots`; then
`--engine=sequential`, the server before slots: one request at a time, each a padded batch of
16; then `--engine=per_request`: one request at a time, each a batch fitted to its count), runs the same request mix against each and
prints them side by side; with --url it loads a running server. Every client streams its
request (`"stream": true`) and checks what comes back: each image index exactly once and a
final `done`. A 429 (the queue is full) is waited out (Retry-After) and sent again, counted;
any other error, a lost request (no `done`) or a duplicated image is counted and makes the
exit status 1. The mix is drawn from --seed: classes, counts (--counts, 1/2/4/8), CFG 1 (none) / 1.6 / 3
with both ramps, temperatures 0.9 / 1 / 1.15, seeds; head steps are the config's.

Reported per engine: images/s (images over the wall time from the first request to the last
reply), p50 / p95 request latency (POST to the final line, 429 waits included), and the JAX
traces the server counted during the run (`arjax_traces_total`: 0 means nothing compiled).
Before the timed run each server gets one request of every (count, guidance on/off) pair of
the mix, untimed, so that neither engine's figures include compiling.
"""
import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL_LINE = re.compile(r"arjax demo page: (http://127\.0\.0\.1:\d+/)")


def request_mix(num_requests: int, seed: int, num_classes: int = 10, counts=(1, 2, 4, 8)):
  rng = random.Random(seed)
  mix = []
  for _ in range(num_requests):
    count = rng.choice(counts)
    mix.append({"count": count,
                "labels": [rng.randrange(num_classes) for _ in range(rng.choice((1, count)))],
                "cfg_scale": rng.choice((1.0, 1.6, 3.0)),
                "cfg_schedule": rng.choice(("constant", "linear")),
                "temperature": rng.choice((0.9, 1.0, 1.15)),
                "seed": rng.randrange(2**31), "stream": True})
  return mix


def traces(url: str) -> int:
  with urllib.request.urlopen(url + "metrics", timeout=60) as response:
    text = response.read().decode()
  return int(re.search(r"^arjax_traces_total (\d+)$", text, re.M).group(1))


def stream(url: str, body: dict, timeout: float = 600):
  """One streamed request: (HTTP status, lines) — for a 4xx/5xx, (status, [reply], headers)."""
  request = urllib.request.Request(url + "generate", data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, [json.loads(line) for line in response], response.headers
  except urllib.error.HTTPError as e:
    return e.code, [json.load(e)], e.headers


def run_load(url: str, mix, clients: int) -> dict:
  """Sends `mix` from `clients` threads; what came back, checked."""
  pending = list(enumerate(mix))
  lock = threading.Lock()
  results = {}
  counts = {"retried_429": 0, "errors": []}

  def client():
    while True:
      with lock:
        if not pending:
          return
        k, body = pending.pop(0)
      start = time.perf_counter()
      try:
        while True:
          status, lines, headers = stream(url, body)
          if status != 429:
            break
          with lock:
            counts["retried_429"] += 1
          time.sleep(float(headers.get("Retry-After") or 1))
      except (OSError, ValueError) as e:  # a reset connection, a torn line: counted, not fatal
        with lock:
          counts["errors"].append(f"request {k}: {type(e).__name__}: {e}")
        continue
      latency = time.perf_counter() - start
      with lock:
        if status != 200:
          counts["errors"].append(f"request {k}: HTTP {status}: {lines}")
        results[k] = (latency, lines)

  threads = [threading.Thread(target=client) for _ in range(clients)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start

  lost, duplicated, images, latencies, ids = [], [], 0, [], []
  for k, body in enumerate(mix):
    if k not in results:
      lost.append(k)
      continue
    latency, lines = results[k]
    indices = [line["index"] for line in lines if "index" in line]
    final = lines[-1] if lines else {}
    if final.get("status") != "done" or sorted(set(indices)) != list(range(body["count"])):
      lost.append(k)
    if len(indices) != len(set(indices)):
      duplicated.append(k)
    ids.append(final.get("id"))
    images += len(set(indices))
    latencies.append(latency)
  if len(set(ids)) != len(ids):
    duplicated.append("job ids")
  return {"requests": len(mix), "clients": clients, "images": images,
          "wall_seconds": round(wall, 3), "images_per_second": round(images / wall, 2),
          "latency_p50_s": round(float(np.quantile(latencies, 0.5)), 3) if latencies else None,
          "latency_p95_s": round(float(np.quantile(latencies, 0.95)), 3) if latencies else None,
          "lost": lost, "duplicated": duplicated, "errors": counts["errors"],
          "retried_429": counts["retried_429"]}


def start_server(workdir: str, engine: str, slots: int, queue_size: int, log_path: str):
  log = open(log_path, "w")
  process = subprocess.Popen(
      [sys.executable, "-m", "arjax", "serve", f"--workdir={workdir}", "--port=0",
       f"--engine={engine}", f"--slots={slots}", f"--queue_size={queue_size}"],
      cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log,
      stderr=subprocess.STDOUT)
  log.close()
  deadline = time.monotonic() + 600
  while True:
    with open(log_path) as f:
      found = URL_LINE.search(f.read())
    if found:
      return process, found.group(1)
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      with open(log_path) as f:
        raise RuntimeError(f"the {engine} server did not start:\n{f.read()}")
    time.sleep(0.2)


def warm(url: str, mix) -> None:
  """Sends one request of every (count, guided) pair of the mix, one at a time, untimed: the
  sequential engine compiles a program per batch size and guidance on/off, and its first
  uses must not count against it (the slot engine has one program for all)."""
  shapes = sorted({(body["count"], body["cfg_scale"] != 1.0) for body in mix})
  for count, guided in shapes:
    body = next(b for b in mix if b["count"] == count and (b["cfg_scale"] != 1.0) == guided)
    stream(url, body)


def load_one(url: str, mix, clients: int) -> dict:
  warm(url, mix)
  before = traces(url)
  report = run_load(url, mix, clients)
  report["traces_during_run"] = traces(url) - before
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", help="start a server per engine on this workdir")
  parser.add_argument("--url", help="load a running server instead")
  parser.add_argument("--engines", default="slots,sequential,per_request")
  parser.add_argument("--clients", type=int, default=16)
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--slots", type=int, default=32)
  parser.add_argument("--queue_size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--counts", default="1,2,4,8", help="images per request, drawn from these")
  parser.add_argument("--out", help="write the report here as JSON")
  args = parser.parse_args(argv)
  if (args.workdir is None) == (args.url is None):
    parser.error("give --workdir (start servers) or --url (a running one)")
  counts = tuple(int(c) for c in args.counts.split(","))
  mix = request_mix(args.requests, args.seed, counts=counts)
  reports = {}
  if args.url:
    reports["server"] = load_one(args.url, mix, args.clients)
  else:
    for engine in args.engines.split(","):
      log_path = os.path.join(args.workdir, f"serve_load_{engine}.log")
      process, url = start_server(args.workdir, engine, args.slots, args.queue_size, log_path)
      try:
        reports[engine] = load_one(url, mix, args.clients)
      finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
      reports[engine]["server_exit_status"] = process.returncode
  for baseline in ("sequential", "per_request"):
    if "slots" in reports and baseline in reports:
      reports[f"speedup_over_{baseline}"] = round(
          reports["slots"]["images_per_second"] / reports[baseline]["images_per_second"], 2)
  reports["settings"] = {"clients": args.clients, "requests": args.requests, "counts": counts,
                         "slots": args.slots, "queue_size": args.queue_size, "seed": args.seed,
                         "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  text = json.dumps(reports, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  bad = any(r.get("lost") or r.get("duplicated") or r.get("errors")
            for r in reports.values() if isinstance(r, dict))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
