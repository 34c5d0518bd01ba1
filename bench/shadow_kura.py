#!/usr/bin/env python3
"""Runs ../shared/bench/shadow-peers.sh's lsyncd case (fs-case: same generator, same target
watcher, same lag definition and analysis) with kura in lsyncd's place: the harness is imported
and lsyncd's process is replaced by bench/shadow-kura.sh (kura serve + kura shadow push).
CPU: 'primary' is the pusher, 'standby' the server. Usage:
  shadow_kura.py HARNESS KURA fs-case --work W --label L --rate R --duration S ..."""
import importlib.util, json, os, re, subprocess, sys

harness, kura = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location('harness', harness)
h = importlib.util.module_from_spec(spec)
# KURA_MAX_FILE: the largest new file (the harness's 64 KiB), for the run with files up to 1 MiB.
src = open(harness).read()
if os.environ.get('KURA_MAX_FILE'):
    src = src.replace('65536', os.environ['KURA_MAX_FILE'])
exec(compile(src, harness, 'exec'), h.__dict__)
HERE = os.path.dirname(os.path.abspath(__file__))
state = {}

real_spawn, real_cpu = h.spawn, h.proc_cpu


def spawn(args, **kw):
    if args and args[0] == 'lsyncd':
        conf = open(args[-1]).read()
        src = re.search(r'source = "([^"]+)"', conf).group(1)
        dst = re.search(r'target = "([^"]+)"', conf).group(1)
        st = os.path.join(os.path.dirname(args[-1]), 'kura')
        state['dir'] = st
        return real_spawn([os.path.join(HERE, 'shadow-kura.sh'), kura, src, dst, st], **kw)
    return real_spawn(args, **kw)


def proc_cpu(pid, split=False):
    st = state.get('dir')
    if st and os.path.exists(st + '/push.pid'):
        push = real_cpu(int(open(st + '/push.pid').read()))
        serve = real_cpu(int(open(st + '/serve.pid').read()))
        return (push, serve) if split else push + serve
    return real_cpu(pid, split)


h.spawn, h.proc_cpu = spawn, proc_cpu
sys.argv = [harness] + sys.argv[3:]
out = sys.stdout
sys.stdout = __import__('io').StringIO()
try:
    h.main()
finally:
    text = sys.stdout.getvalue()
    sys.stdout = out
lines = [l for l in text.splitlines() if l.startswith('{')]
if not lines:
    print(text)
    sys.exit(1)
r = json.loads(lines[-1])
r['case'] = r['case'].replace('lsyncd-', 'kura-')
rename = {'lsyncd_own_cpu_s_load': 'primary_cpu_s_load', 'rsync_cpu_s_load': 'standby_cpu_s_load',
          'lsyncd_rsync_cpu_s_load': 'both_cpu_s_load', 'lsyncd_rsync_cpu_s_total': 'both_cpu_s_total'}
r = {rename.get(k, k): v for k, v in r.items() if k != 'rsync_calls'}
st = state.get('dir')
if st:
    jdir = os.path.join(st, 'state/shadow/bench/journal')
    r['journal_bytes'] = sum(os.path.getsize(os.path.join(jdir, f)) for f in os.listdir(jdir)) if os.path.isdir(jdir) else None
    # New content written by the load (creates and overwrites, sizes uniform from 1 KiB to the
    # largest): the journal's bytes per changed byte.
    top = int(os.environ.get('KURA_MAX_FILE', '65536'))
    changed = (r['ops'].get('create', 0) + r['ops'].get('overwrite', 0)) * (1024 + top) / 2
    r['changed_bytes_est'] = int(changed)
    if r['journal_bytes']:
        r['journal_per_changed_byte'] = round(r['journal_bytes'] / changed, 3)
print(json.dumps(r), flush=True)
