#!/usr/bin/env python3
"""Generate config/{rbac,manager,prometheus} (kubectl apply -k) from the Helm chart, so the RBAC,
the operator Deployment and the monitoring objects have one source: charts/kiln.

usage: gen-config.py HELM OUT_DIR    (make generate writes config/; make chart-check diffs)

Renders the chart as release `kiln` in namespace `kiln-system` with monitoring on, drops the
labels that only make sense under Helm, and writes one file per template.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = '# Generated from charts/kiln by scripts/gen-config.py: edit the chart, then run make generate.\n'
HELM_ONLY = ('helm.sh/chart:', 'app.kubernetes.io/managed-by: Helm')
# chart template -> (config dir, file)
PLACES = {
    'serviceaccount.yaml': ('rbac', 'service_account.yaml'),
    'rbac.yaml': ('rbac', 'role.yaml'),
    'deployment.yaml': ('manager', 'deployment.yaml'),
    'service.yaml': ('manager', 'service.yaml'),
    'pdb.yaml': ('manager', 'pdb.yaml'),
    'monitoring.yaml': ('prometheus', 'monitoring.yaml'),
    'admission.yaml': ('admission', 'image-policy.yaml'),
}


def main():
    helm, out = sys.argv[1], sys.argv[2]
    rendered = subprocess.run(
        [helm, 'template', 'kiln', os.path.join(ROOT, 'charts', 'kiln'), '--namespace', 'kiln-system',
         '--set', 'metrics.serviceMonitor.enabled=true', '--set', 'metrics.podMonitor.enabled=true',
         '--set', 'prometheusAdapter.rules.enabled=true'],
        check=True, capture_output=True, text=True).stdout
    files = {}
    for doc in rendered.split('\n---\n'):
        lines = doc.strip('\n').split('\n')
        source = next((l for l in lines if l.startswith('# Source: ')), None)
        if source is None:
            continue
        template = os.path.basename(source.split(': ', 1)[1])
        if template not in PLACES:
            sys.exit(f'{template}: no place in config/ (add it to PLACES)')
        body = [l for l in lines if not l.startswith('# Source: ') and not l.strip().startswith(HELM_ONLY)]
        files.setdefault(PLACES[template], []).append('\n'.join(body))
    for d in sorted({d for d, _ in PLACES.values()}):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    for (d, name), docs in sorted(files.items()):
        with open(os.path.join(out, d, name), 'w') as f:
            f.write(HEADER + '---\n'.join(doc + '\n' for doc in docs))


if __name__ == '__main__':
    main()
