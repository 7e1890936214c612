# shellcheck shell=bash
# Shared helpers of bench/run.sh and bench/scenarios/*.sh (sourced, never run).
#
# The runner sets P (the parallax binary), ROUNDS, RUNTIME, SIZE, AGG and the
# per-scenario knobs; each scenario runs in a subshell with its own work
# directory SDIR (on the benchmark file system) and its own results file.
#
# Processes: every process a scenario starts is recorded as "PID NAME" in
# $SDIR/pids and stopped by PID (SIGTERM, then SIGKILL after a timeout) by
# stop_pid / stop_all. The runner stops whatever a failed or interrupted
# scenario left behind the same way, then removes the work directory.

# shellcheck disable=SC2034 # read by the scenarios
BENCH_LIB=1

# --- small utilities -----------------------------------------------------------

log() { printf '%s\n' "$*"; }
die() { printf '!! %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1f", e - s }'; }

# to_bytes 1G|256M|4k|123 -> bytes
to_bytes() {
    local v=$1 n u
    n=${v%[kKmMgGtT]}
    u=${v#"$n"}
    case "$u" in
        "") echo "$n" ;;
        k | K) echo $((n << 10)) ;;
        m | M) echo $((n << 20)) ;;
        g | G) echo $((n << 30)) ;;
        t | T) echo $((n << 40)) ;;
    esac
}

# --- process bookkeeping -------------------------------------------------------

track() { echo "$1 $2" >>"$SDIR/pids"; }
untrack() { [ -f "$SDIR/pids" ] && sed -i "/^$1 /d" "$SDIR/pids"; return 0; }

# is_alive PID: the process exists and is not a zombie.
is_alive() {
    local st
    st=$(sed -n 's/^.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

# stop_pid PID [TIMEOUT_S]: SIGTERM, wait up to TIMEOUT_S (default 60), then
# SIGKILL. Returns the exit status when PID is a child of this shell.
stop_pid() {
    local pid=$1 timeout=${2:-60} i rc=0
    if is_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < timeout * 10; i++)); do
            is_alive "$pid" || break
            sleep 0.1
        done
        if is_alive "$pid"; then
            log "!! PID $pid did not stop within ${timeout}s after SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || rc=$?
    [ "$rc" = 127 ] && rc=0 # not a child of this shell: no status to collect
    untrack "$pid"
    return "$rc"
}

# stop_all DIR [quiet]: stops every process recorded in DIR/pids, newest first.
stop_all() {
    local dir=$1 quiet=${2:-} pid name
    [ -f "$dir/pids" ] || return 0
    while read -r pid name; do
        [ -n "$pid" ] || continue
        if [ -z "$quiet" ] && is_alive "$pid"; then log "   stopping $name (PID $pid), left running"; fi
        SDIR=$dir stop_pid "$pid" 20 || true
    done < <(tac "$dir/pids")
    rm -f "$dir/pids"
}

# stop_strays DIR: stops any process whose command line names DIR (a unique
# temporary directory), e.g. one started just before an interrupt, before it
# was recorded. By PID, with the same SIGTERM-then-SIGKILL as stop_pid.
stop_strays() {
    local dir=$1 p pid
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" = $$ ] || [ "$pid" = "${BASHPID:-}" ] && continue
        if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -- "$dir/"; then
            log "   stopping stray PID $pid: $(tr '\0' ' ' 2>/dev/null <"$p/cmdline" | cut -c1-100)"
            SDIR=$dir stop_pid "$pid" 20 || true
        fi
    done
}

# --- servers -------------------------------------------------------------------
# A target is a name with URI[name] = an NBD URI, or "file:PATH" for fio's
# io_uring engine on a local file (the disk ceiling).

declare -gA URI=() PIDOF=() STORE=()

# px_start NAME [serve options]: a fresh store SDIR/NAME.px and its daemon,
# serving NBD on SDIR/NAME.sock only. Waits until `status` answers.
# PX_SERVE_ARGS adds options to every such daemon (PX_SERVE_ARGS=--journal).
px_start() {
    local name=$1 i
    shift
    STORE[$name]="$SDIR/$name.px"
    "$P" --store "${STORE[$name]}" init --size "${PX_STORE_SIZE:-16G}" >/dev/null
    # shellcheck disable=SC2086 # a list of options
    "$P" --store "${STORE[$name]}" serve "$@" ${PX_SERVE_ARGS:-} --nbd-listen none --nbd-socket "$SDIR/$name.sock" \
        >"$SDIR/$name.log" 2>&1 </dev/null &
    PIDOF[$name]=$!
    track "${PIDOF[$name]}" "$name"
    for ((i = 0; i < 200; i++)); do
        "$P" --store "${STORE[$name]}" status >/dev/null 2>&1 && return 0
        is_alive "${PIDOF[$name]}" || break
        sleep 0.05
    done
    tail -20 "$SDIR/$name.log" >&2
    die "parallax daemon $name did not come up"
}

