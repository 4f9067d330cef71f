#!/usr/bin/env python3
"""Print Kiln vs the Python baseline from the JSON that bench/run.sh wrote (usage: report.py OUT)."""
import json
import os
import platform
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def by_conns(http):
    return {r.get('connections'): r for r in (http or {}).get('runs', [])}


def ratio(a, b, invert=False):
    if a is None or b in (None, 0):
        return '-'
    return f'{(b / a if invert else a / b):.2f}x'


def cpu_flags():
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return []


def ort_table(packed, ort, http1):
    """Kiln's packed encoder against ONNX Runtime (same model, corpus and threads), with the ISA
    each side used and issue 25's targets; and HTTP at one connection against the engine."""
    if not packed or not ort:
        return
    runs = ort.get('runs', {})
    flags = cpu_flags()
    # MLAS (ONNX Runtime's kernels) dispatches to AVX-512F where the CPU has it, else AVX2+FMA.
    ort_isa = 'avx512' if 'avx512f' in flags else 'avx2+fma' if 'avx2' in flags else 'sse'
    detail = packed.get('engine', {})
    kiln_isa = f"row kernels {detail.get('isa', '?')}, matmuls {detail.get('matmul_isa', '?')}"
    print(f"\nKiln engine vs ONNX Runtime {ort.get('ort', '?')} (all-MiniLM-L6-v2, same corpus and threads; "
          f"Kiln: {kiln_isa}; ONNX Runtime: MLAS {ort_isa}; ONNX Runtime's cosine against "
          f"sentence-transformers {ort.get('min_cosine_vs_st', 0):.5f})")
    print(f'| {"measure":36} | {"kiln":>9} | {"onnxrt":>9} | {"ratio":>7} | {"target":>8} |')
    print(f'|{"-" * 38}|{"-" * 11}|{"-" * 11}|{"-" * 9}|{"-" * 10}|')
    rows = [('sentences/s, batch 32, short', (packed.get('throughput_short') or {}).get('sentences_per_s'),
             (runs.get('short') or {}).get('sentences_per_s'), False, '>= 1.2x'),
            ('sentences/s, batch 32, long', (packed.get('throughput_long') or {}).get('sentences_per_s'),
             (runs.get('long') or {}).get('sentences_per_s'), False, '>= 1.2x'),
            # p50 target: Kiln at most 0.8x of ONNX Runtime's, i.e. an advantage of 1.25x.
            ('batch-1 p50 ms', (packed.get('latency_single') or {}).get('p50_ms'),
             (runs.get('batch1') or {}).get('p50_ms'), True, '>= 1.25x'),
            ('batch-1 p99 ms', (packed.get('latency_single') or {}).get('p99_ms'),
             (runs.get('batch1') or {}).get('p99_ms'), True, '')]
    for name, k, o, lower_better, target in rows:
        fk = '-' if k is None else f'{k:.1f}' if not lower_better else f'{k:.2f}'
        fo = '-' if o is None else f'{o:.1f}' if not lower_better else f'{o:.2f}'
        print(f'| {name:36} | {fk:>9} | {fo:>9} | {ratio(k, o, lower_better):>7} | {target:>8} |')
    engine_p50 = (packed.get('latency_single') or {}).get('p50_ms')
    http_p50 = (http1 or {}).get('p50_ms')
    if engine_p50 is not None and http_p50 is not None:
        print(f'HTTP p50 at one connection {http_p50:.2f} ms against the engine\'s batch-1 p50 {engine_p50:.2f} ms: '
              f'{http_p50 - engine_p50:+.2f} ms (target: within 1.5 ms)')


