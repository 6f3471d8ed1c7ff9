#!/bin/sh
# A/B wrapper for the peers harness: use as FVD_BIN so that consecutive timed `fvd serve` runs
# alternate between two builds inside one harness invocation (the disk drifts between
# invocations). Which build served each timed run is appended to $AB_LOG, in run order.
#
#   AB_A=/tmp/fvd-old AB_B=/tmp/fvd-new AB_LOG=/tmp/ab.log FVD_BIN=benches/tools/ab-serve.sh \
#     cargo bench --bench peers -- --reps 16 --storage disk --only alloc-4k-flush32 --targets fvd --no-probes
#
# Every other command (create, info, the counting run with --log-level) uses $AB_B. Give one
# workload (--only W) and one target per invocation: the harness runs workloads and targets in
# turn within a repetition, so with several the alternation can line up with them.
: "${AB_A:?path of build A}" "${AB_B:?path of build B}" "${AB_LOG:?log file}"
if [ "$1" = serve ] && [ "$2" != --help ]; then
  case " $* " in
    *" --log-level "*) ;;
    *)
      n=$( (cat "$AB_LOG" 2>/dev/null || true) | wc -l)
      if [ $((n % 2)) = 0 ]; then bin=$AB_A; else bin=$AB_B; fi
      echo "$bin" >> "$AB_LOG"
      exec "$bin" "$@"
      ;;
  esac
fi
exec "$AB_B" "$@"