# px NAME ARGS...: the parallax command on NAME's store (through its daemon).
px() {
    local name=$1
    shift
    "$P" --store "${STORE[$name]}" "$@"
}

px_uri() { echo "nbd+unix:///$2?socket=$SDIR/$1.sock"; }

# px_api NAME METHOD PATH [JSON]: the control API; prints "HTTP_CODE SECONDS"
# (curl's time_total: the request alone, no process start-up) and keeps the
# body in SDIR/api.out. Fails on anything but 2xx.
px_api() {
    local name=$1 method=$2 path=$3 body=${4:-} out
    local args=(-s -o "$SDIR/api.out" -w '%{http_code} %{time_total}' --unix-socket "${STORE[$name]}.control" -X "$method")
    [ -n "$body" ] && args+=(-H 'Content-Type: application/json' -d "$body")
    out=$(curl "${args[@]}" "http://parallax$path") || die "curl $method $path failed"
    case "$out" in
        2*) echo "$out" ;;
        *) die "$method $path: HTTP $out: $(cat "$SDIR/api.out")" ;;
    esac
}

# px_stop NAME: SIGTERM, wait, and report a bad exit or warnings in its log.
px_stop() {
    local name=$1 rc=0
    stop_pid "${PIDOF[$name]}" 120 || rc=$?
    [ "$rc" = 0 ] || log "!! parallax daemon $name exited with status $rc"
    if grep -qE ' (WARN|ERROR) |panicked' "$SDIR/$name.log"; then
        log "!! $name log has warnings/errors (first 10 shown):"
        grep -E ' (WARN|ERROR) |panicked' "$SDIR/$name.log" | head -10 | sed 's/^/     /'
    fi
    return 0
}

# px_check NAME: one line with check --json's figures; warns unless clean.
px_check() {
    local name=$1
    px "$1" check --json >"$SDIR/check.json" 2>&1 || true
    python3 - "$SDIR/check.json" "$name" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
try:
    c = json.loads(t[t.index("{"):])
except Exception:
    print(f"!! check of {sys.argv[2]} failed: {t.strip()[:300]}")
    sys.exit(0)
mark = "" if c.get("clean") and not c.get("leaked_blocks") else "!! "
print(f"   {mark}check {sys.argv[2]}: clean={c.get('clean')} disks={c.get('disks')} snapshots={c.get('snapshots')} "
      f"data_blocks={c.get('data_blocks')} metadata_blocks={c.get('metadata_blocks')} "
      f"tree_nodes={c.get('tree_nodes')} leaked_blocks={c.get('leaked_blocks')}"
      + (f" errors={c.get('errors')[:3]}" if c.get("errors") else ""))
PY
}

# px_df NAME: "N disks, used X MiB of Y GiB"
px_df() {
    px "$1" df --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("%d disks, used %.0f MiB of %.0f GiB" % (len(d["disks"]), d["used_bytes"] / 2**20, d["capacity_bytes"] / 2**30))'
}

# qnbd_start NAME FORMAT FILE [qemu-nbd options]: qemu-nbd on SDIR/NAME.sock,
# export name "bench", persistent (-t), 8 clients (-e 8).
qnbd_start() {
    local name=$1 fmt=$2 file=$3
    shift 3
    rm -f "$SDIR/$name.pid"
    qemu-nbd -f "$fmt" -k "$SDIR/$name.sock" -x bench -t -e 8 "$@" \
        --fork --pid-file="$SDIR/$name.pid" "$file" >>"$SDIR/$name.log" 2>&1 </dev/null ||
        { cat "$SDIR/$name.log" >&2; die "qemu-nbd $name did not start"; }
    PIDOF[$name]=$(cat "$SDIR/$name.pid")
    track "${PIDOF[$name]}" "$name"
    URI[$name]="nbd+unix:///bench?socket=$SDIR/$name.sock"
}

# nbdkit_mem_start NAME SIZE: nbdkit's memory plugin on SDIR/NAME.sock.
# The five NBD servers of scenarios a and b, each serving a fresh $SIZE
# target named "bench": parallax (--direct), px-cached, qemu-raw
# (--cache=none --aio=io_uring), qemu-raw-default and qemu-qcow2.
# shellcheck disable=SC2153 # SIZE comes from bench/run.sh
start_nbd_servers() {
    TSIZE=$SIZE
    px_start parallax --direct
    px parallax create bench --size "$SIZE"
    URI[parallax]=$(px_uri parallax bench)
    px_start px-cached
    px px-cached create bench --size "$SIZE"
    URI[px-cached]=$(px_uri px-cached bench)
    qemu-img create -q -f raw "$SDIR/raw.img" "$SIZE"
    qemu-img create -q -f raw "$SDIR/raw-default.img" "$SIZE"
    qemu-img create -q -f qcow2 "$SDIR/q.qcow2" "$SIZE"
    qnbd_start qemu-raw raw "$SDIR/raw.img" --cache=none --aio=io_uring
    qnbd_start qemu-raw-default raw "$SDIR/raw-default.img"
    qnbd_start qemu-qcow2 qcow2 "$SDIR/q.qcow2" --cache=none --aio=io_uring
}

