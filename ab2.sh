#!/bin/bash
run() { timeout 15 taskset -c 1 h2load -D 4 -c 8 -m 16 -H "content-type: application/grpc" http://127.0.0.1:$1/x 2>&1 | awk '/^finished in/ {print $4}'; }
for r in 1 2 3 4 5; do
  a=$(run 19902); b=$(run 19903); c=$(run 19912); d=$(run 19913)
  python3 -c "print('round $r: counters rej/floor %.3f (%s/%s)  no-rejected-counter rej/floor %.3f (%s/%s)' % ($a/$b, '$a','$b', $c/$d, '$c','$d'))"
done
