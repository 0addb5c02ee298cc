#!/usr/bin/env python3
"""Serving through nginx against bench/engine, the same work.

bench/serve's output rate mixes decode steps with the prefill of every
arriving prompt, while bench/engine's decode figure has no prefill in it.
This compares like with like: the time bench/engine needs for the serve
run's work, measured in the same device run,

    engine_s = output_tokens / concurrency * ms_step(batch = concurrency)
               + input_tokens / prefill_tok_s(prompt = input_len)

(decode steps at full batch, prefill at the engine's rate for one prompt
of the serve run's length, or the nearest length measured), against the
serve run's duration; and the serve run's median inter-token latency
against the engine's decode step.

    tools/serve_vs_engine.py BENCH_ENGINE_LOG BENCH_SERVE_JSON
Prints the figures and a RESULT line; exit 2 when a figure is missing.
"""
import json
import re
import sys


def results(path):
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("RESULT "):
                out.append(dict(re.findall(r"(\w+)=(\S+)", line)))
    return out


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[-2].strip(), file=sys.stderr)
        return 2
    res = results(sys.argv[1])
    with open(sys.argv[2], encoding="utf-8") as f:
        sj = json.load(f)
    conc = int(sj["max_concurrency"])
    dec = [r for r in res if r.get("kind") == "decode"
           and int(r.get("batch", 0)) == conc]
    pre = [r for r in res if r.get("kind") == "prefill"]
    if not dec or not pre:
        print("serve_vs_engine: no decode batch %d or no prefill RESULT in %s"
              % (conc, sys.argv[1]), file=sys.stderr)
        return 2
    ilen = int(sj["random_input_len"])
    p = min(pre, key=lambda r: abs(int(r["prompt"]) - ilen))
    ms_step = float(dec[0]["ms_step"])
    pre_rate = float(p["tok_s"])
    n_out = int(sj["total_output_tokens"])
    n_in = int(sj["total_input_tokens"])
    dec_s = n_out / conc * ms_step / 1000.0
    pre_s = n_in / pre_rate
    eng_s = dec_s + pre_s
    dur = float(sj["duration"])
    ratio = eng_s / dur
    itl = float(sj["median_itl_ms"])
    print("serve: %d requests, %d in / %d out tokens, concurrency %d: %.2f s, "
          "%.1f output tok/s" % (sj["completed"], n_in, n_out, conc, dur,
                                 n_out / dur))
    print("engine, same work: %d decode steps x %.2f ms (batch %d) = %.2f s "
          "+ %d prompt tokens at %.0f tok/s (prompt %s) = %.2f s -> %.2f s, "
          "%.1f output tok/s" % (n_out // conc, ms_step, conc, dec_s, n_in,
                                 pre_rate, p["prompt"], pre_s, eng_s,
                                 n_out / eng_s))
    print("serve at %.1f %% of the engine on the same work; median "
          "inter-token latency %.2f ms vs the engine's step %.2f ms (%.1f %%)"
          % (100 * ratio, itl, ms_step, 100 * ms_step / itl))
    print("RESULT kind=serve_vs_engine serve_s=%.3f engine_s=%.3f "
          "of_engine=%.4f itl_ms=%.3f step_ms=%.3f" % (dur, eng_s, ratio, itl,
                                                     ms_step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
