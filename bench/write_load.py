#!/usr/bin/env python3
"""Write load for the HTTP read benchmark: WORKERS loops, each creating a deploy of the next of the stand-in's
extra versions (a slow download, so the pipeline publishes downloaded_bytes every Pipeline:ProgressInterval), waiting
for `deploying` and deleting the LoRA again, until SIGTERM. Prints what it did when it stops. Standard library only.

usage: write_load.py BASE_URL TOKEN FIRST_VERSION_ID VERSIONS WORKERS
"""
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
done = {"imports": 0, "failed": 0, "seconds": 0.0}
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


def main():
    base, token, first, versions, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counter = itertools.count()
    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(base, token, first, versions, i, counter), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and not stop.is_set():
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=70)
    elapsed = time.perf_counter() - began
    mean = done["seconds"] / done["imports"] if done["imports"] else 0
    print(f"write load: {done['imports']} imports ({done['failed']} failed) in {elapsed:.0f} s by {workers} workers, "
          f"{done['imports'] / elapsed:.2f}/s, mean create->deploying {mean:.1f} s")
    if errors or done["failed"]:
        sys.exit(f"write load: {errors or 'an import failed'}")


if __name__ == "__main__":
    main()
