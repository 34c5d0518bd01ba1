"""The SQLite benchmarks' application (bench/sqlite-source.sh, bench/sqlite-shadow.sh), as
../shared/bench/shadow-peers.sh's writer: `create DB` makes the table in WAL mode; `write DB
RATE SECONDS` commits RATE one-row transactions/s (seq, commit time in ns; synchronous=NORMAL)
and prints how many and the slowest commit."""
import sqlite3, sys, time

if sys.argv[1] == "create":
    db = sqlite3.connect(sys.argv[2], isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, ns INTEGER, pad TEXT)")
    sys.exit(0)
db = sqlite3.connect(sys.argv[2], isolation_level=None, timeout=5)
db.execute("PRAGMA synchronous=NORMAL")
rate, secs = int(sys.argv[3]), float(sys.argv[4])
t0 = time.time(); n = 0; worst = 0
while time.time() - t0 < secs:
    n += 1
    a = time.time_ns()
    db.execute("INSERT INTO t VALUES (?, ?, 'x')", (n, time.time_ns()))
    worst = max(worst, time.time_ns() - a)
    delay = t0 + n / rate - time.time()
    if delay > 0:
        time.sleep(delay)
print("commits %d worst_commit_ms %.2f" % (n, worst / 1e6))