nbdkit_mem_start() {
    local name=$1 size=$2 i
    nbdkit --unix "$SDIR/$name.sock" -P "$SDIR/$name.pid" memory "$size" \
        >"$SDIR/$name.log" 2>&1 </dev/null || { cat "$SDIR/$name.log" >&2; die "nbdkit did not start"; }
    for ((i = 0; i < 100; i++)); do [ -s "$SDIR/$name.pid" ] && break; sleep 0.05; done
    PIDOF[$name]=$(cat "$SDIR/$name.pid")
    track "${PIDOF[$name]}" "$name"
    URI[$name]="nbd+unix:///bench?socket=$SDIR/$name.sock"
}

# --- fio -----------------------------------------------------------------------

# fio_run TARGET OUT.json FIO_ARGS...: one fio job on the target, --size=$TSIZE.
# NBD targets use --ioengine=nbd; "file:" targets io_uring with O_DIRECT.
fio_run() {
    local target=$1 out=$2
    shift 2
    local u=${URI[$target]:?no URI for target $target}
    local eng
    if [[ "$u" == file:* ]]; then
        eng=(--ioengine=io_uring --direct=1 --filename="${u#file:}")
    else
        eng=(--ioengine=nbd --uri="$u")
    fi
    if ! (cd "$SDIR" && fio --name=b "${eng[@]}" --size="$TSIZE" --output-format=json "$@" \
        >"$out" 2>"$out.err"); then
        log "!! fio failed on $target: fio ${eng[*]} --size=$TSIZE $*"
        sed 's/^/     /' "$out.err" >&2
        return 1
    fi
}

# fio_parse OUT.json -> "IOPS MiB/s MEAN_LAT_us P99_us" (reads + writes; the
# latency is the mean total latency over both directions, p99 the worse one).
# fio's nbd engine prints "fio: connected to NBD server" before the JSON.
fio_parse() {
    python3 - "$1" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
rd, wr = j["read"], j["write"]
iops = rd["iops"] + wr["iops"]
bw = (rd["bw_bytes"] + wr["bw_bytes"]) / 2**20
n = rd["total_ios"] + wr["total_ios"]
lat = (rd["lat_ns"]["mean"] * rd["total_ios"] + wr["lat_ns"]["mean"] * wr["total_ios"]) / max(n, 1) / 1000
p99 = max(d["clat_ns"].get("percentile", {}).get("99.000000", 0) for d in (rd, wr)) / 1000
print(f"{iops:.1f} {bw:.2f} {lat:.1f} {p99:.1f}")
PY
}

# record ROW TARGET ROUND IOPS MIBS LAT P99 -> SDIR/results.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$SDIR/results.tsv"; }

# measure_once ROW ROUND "TARGETS" FIO_ARGS...: one fio run per target, in the
# order given (the alternation), each recorded and printed.
measure_once() {
    local row=$1 round=$2 targets=$3 t vals iops mibs lat p99
    shift 3
    for t in $targets; do
        fio_run "$t" "$SDIR/fio.json" "$@"
        vals=$(fio_parse "$SDIR/fio.json")
        # shellcheck disable=SC2086 # four numbers
        record "$row" "$t" "$round" $vals
        read -r iops mibs lat p99 <<<"$vals"
        printf '   r%s %-20s %-16s %9.0f IOPS %8.1f MiB/s  lat %8.0f µs  p99 %8.0f µs\n' \
            "$round" "$row" "$t" "$iops" "$mibs" "$lat" "$p99"
    done
}

# measure ROW "TARGETS" FIO_ARGS...: ROUNDS x (every target in turn).
measure() {
    local row=$1 targets=$2 r
    shift 2
    for ((r = 1; r <= ROUNDS; r++)); do
        measure_once "$row" "$r" "$targets" "$@"
    done
}

# fill "TARGETS": every target written once, sequentially, 1 MiB at QD8, with
# non-compressible data refreshed for every write; recorded as row "fill".
# Then sync, so dirty page-cache data of one target does not slow the next.
fill() {
    log "== filling: 1 MiB sequential writes, QD8, ${TSIZE}, non-compressible (first write)"
    measure_once fill 1 "$1" --rw=write --bs=1M --iodepth=8 --buffer_compress_percentage=0 --refill_buffers
    sync
}