def main():
    out = sys.argv[1]
    ke, kh = load(os.path.join(out, 'kiln-engine.json')), load(os.path.join(out, 'kiln-http.json'))
    be, bh = load(os.path.join(out, 'baseline', 'engine.json')), load(os.path.join(out, 'baseline', 'http.json'))

    def eng(res, key, field):
        # The baseline nests its runs under "runs"; bench_engine writes one object per encoder.
        runs = (res or {}).get('runs', res or {})
        return (runs.get(key) or {}).get(field)

    packed, stock = (ke or {}).get('packed'), (ke or {}).get('candle')

    rows = []
    for label, enc in (('engine', packed), ('candle stock BertModel', stock)):
        if enc is None:
            continue
        rows += [(f'{label} sentences/s, batch 32, short', eng(enc, 'throughput_short', 'sentences_per_s'),
                  eng(be, 'throughput_short', 'sentences_per_s'), False),
                 (f'{label} sentences/s, batch 32, long', eng(enc, 'throughput_long', 'sentences_per_s'),
                  eng(be, 'throughput_long', 'sentences_per_s'), False),
                 (f'{label} batch-1 p50 ms', eng(enc, 'latency_single', 'p50_ms'),
                  eng(be, 'latency_single', 'p50_ms'), True),
                 (f'{label} batch-1 p99 ms', eng(enc, 'latency_single', 'p99_ms'),
                  eng(be, 'latency_single', 'p99_ms'), True)]
    kc, bc = by_conns(kh), by_conns(bh)
    ort_table(packed, load(os.path.join(out, 'baseline', 'ort.json')), kc.get(1))
    for n in sorted(set(kc) | set(bc)):
        rows.append((f'HTTP /embed/text req/s, {n} conns', kc.get(n, {}).get('rps'), bc.get(n, {}).get('rps'), False))
        rows.append((f'HTTP p50 ms, {n} conns', kc.get(n, {}).get('p50_ms'), bc.get(n, {}).get('p50_ms'), True))
        rows.append((f'HTTP p99 ms, {n} conns', kc.get(n, {}).get('p99_ms'), bc.get(n, {}).get('p99_ms'), True))
    rows.append(('RSS idle MiB', (kh or {}).get('rss_mib_idle'), (bh or {}).get('rss_mib_idle'), True))
    k_after = max((r.get('rss_mib_after') or 0 for r in (kh or {}).get('runs', [])), default=None)
    b_after = max((r.get('rss_mib_after') or 0 for r in (bh or {}).get('runs', [])), default=None)
    rows.append(('RSS after load MiB', k_after, b_after, True))
    rows.append(('start to ready s', (kh or {}).get('startup_s'), (bh or {}).get('startup_s'), True))

    print(f'\nKiln vs Python baseline ({platform.machine()}, {os.cpu_count()} cores); '
          'ratio = Kiln advantage (higher is better)')
    print(f'| {"measure":40} | {"kiln":>10} | {"baseline":>10} | {"ratio":>7} |')
    print(f'|{"-" * 42}|{"-" * 12}|{"-" * 12}|{"-" * 9}|')
    for name, k, b, lower_better in rows:
        fmt = lambda v: '-' if v is None else f'{v:.1f}' if isinstance(v, (int, float)) else str(v)  # noqa: E731
        print(f'| {name:40} | {fmt(k):>10} | {fmt(b):>10} | {ratio(k, b, lower_better):>7} |')

    cl = load(os.path.join(out, 'cluster.json'))
    if cl:
        print(f'\nOperator on the local control plane ({cl["mds"]} ModelDeployments)')
        print(f'| {"measure":52} | {"value":>10} | {"target":>8} |')
        print(f'|{"-" * 54}|{"-" * 12}|{"-" * 10}|')
        per = (cl['writes_during_unchanged_reconciles'] / cl['unchanged_reconciles']
               if cl.get('unchanged_reconciles') else None)
        for name, v, target in (
                ('dev cluster up, binaries cached, s', cl.get('dev_cluster_up_s'), ''),
                ('kubectl apply of all resources, s', cl.get('apply_s'), ''),
                ('all reconciled (observedGeneration), s', cl.get('all_reconciled_s'), ''),
                ('all Ready (pods scheduled and Ready), s', cl.get('all_ready_s'), '60'),
                ('same objects without the operator: all Ready, s', cl.get('control_plane_alone_ready_s'), ''),
                ('operator RSS at steady state, MiB', cl.get('operator_rss_mib'), '100'),
                ('operator peak RSS, MiB', cl.get('operator_peak_rss_mib'), '100'),
                ('unchanged reconciles after a restart', cl.get('unchanged_reconciles'), ''),
                ('API writes per unchanged reconcile', per, '0')):
            val = '-' if v is None else f'{v:.2f}' if isinstance(v, float) else str(v)
            print(f'| {name:52} | {val:>10} | {target:>8} |')

    sc = load(os.path.join(out, 'autoscaling.json'))
    if sc:
        st = sc.get('settings', {})
        print('\nAutoscaling on kiln_queue_depth (real pods, Prometheus, prometheus-adapter, HPA): '
              + ', '.join(f'{k} {v}' for k, v in st.items()))
        print(f'| {"measure":66} | {"value":>10} |')
        print(f'|{"-" * 68}|{"-" * 12}|')
        for name, key in (('load start to kiln_queue_depth over target (custom metrics API), s',
                           'load_start_to_metric_over_target_s'),
                          ('metric over target to first new pod Ready, s',
                           'metric_over_target_to_first_new_pod_ready_s'),
                          ('load start to first new pod Ready, s', 'load_start_to_first_new_pod_ready_s'),
                          ('load start to maxReplicas Ready, s', 'load_start_to_max_replicas_ready_s'),
                          ('load end to back at minReplicas, s', 'load_end_to_min_replicas_s'),
                          ('requests answered', 'requests_ok'),
                          ('requests refused with 429 + Retry-After', 'requests_429'),
                          ('requests failed (timeouts, errors)', 'requests_failed')):
            v = sc.get(key)
            val = '-' if v is None else f'{v:.1f}' if isinstance(v, float) else str(v)
            print(f'| {name:66} | {val:>10} |')

    gk, gl = load(os.path.join(out, 'generation-kiln.json')), load(os.path.join(out, 'generation-llama-cpp.json'))
    if gk or gl:
        gk, gl = gk or {}, gl or {}
        print('\nText generation, SmolLM2-135M-Instruct Q4_1, greedy, same threads, prompt '
              + repr((gk or gl).get('prompt')) + f", max_tokens {(gk or gl).get('max_tokens')}")
        print(f'| {"measure":38} | {"kiln":>9} | {"llama.cpp":>9} | {"kiln/llama.cpp":>14} | {"target":>8} |')
        print(f'|{"-" * 40}|{"-" * 11}|{"-" * 11}|{"-" * 16}|{"-" * 10}|')
        rows = [('time to first token, ms', gk.get('ttft_ms'), gl.get('ttft_ms'), True, ''),
                ('single-stream decode, tokens/s', gk.get('single_stream_tokens_per_s'),
                 gl.get('single_stream_tokens_per_s'), False, '>= 1.4x')]
        for n in ('128', '512'):
            rows.append((f'prefill of {n} prompt tokens, tokens/s', (gk.get('prefill_tokens_per_s') or {}).get(n),
                         (gl.get('prefill_tokens_per_s') or {}).get(n), False, '>= 1x'))
        for c in ('1', '4', '8'):
            rows.append((f'aggregate at {c} streams, tokens/s', (gk.get('aggregate_tokens_per_s') or {}).get(c),
                         (gl.get('aggregate_tokens_per_s') or {}).get(c), False, '>= 1x' if c == '8' else ''))
        rows.append(('peak memory (RSS), MiB', gk.get('peak_rss_mib'), gl.get('peak_rss_mib'), True, ''))
        for name, a, b, lower_better, target in rows:
            fa = '-' if a is None else f'{a:.1f}'
            fb = '-' if b is None else f'{b:.1f}'
            print(f'| {name:38} | {fa:>9} | {fb:>9} | {ratio(a, b, invert=lower_better):>14} | {target:>8} |')

    bg = load(os.path.join(out, 'bge-m3.json'))
    if bg:
        k, t = bg.get('kiln', {}), bg.get('torch', {})
        print(f"\n{bg.get('shape')}: {bg.get('sentences')} short sentences, {bg.get('threads')} threads; "
              f"worst cosine against sentence-transformers {bg.get('worst_cosine_vs_sentence_transformers', 0):.6f}")
        print(f'| {"measure":38} | {"kiln":>9} | {"torch":>9} | {"kiln/torch":>10} |')
        print(f'|{"-" * 40}|{"-" * 11}|{"-" * 11}|{"-" * 12}|')
        for name, a, b, lower_better in (('sentences/s, batch 32', k.get('sentences_per_s'), t.get('sentences_per_s'), False),
                                         ('batch-1 p50, ms', k.get('p50_ms'), t.get('p50_ms'), True),
                                         ('load (kiln: start to ready), s', k.get('start_to_ready_s'), t.get('load_s'), True)):
            fa = '-' if a is None else f'{a:.1f}'
            fb = '-' if b is None else f'{b:.1f}'
            print(f'| {name:38} | {fa:>9} | {fb:>9} | {ratio(a, b, invert=lower_better):>10} |')

    lz = load(os.path.join(out, 'lazy.json'))
    if lz:
        print('\nLazy loading (2 threads): a request whose model is not in memory; targets: MiniLM first '
              'request < 1 s, RSS after unload within 10% of before the load')
        print(f'| {"measure":52} | {"p50, ms":>9} | {"max, ms":>9} |')
        print(f'|{"-" * 54}|{"-" * 11}|{"-" * 11}|')
        for name, key in (('MiniLM first request (load, warmup, answer)', 'minilm_first_request'),
                          ('MiniLM request once warm', 'minilm_warm_request'),
                          ('MiniLM swap (unload one, load another, answer)', 'minilm_swap'),
                          ('SmolLM2 first chat, 8 tokens (load, warmup, answer)', 'smollm2_first_chat'),
                          ('SmolLM2 chat once warm', 'smollm2_warm_chat'),
                          ('torch: SentenceTransformer(dir) + first encode', 'torch_load_and_first_encode')):
            r = lz.get(key)
            if r:
                print(f'| {name:52} | {r["p50_ms"]:>9.1f} | {r["max_ms"]:>9.1f} |')
        rss = lz.get('rss_mib') or {}
        if rss:
            print(f"RSS, MiB: before the load {rss.get('before_load')}, loaded {rss.get('loaded')}, "
                  f"after the idle unload {rss.get('after_unload')} ({rss.get('after_over_before')}x before)")

    it = load(os.path.join(out, 'image-text.json'))
    for name, row in ((it or {}).get('checkpoints') or {}).items():
        k, t = row.get('kiln', {}), row.get('torch', {})
        print(f"\nImage-text, SigLIP {name} at {row.get('image_size')} px ({it.get('threads')} threads, "
              f"{it.get('images')} JPEG keyframes; Kiln over HTTP); smallest cosine to torch: images "
              f"{row.get('min_image_cosine', 0):.7f}, queries {row.get('min_text_cosine', 0):.7f}")
        print(f'| {"measure":38} | {"kiln":>9} | {"torch":>9} | {"kiln/torch":>10} | {"target":>8} |')
        print(f'|{"-" * 40}|{"-" * 11}|{"-" * 11}|{"-" * 12}|{"-" * 10}|')
        for label, key, target in (('images/s, batch 32', 'images_per_s', '2x'),
                                   ('image batch-1 p50, ms', 'image_p50_ms', '0.5x'),
                                   ('image batch-1 p99, ms', 'image_p99_ms', ''),
                                   ('query batch-1 p50, ms', 'text_p50_ms', '0.5x'),
                                   ('query batch-1 p99, ms', 'text_p99_ms', ''),
                                   ('peak RSS, MiB', 'rss_mib', ''),
                                   ('load, s', 'load_s', ''),
                                   ('start to ready (kiln), s', 'ready_s', '')):
            a, b = k.get(key), t.get(key) if key != 'ready_s' else None
            fmt = (lambda v: f'{v:.3f}') if key == 'images_per_s' else (lambda v: f'{v:.1f}')
            fa = '-' if a is None else fmt(a)
            fb = '-' if b is None else fmt(b)
            value = '-' if a is None or not b else f'{a / b:.2f}x'
            print(f'| {label:38} | {fa:>9} | {fb:>9} | {value:>10} | {target:>8} |')

    fd = load(os.path.join(out, 'faces.json'))
    if fd:
        rss = fd.get('rss_mib') or {}
        print(f"\nFace detection, YuNet 2023mar ({fd.get('threads')} threads, {fd.get('frames')} JPEG frames per size; "
              f"Kiln over HTTP, OpenCV {fd.get('opencv')} in process); peak RSS kiln {rss.get('kiln') or 0:.0f} MiB, "
              f"OpenCV {rss.get('opencv') or 0:.0f} MiB; kiln start to ready {fd.get('kiln_ready_s', 0):.2f} s")
        print(f'| {"measure":34} | {"kiln":>9} | {"opencv":>9} | {"kiln/opencv":>11} | {"target":>8} |')
        print(f'|{"-" * 36}|{"-" * 11}|{"-" * 11}|{"-" * 13}|{"-" * 10}|')
        for size, row in (fd.get('sizes') or {}).items():
            k, c = row.get('kiln', {}), row.get('opencv', {})
            for label, key, target in ((f'{size} images/s', 'images_per_s', '>= 1x'),
                                       (f'{size} batch-1 p50, ms', 'p50_ms', ''),
                                       (f'{size} batch-1 p99, ms', 'p99_ms', '')):
                a, b = k.get(key), c.get(key)
                value = '-' if a is None or not b else f'{a / b:.2f}x'
                print(f'| {label:34} | {a or 0:>9.1f} | {b or 0:>9.1f} | {value:>11} | {target:>8} |')
            ag = row.get('agreement') or {}
            print(f"| {size + ' faces found (kiln / opencv)':34} | {ag.get('kiln_faces', 0):>9} | "
                  f"{ag.get('opencv_faces', 0):>9} | {'max box diff ' + format(ag.get('max_box_difference_px', 0), '.2f'):>11} | {'':>8} |")


if __name__ == '__main__':
    main()
