#!/usr/bin/env python3
"""Times POST /v1/lora/create → status `deploying` for a CivitAI version whose file is already stored.
Polls GET /deploy/{id} over one keep-alive connection (each poll costs well under a millisecond on loopback).
Standard library only.

usage: create_latency.py BASE_URL TOKEN CIVIT_URL COUNT PREFIX
"""
import http.client
import json
import statistics
import sys
import time
from urllib.parse import urlparse


def main():
    base, token, civit_url, count, prefix = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    times = []
    for i in range(count):
        body = json.dumps({"lora_name": f"{prefix}-{i}", "base_model": "black-forest-labs/FLUX-1-dev",
                           "source": {"type": "civitai", "civit_url": civit_url}, "private": True})
        start = time.perf_counter()
        conn.request("POST", "/v1/lora/create", body, headers)
        response = conn.getresponse()
        created = json.loads(response.read())
        if response.status != 200:
            sys.exit(f"create failed: {response.status} {created}")
        deploy_id = created["deploy_id"]
        while True:
            conn.request("GET", f"/deploy/{deploy_id}", headers=headers)
            response = conn.getresponse()
            status = json.loads(response.read())["status"]
            if status not in ("initializing", "downloading"):
                break
            if time.perf_counter() - start > 30:
                sys.exit(f"deploy {deploy_id} still {status} after 30 s")
        elapsed = (time.perf_counter() - start) * 1000
        if status != "deploying":
            sys.exit(f"deploy {deploy_id} ended {status}")
        times.append(elapsed)
    times.sort()
    p90 = times[max(0, int(len(times) * 0.9) - 1)]
    print(f"{statistics.median(times):.1f} {p90:.1f} {times[-1]:.1f}")


if __name__ == "__main__":
    main()
