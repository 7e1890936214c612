#!/bin/bash
# usage: g2.sh JOURNAL(0|1): g protocol on an 8G store whose file was written whole first (a 7.5G ballast disk filled and deleted)
P=/work/main/target/release/parallax
D=/tmp/jp/run2; rm -rf $D; mkdir -p $D
$P --store $D/s.px init --size 8G >/dev/null
J=""; [ "$1" = 1 ] && J="--journal"
$P --store $D/s.px serve --direct $J --nbd-listen none --nbd-socket $D/s.sock > $D/log 2>&1 &
DP=$!
for i in $(seq 50); do [ -S $D/s.sock ] && break; sleep 0.1; done
$P --store $D/s.px create ballast --size 7800M >/dev/null
fio --name=b --ioengine=nbd --uri="nbd+unix:///ballast?socket=$D/s.sock" --size=7800M --rw=write --bs=1M --iodepth=8 --output-format=terse >/dev/null 2>&1
$P --store $D/s.px delete ballast >/dev/null
$P --store $D/s.px create d --size 1G >/dev/null
fio --name=fill --ioengine=nbd --uri="nbd+unix:///d?socket=$D/s.sock" --size=1G --rw=write --bs=1M --iodepth=8 --output-format=terse >/dev/null 2>&1
run() { fio --name=w --ioengine=nbd --uri="nbd+unix:///d?socket=$D/s.sock" --size=1G --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=6 --output-format=json 2>/dev/null | python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["write"]["iops"]))'; }
out=""
for r in 1 2 3; do
  a=$(run)
  $P --store $D/s.px schedule d --every 10ms --keep-last 100 >/dev/null
  b=$(run)
  $P --store $D/s.px schedule d --off >/dev/null
  out="$out $(python3 -c "print(f'{$b/$a:.2f}')")($a/$b)"
done
echo "prewritten journal=$1: sched/none per round:$out"
kill $DP; wait $DP 2>/dev/null
rm -rf $D