# --- tables --------------------------------------------------------------------

# print_table TITLE "TARGETS" "RATIOS" ROWSPEC...
#   RATIOS: space-separated LABEL=NUM/DEN, NUM and DEN targets or "ceiling"
#           (= min of disk and nbdkit-mem; for latencies the max).
#   ROWSPEC: ROW:METRIC[:LABEL], METRIC one of iops, mibs, lat (mean µs), p99 (µs).
# Aggregates the rounds per AGG: best (max IOPS/MiB/s, min µs) or median.
print_table() {
    python3 - "$SDIR/results.tsv" "${AGG:-best}" "$@" <<'PY'
import statistics, sys
path, agg, title, targets, ratios, *rows = sys.argv[1:]
targets = targets.split()
ratios = [r.split("=", 1) for r in ratios.split()]
data = {}
for line in open(path):
    row, t, rnd, *v = line.rstrip("\n").split("\t")
    for m, x in zip(("iops", "mibs", "lat", "p99"), v):
        data.setdefault((row, t, m), []).append(float(x))
unit = {"iops": "IOPS", "mibs": "MiB/s", "lat": "µs mean", "p99": "µs p99"}
lower = {"lat", "p99"}

def value(row, t, m):
    if t == "ceiling":
        vs = [value(row, c, m) for c in ("disk", "nbdkit-mem")]
        vs = [v for v in vs if v is not None]
        if not vs:
            return None
        return max(vs) if m in lower else min(vs)
    vs = data.get((row, t, m))
    if not vs:
        return None
    if agg == "median":
        return statistics.median(vs)
    return min(vs) if m in lower else max(vs)

def fmt(v, m):
    if v is None:
        return "-"
    return f"{v:.1f}" if m == "mibs" or (m != "iops" and v < 100) else f"{v:.0f}"

specs = []
for spec in rows:
    row, m, *label = spec.split(":", 2)
    specs.append((row, m, (label[0] if label else row) + f" ({unit[m]})"))
lw = max(len(s[2]) for s in specs) + 1
cw = [max(len(t), 8) + 1 for t in targets]
rw = [max(len(r[0]), 6) + 1 for r in ratios]
print(f"--- {title} ({'best' if agg != 'median' else 'median'} of rounds)")
print(f"{'':<{lw}}" + "".join(f"{t:>{w}}" for t, w in zip(targets, cw)) + " |"
      + "".join(f"{r[0]:>{w}}" for r, w in zip(ratios, rw)))
for row, m, label in specs:
    line = f"{label:<{lw}}" + "".join(f"{fmt(value(row, t, m), m):>{w}}" for t, w in zip(targets, cw)) + " |"
    for (name, expr), w in zip(ratios, rw):
        num, den = expr.split("/")
        a, b = value(row, num, m), value(row, den, m)
        line += f"{(f'{a / b:.2f}x' if a is not None and b else '-'):>{w}}"
    print(line)
if ratios:
    import textwrap
    text = ("ratios: " + "; ".join(f"{n} = {e.replace('/', ' / ')}" for n, e in ratios)
            + ". IOPS and MiB/s: above 1 = the first is faster; µs: below 1 = the first is faster.")
    print(textwrap.fill(text, 110, initial_indent="  ", subsequent_indent="  "))
PY
}

# pctl_report LABEL FILE: median, p90, p99, max of the numbers (seconds) in
# FILE, in ms, plus the medians of the first and last 100 (flatness).
pctl_report() {
    python3 - "$1" "$2" <<'PY'
import statistics, sys
label, path = sys.argv[1], sys.argv[2]
xs = [float(l.split()[-1]) * 1000 for l in open(path) if l.strip()]
if not xs:
    print(f"{label:<44} (no data)"); sys.exit(0)
s = sorted(xs)
def p(q): return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]
k = min(100, len(xs))
print(f"{label:<44} {len(xs):>5} {statistics.median(xs):>8.2f} {p(0.9):>8.2f} {p(0.99):>8.2f} {s[-1]:>8.2f}"
      f" {statistics.median(xs[:k]):>10.2f} {statistics.median(xs[-k:]):>10.2f}")
PY
}
pctl_header() {
    printf '%-44s %5s %8s %8s %8s %8s %10s %10s\n' "operation (ms)" n median p90 p99 max "first-100" "last-100"
}

# rss NAME -> "VmRSS_MiB VmHWM_MiB" of a daemon
rss() {
    awk '/^VmRSS:/ { r = $2 } /^VmHWM:/ { h = $2 } END { printf "%.1f %.1f\n", r / 1024, h / 1024 }' \
        "/proc/${PIDOF[$1]}/status"
}
