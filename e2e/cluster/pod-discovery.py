#!/usr/bin/env python3
"""Pod discovery for the dev cluster's Prometheus, through the API server.

Debian's Prometheus package is built without the Kubernetes service discovery (its client-go
dependency is not packaged), so this plays kubernetes_sd's part for one selection: it lists
the model-server pods every second and writes them as a file_sd target file, with the labels
the Prometheus operator would give a PodMonitor's targets (namespace, pod). The selection is the
chart's PodMonitor: pods labelled app.kubernetes.io/name=kiln-model-server that carry the
kiln.dev/modeldeployment label, Running, with an IP, on their container port named "http".

usage: pod-discovery.py --kubeconfig FILE --out targets.json [--interval 1]
"""
import argparse
import json
import os
import subprocess
import sys
import time

SELECTOR = "app.kubernetes.io/name=kiln-model-server,kiln.dev/modeldeployment"


def targets(pods):
    out = []
    for pod in pods:
        status = pod.get("status", {})
        ip = status.get("podIP")
        if status.get("phase") != "Running" or not ip or pod["metadata"].get("deletionTimestamp"):
            continue
        port = next(
            (
                p["containerPort"]
                for c in pod.get("spec", {}).get("containers", [])
                for p in c.get("ports", [])
                if p.get("name") == "http"
            ),
            None,
        )
        if port is None:
            continue
        out.append(
            {
                "targets": [f"{ip}:{port}"],
                "labels": {"namespace": pod["metadata"]["namespace"], "pod": pod["metadata"]["name"]},
            }
        )
    return sorted(out, key=lambda t: t["targets"][0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    last = None
    while True:
        try:
            raw = subprocess.run(
                ["kubectl", "--kubeconfig", args.kubeconfig, "get", "pods", "-A", "-l", SELECTOR, "-o", "json",
                 "--request-timeout=5s"],
                check=True, capture_output=True, text=True,
            ).stdout
            now = targets(json.loads(raw)["items"])
            if now != last:
                tmp = args.out + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(now, f, indent=1)
                os.replace(tmp, args.out)  # Prometheus must never read a half-written file
                print(f"{len(now)} targets: {[t['targets'][0] for t in now]}", flush=True)
                last = now
        except (subprocess.CalledProcessError, ValueError, KeyError) as e:
            print(f"listing pods failed: {e}", file=sys.stderr, flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
