#!/usr/bin/env python3
"""Prints the shadowing lag of kura and lsyncd side by side from their JSON result lines
(bench/shadow.sh)."""
import json, sys

rows = []
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            rows += [json.loads(l) for l in f if l.startswith('{')]
    except FileNotFoundError:
        pass


def cpu(r):
    if 'both_cpu_s_load' in r:
        return r['primary_cpu_s_load'], r['standby_cpu_s_load'], r['both_cpu_s_load']
    return r.get('lsyncd_own_cpu_s_load', 0), r.get('rsync_cpu_s_load', 0), r.get('lsyncd_rsync_cpu_s_load', 0)


print('| case | changes | lag p50 / p90 / p99 / max ms | p50/p99 per 10 s window | not arrived | mismatches | partial copies seen | CPU s primary / standby (cores over the load) | journal MB (per changed byte) |')
print('|---|---|---|---|---|---|---|---|---|')
for r in rows:
    l = r['lag_ms']
    p, s, both = cpu(r)
    dur = r['duration_s']
    jb = r.get('journal_bytes')
    print('| %s | %d | %.1f / %.1f / %.1f / %.1f | %s | %d | %d | %d | %.1f / %.1f (%.2f) | %s |' % (
        r['case'], r['changes'], l['p50'], l['p90'], l['p99'], l['max'], r['lag_p50_p99_ms_by_10s'],
        r['not_arrived_tail'], r['final_mismatches'], r['partial_copies_seen'], p, s, both / dur,
        '%.0f (%s)' % (jb / 1e6, r.get('journal_per_changed_byte', '-')) if jb else '-'))
