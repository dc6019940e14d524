#!/usr/bin/env python3
"""Write load for the HTTP read benchmark: WORKERS loops, each creating a deploy of the next of the stand-in's
extra versions (a slow download, so the pipeline publishes downloaded_bytes every Pipeline:ProgressInterval), waiting
for `deploying` and deleting the LoRA again, until SIGTERM. Prints what it did when it stops. Standard library only.
With a worker token, also HEARTBEATS serving workers: each registers on POOL (an engine pool of the server whose
deploys none are) and heartbeats every second, as `loradeploy worker` does, reporting 3 resident adapters; each
heartbeat is a committed write to the workers table.

usage: write_load.py BASE_URL TOKEN FIRST_VERSION_ID VERSIONS WORKERS [WORKER_TOKEN HEARTBEATS POOL]
"""
import hashlib
import http.client
import itertools
import json
import signal
import sys
import threading
import time
from urllib.parse import urlparse

stop = threading.Event()
lock = threading.Lock()
done = {"imports": 0, "failed": 0, "seconds": 0.0, "heartbeats": 0}
errors = []


def worker(base, token, first, versions, index, counter):
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(method, path, body=None):
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")

    for n in itertools.count():
        if stop.is_set():
            return
        with lock:
            version = first + next(counter) % versions
        name = f"load-{index}-{n}"
        body = json.dumps({"lora_name": name, "base_model": "black-forest-labs/FLUX-1-dev",
                           "source": {"type": "civitai", "civit_url": f"https://civitai.com/models/{version}?modelVersionId={version}"},
                           "private": True})
        start = time.perf_counter()
        status, created = call("POST", "/v1/lora/create", body)
        if status != 200:
            errors.append(f"create failed: {status} {created}")
            stop.set()
            return
        while not stop.is_set():
            _, deploy = call("GET", f"/deploy/{created['deploy_id']}")
            if deploy["status"] not in ("initializing", "downloading"):
                break
            time.sleep(0.2)
        else:
            return
        with lock:
            done["imports" if deploy["status"] == "deploying" else "failed"] += 1
            if deploy["status"] != "deploying" and not errors:
                errors.append(f"{name}: {deploy['status']}: {deploy.get('fail_reason')}")
            done["seconds"] += time.perf_counter() - start
        call("DELETE", f"/v1/lora/{name}")


def heartbeats(base, token, pool, index):
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(path, body):
        conn.request("POST", path, json.dumps(body), headers)
        response = conn.getresponse()
        return response.status, response.read()

    worker_id = f"bench-heartbeat-{index}"
    registration = {"id": worker_id, "engine": "comfyui", "pools": [pool], "slots": 4, "url": "http://127.0.0.1:9",
                    "version": "bench", "call_key": "k" * 40}
    adapters = [{"sha256": hashlib.sha256(f"{index}-{n}".encode()).hexdigest(), "pool": pool, "state": "ready"} for n in range(3)]
    status, body = call("/internal/v1/workers/register", registration)
    if status != 200:
        errors.append(f"{worker_id}: register answered {status} {body[:200]!r}")
        stop.set()
        return
    beat = 0
    while not stop.is_set():
        started = time.perf_counter()
        status, body = call(f"/internal/v1/workers/{worker_id}/heartbeat", {"queue_depth": beat % 3, "busy_slots": beat % 5, "adapters": adapters})
        if status == 404:
            call("/internal/v1/workers/register", registration)
        elif status != 200:
            errors.append(f"{worker_id}: heartbeat answered {status} {body[:200]!r}")
            stop.set()
            return
        beat += 1
        with lock:
            done["heartbeats"] += 1
        stop.wait(max(0.0, 1.0 - (time.perf_counter() - started)))


def main():
    base, token, first, versions, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    worker_token, beating, pool = (sys.argv[6], int(sys.argv[7]), sys.argv[8]) if len(sys.argv) > 8 else ("", 0, "")
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counter = itertools.count()
    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(base, token, first, versions, i, counter), daemon=True) for i in range(workers)]
    threads += [threading.Thread(target=heartbeats, args=(base, worker_token, pool, i), daemon=True) for i in range(beating)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and not stop.is_set():
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=70)
    elapsed = time.perf_counter() - began
    mean = done["seconds"] / done["imports"] if done["imports"] else 0
    print(f"write load: {done['imports']} imports ({done['failed']} failed) in {elapsed:.0f} s by {workers} workers, "
          f"{done['imports'] / elapsed:.2f}/s, mean create->deploying {mean:.1f} s; "
          f"{done['heartbeats']} heartbeats by {beating} workers, {done['heartbeats'] / elapsed:.1f}/s")
    if errors or done["failed"]:
        sys.exit(f"write load: {errors or 'an import failed'}")


if __name__ == "__main__":
    main()
