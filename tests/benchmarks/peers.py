"""tokenwire beside llama.cpp's llama-server, in one run, on the same GGUF file: output tok/s,
time to first token (p50, p99) and inter-token latency (p50) at each concurrency, each server
through its own streaming API, and the ratio tokenwire / llama-server for tok/s.

Build llama-server first (about 15 minutes on 2 cores: start it in the background); the script
prints the folder that holds the binary:

    ../shared/peers/build_llama_server.sh /tmp/llama-peer

Then:

    .venv/bin/python tests/benchmarks/peers.py --llama-server /tmp/llama-peer/.../build/bin/llama-server \\
        [--concurrency 1 8 32] [--rounds 1] [--prompt-tokens 128] [--output-tokens 128] \\
        [--requests-per-level N] [--tokenwire-protocol grpc|http] [--json out.json] [-- serve flags]

Workload: the default model (tokenwire_server.registry.DEFAULT_MODEL, pulled when not cached) for
both servers; prompts of exactly --prompt-tokens tokens through each server's own tokenizer, each
starting with a few random tokens (no prefix cache flatters either server); --output-tokens new
tokens, greedy (temperature 0), end tokens ignored. The load is `tokenwire bench`'s
(tokenwire.bench.run): over gRPC GenerateStream for tokenwire (its own API; --tokenwire-protocol
http measures its OpenAI-compatible HTTP API instead) and over streamed POST /v1/completions for
llama-server (`tokenwire bench --http`). N requests per level default to `tokenwire bench`'s:
max(4 x concurrency, 8).

llama-server runs as `llama-server -m MODEL.gguf -c 16384 -np 32 -t 2 --host 127.0.0.1 --port P`
(-np at least the largest concurrency, -c raised if a slot's share is too small for prompt and
output, -t the usable cores: 2 on the reference machine, as tokenwire's torch uses one thread per
core). tokenwire runs as `python -m tokenwire_server.main serve --model MODEL.gguf ...` with the
serve flags given after --.

Both servers start once and stay up for the whole run, and only one is driven at a time: for
each round, for each level, tokenwire then llama-server. An idle server costs nothing (each
measurement also reports the CPU the idle one used meanwhile, and warns if it is not ~0), and
starting once saves a model load per measurement. Before the rounds each server is warmed with
one unmeasured pass at the largest concurrency; each measurement starts with --warmup sequential
requests of its own. Figures are the medians over the rounds.

These machines are noisy: compare only figures taken in the same run. Each measurement reports
what the rest of the machine used meanwhile (other users' processes, hypervisor steal) and the
table is followed by a warning when that is not ~0. llama-server with -t 2 suffers most: its
threads meet at a barrier at every step, so when another process takes one of 2 cores each token
waits for a descheduled thread (seen here: 600-800 ms a token instead of 10, where -t 1 was
unaffected)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serving_bench import free_port

from tokenwire import Client
from tokenwire.bench import BenchError, HEAD_TOKENS, Report, report_dict, run
from tokenwire_server import registry

HERE = Path(__file__).resolve().parents[2]
LLAMA_CTX, LLAMA_SLOTS = 16384, 32
IDLE_WARN_CORES = 0.05  # an idle server using more than this while the other is measured: warn
OTHER_WARN_CORES = 0.25  # the rest of the machine using more than this during a measurement: warn
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the machine ----

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in seconds; nan when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return float("nan")


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent not idle since boot, time stolen by the hypervisor included."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


class CpuMeter:
    """Where the machine's CPU went during a measurement, in cores: the server measured, the idle
    one, this process (the load generator) and everything else (other users' work, steal)."""

    def __init__(self, measured: int, idle: int):
        self.pids = {"measured": measured, "idle": idle}
        self.start = self._snapshot()

    def _snapshot(self) -> dict:
        t = os.times()
        return {"wall": time.monotonic(), "machine": machine_busy_seconds(), "client": t.user + t.system,
                **{k: cpu_seconds(pid) for k, pid in self.pids.items()}}

    def cores(self) -> dict:
        end = self._snapshot()
        wall = max(end["wall"] - self.start["wall"], 1e-9)
        d = {k: (end[k] - self.start[k]) / wall for k in end if k != "wall"}
        d["other"] = max(0.0, d.pop("machine") - d["measured"] - d["idle"] - d["client"])
        return d


# ---- the servers ----

def _die_with_parent() -> None:
    """In the child: SIGTERM it when this script dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path):
        self.name, self.cmd, self.env = name, cmd, env
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            print(f"{self.name} did not exit on SIGTERM: killing it", file=sys.stderr)
            self.proc.kill()
            self.proc.wait(10)
        except KeyboardInterrupt:  # a second Ctrl-C: no more patience
            self.proc.kill()
            self.proc.wait(10)
            raise


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(servers: dict, checks: list, timeout: float) -> None:
    """Poll (server name, what, check) until every check passes; fail early when a server exits."""
    pending = list(checks)
    deadline = time.monotonic() + timeout
    while pending:
        for item in list(pending):
            name, what, check = item
            servers[name].check_alive()
            if check():
                print(f"{name}: {what} ready", file=sys.stderr)
                pending.remove(item)
        if not pending:
            return
        if time.monotonic() > deadline:
            names = dict.fromkeys(name for name, _, _ in pending)
            raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(f'{n} {w}' for n, w, _ in pending)}\n"
                               + "\n".join(f"--- {n} log:\n{servers[n].log_tail()}" for n in names))
        time.sleep(0.5)


def tokenwire_grpc_ready(address: str):
    def check() -> bool:
        try:
            with Client(address) as client:
                return client.health(timeout=1) == "SERVING"
        except Exception:
            return False
    return check


# ---- measuring ----

def measure(target: str, protocol: str, concurrency: int, requests: int | None, args, warmup: int,
            output_tokens: int | None = None) -> Report:
    return asyncio.run(run(target, protocol=protocol, concurrency=concurrency, requests=requests,
                           prompt_tokens=args.prompt_tokens, output_tokens=output_tokens or args.output_tokens,
                           warmup=warmup, temperature=0.0, progress=False, timeout=args.request_timeout))


def summary(r: Report) -> dict:
    return {"tok/s": r.output_tokens_per_s, "ttft p50": r.ttft_s.get("p50", float("nan")),
            "ttft p99": r.ttft_s.get("p99", float("nan")), "itl p50": r.itl_s.get("p50", float("nan"))}


def workload_problems(r: Report, prompt_tokens: int, output_tokens: int) -> list[str]:
    """What the server did other than what was asked: errors, short outputs (end tokens not
    ignored), prompts of another length."""
    problems = []
    if r.errors:
        problems.append(f"errors {r.errors}")
    if r.requests and r.output_tokens != r.requests * output_tokens:
        problems.append(f"{r.output_tokens} output tokens for {r.requests} requests of {output_tokens}")
    if r.requests and r.prompt_tokens and r.prompt_tokens != r.requests * prompt_tokens:
        problems.append(f"{r.prompt_tokens / r.requests:.1f} prompt tokens a request, not {prompt_tokens}")
    return problems


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def table(results: dict, levels: list[int], names: tuple[str, str]) -> str:
    tw, ll = names
    rows = ["| concurrency | llama-server tok/s | tokenwire tok/s | tokenwire / llama-server "
            "| llama-server TTFT p50 / p99 s | tokenwire TTFT p50 / p99 s "
            "| llama-server ITL p50 ms | tokenwire ITL p50 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in levels:
        if not results.get((tw, c)) or not results.get((ll, c)):
            continue
        t, l = median_of(results[tw, c]), median_of(results[ll, c])
        ratio = t["tok/s"] / l["tok/s"] if l["tok/s"] else float("nan")
        rows.append(f"| {c} | {l['tok/s']:.1f} | {t['tok/s']:.1f} | {ratio:.2f}x "
                    f"| {l['ttft p50']:.3f} / {l['ttft p99']:.3f} | {t['ttft p50']:.3f} / {t['ttft p99']:.3f} "
                    f"| {l['itl p50'] * 1e3:.1f} | {t['itl p50'] * 1e3:.1f} |")
    return "\n".join(rows)


# ---- main ----

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", required=True, type=Path, help="path of the llama-server binary")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=1, help="figures are the medians over the rounds")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--requests-per-level", type=int,
                    help="requests measured at each level (default: max(4 x concurrency, 8))")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each measurement")
    ap.add_argument("--tokenwire-protocol", choices=["grpc", "http"], default="grpc",
                    help="grpc: tokenwire's own API (default); http: its OpenAI-compatible /v1/completions")
    ap.add_argument("--model", help="a .gguf file for both servers (default: tokenwire's default model)")
    ap.add_argument("--llama-threads", type=int, default=usable_cpus(),
                    help="llama-server -t (default: the usable cores, as torch's threads in tokenwire)")
    ap.add_argument("--llama-flags", default="", help="more llama-server flags, one string")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds for one request")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--json", type=Path, help="also write every measurement and the medians here")
    ap.add_argument("flags", nargs="*", help="tokenwire serve flags (after --)")
    args = ap.parse_args()
    if not args.llama_server.is_file() or not os.access(args.llama_server, os.X_OK):
        ap.error(f"--llama-server {args.llama_server}: not an executable file")
    if min(args.concurrency) < 1 or args.rounds < 1:
        ap.error("--concurrency and --rounds must be positive")
    return args


def main() -> int:
    args = parse_args()
    gguf = Path(args.model).resolve() if args.model else registry.pull(registry.DEFAULT_MODEL)
    levels = list(dict.fromkeys(args.concurrency))
    log_dir = Path(tempfile.mkdtemp(prefix="tokenwire-peers-"))

    grpc_port, http_port, llama_port = free_port(), free_port(), free_port()
    tw_cmd = [sys.executable, "-m", "tokenwire_server.main", "serve", "--model", str(gguf), "--host", "127.0.0.1",
              "--port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "0", *args.flags]
    paths = [str(HERE / "server"), str(HERE / "client"), os.environ.get("PYTHONPATH")]  # (this checkout's code)
    tw_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    slots = max(LLAMA_SLOTS, max(levels))
    per_slot = args.prompt_tokens + args.output_tokens + 16
    ctx = max(LLAMA_CTX, -(-slots * per_slot // 256) * 256)  # each slot gets ctx / slots tokens
    llama_bin = args.llama_server.resolve()
    ll_cmd = [str(llama_bin), "-m", str(gguf), "-c", str(ctx), "-np", str(slots), "-t", str(args.llama_threads),
              "--host", "127.0.0.1", "--port", str(llama_port), *shlex.split(args.llama_flags)]
    libs = str(llama_bin.parent)  # (its shared libraries sit beside it)
    ll_env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [libs, os.environ.get("LD_LIBRARY_PATH")]))}
    llama_version = subprocess.run([str(llama_bin), "--version"], env=ll_env, capture_output=True, text=True,
                                   timeout=30)
    llama_version = next((line for line in (llama_version.stdout + llama_version.stderr).splitlines()
                          if line.startswith("version")), "version unknown")

    tw, ll = "tokenwire", "llama-server"
    servers = {tw: Server(tw, tw_cmd, tw_env, log_dir), ll: Server(ll, ll_cmd, ll_env, log_dir)}
    targets = {tw: ((f"127.0.0.1:{grpc_port}", "grpc") if args.tokenwire_protocol == "grpc"
                    else (f"http://127.0.0.1:{http_port}/v1", "http")),
               ll: (f"http://127.0.0.1:{llama_port}/v1", "http")}
    results = {(name, c): [] for name in servers for c in levels}
    records, notes, idle, other_load = [], [], {tw: [], ll: []}, {tw: [], ll: []}
    tw_dtype = "?"
    interrupted = failed = False  # failed: a server did not do what was asked (errors, short outputs)

    def on_sigterm(signum, frame):  # so that the servers are stopped as on Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (even when started with SIGINT ignored)

    try:
        for s in servers.values():
            s.start()
        print(f"starting both servers (logs in {log_dir})", file=sys.stderr)
        # tokenwire through gRPC health and its HTTP API's GET /health (both are up, whichever is measured)
        wait_ready(servers, [(tw, "gRPC health", tokenwire_grpc_ready(f"127.0.0.1:{grpc_port}")),
                             (tw, "HTTP /health", lambda: http_ok(f"http://127.0.0.1:{http_port}/health")),
                             (ll, "HTTP /health", lambda: http_ok(f"http://127.0.0.1:{llama_port}/health"))],
                   args.startup_timeout)
        with Client(f"127.0.0.1:{grpc_port}") as c:
            tw_dtype = c.info().dtype

        top = max(levels)
        for name in servers:  # one unmeasured pass at the largest batch: allocations, thread pools, caches
            target, protocol = targets[name]
            print(f"warming {name}: {top} requests at concurrency {top}", file=sys.stderr)
            measure(target, protocol, top, top, args, args.warmup, output_tokens=min(args.output_tokens, 16))

        for i in range(args.rounds):
            for c in levels:
                for name in (tw, ll):
                    target, protocol = targets[name]
                    other = servers[ll if name == tw else tw]
                    meter = CpuMeter(servers[name].proc.pid, other.proc.pid)
                    r = measure(target, protocol, c, args.requests_per_level, args, args.warmup)
                    cores = meter.cores()
                    idle[other.name].append(cores["idle"])
                    other_load[name].append(cores["other"])
                    m = summary(r)
                    results[name, c].append(m)
                    problems = workload_problems(r, args.prompt_tokens, args.output_tokens)
                    notes += [f"round {i + 1} {name} c={c}: {p}" for p in problems]
                    failed = failed or bool(problems)
                    records.append({"round": i + 1, "server": name, "concurrency": c,
                                    "cpu_cores": cores, "report": report_dict(r)})
                    print(f"round {i + 1} {name:<12} c={c:<3} {r.requests} requests in {r.duration_s:.1f}s: "
                          f"{m['tok/s']:.1f} tok/s, TTFT p50 {m['ttft p50']:.3f}s p99 {m['ttft p99']:.3f}s, "
                          f"ITL p50 {m['itl p50'] * 1e3:.1f}ms; cores: {name} {cores['measured']:.2f}, "
                          f"client {cores['client']:.2f}, idle {other.name} {cores['idle']:.3f}, "
                          f"rest of the machine {cores['other']:.2f}"
                          + (f"; {'; '.join(problems)}" if problems else ""), file=sys.stderr)
            for s in servers.values():
                s.check_alive()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping the servers", file=sys.stderr)
    except (BenchError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        for s in servers.values():
            if s.proc is not None and s.proc.poll() is not None:
                print(f"--- {s.name} log ({s.log}):\n{s.log_tail()}", file=sys.stderr)
        return 2
    finally:
        for s in servers.values():
            s.stop()

    rounds_done = max((len(v) for v in results.values()), default=0)
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} logical CPUs ({usable_cpus()} usable), {platform.platform()}")
    print(f"model: {gguf}")
    print(f"tokenwire ({args.tokenwire_protocol}, {tw_dtype}): {shlex.join(tw_cmd)}")
    print(f"llama-server ({llama_version}): {shlex.join(ll_cmd)}")
    print(f"workload: {args.prompt_tokens}-token prompts (the first {min(HEAD_TOKENS, args.prompt_tokens)} random), "
          f"{args.output_tokens} new tokens, greedy, ignore_eos; "
          f"{args.requests_per_level or 'max(4 x concurrency, 8)'} requests per level, {args.warmup} warmup; "
          f"tokenwire over {'gRPC GenerateStream' if args.tokenwire_protocol == 'grpc' else 'HTTP /v1/completions'}, "
          f"llama-server over HTTP /v1/completions, both streamed; medians of {rounds_done} round(s)"
          + (" (interrupted)" if interrupted else ""))
    print()
    print(table(results, levels, (tw, ll)))
    busy = {name: max(v) for name, v in idle.items() if v and max(v) > IDLE_WARN_CORES}
    for name, cores in busy.items():
        notes.append(f"{name} used up to {cores:.2f} cores while idle: the other server's figures may suffer")
    for name, loads in other_load.items():
        if loads and max(loads) > OTHER_WARN_CORES:
            notes.append(f"the rest of the machine used up to {max(loads):.2f} cores while {name} was measured "
                         f"(other users' work or steal): its figures are not this machine's; "
                         + ("llama-server with -t > 1 is hit hardest: compare with --llama-threads 1"
                            if name == ll else "rerun when the machine is quiet"))
    if notes:
        print("\nnotes:\n" + "\n".join(f"- {n}" for n in notes))

    if args.json:
        out = {"machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
                           "platform": platform.platform()},
               "model": str(gguf), "commands": {tw: tw_cmd, ll: ll_cmd}, "llama_server_version": llama_version,
               "tokenwire_dtype": tw_dtype,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "medians": {f"{name} c={c}": median_of(runs) for (name, c), runs in results.items() if runs},
               "measurements": records, "notes": notes, "interrupted": interrupted}
        args.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
