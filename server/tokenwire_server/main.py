"""The tokenwire-server command: pull models, generate locally, serve over gRPC."""

from __future__ import annotations

import argparse
import os
import sys

from . import logs, registry
from .errors import TokenwireError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=registry.DEFAULT_MODEL,
                   help="registry name, path to a .gguf file, or a Hugging Face model directory "
                        f"(default: {registry.DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on CUDA and on CPUs with native bfloat16, else float32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (auto: CUDA when present)")


def load_engine(args):
    from .engine import LLMEngine  # torch is imported only by commands that need it

    from .engine.llm_engine import EngineConfig

    return LLMEngine.from_checkpoint(registry.resolve(args.model), dtype=args.dtype, device=args.device,
                                     name=args.model if args.model in registry.REGISTRY else "",
                                     config=EngineConfig(kv_cache_tokens=16384))


def cmd_pull(args) -> None:
    registry.pull(args.name)


def cmd_generate(args) -> None:
    from .engine import SamplingParams

    engine = load_engine(args)
    tok = engine.tokenizer
    if args.chat:
        prompt = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = tok.encode(args.prompt)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, seed=args.seed, max_new_tokens=args.max_new_tokens)
    for out in engine.generate(prompt, params):
        sys.stdout.write(out.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[finish: {out.finish_reason.value}, seed: {out.seed}]", file=sys.stderr)


def cmd_serve(args) -> None:
    import asyncio

    from .limits import Limits
    from .security import load_api_keys, server_credentials
    from .server import serve

    from .engine.llm_engine import EngineConfig

    # Configuration mistakes fail here, before the model loads.
    credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    api_keys = load_api_keys(args.api_keys_file)
    model_path = registry.resolve(args.model)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    limits = Limits(max_new_tokens=args.max_new_tokens_limit, default_max_new_tokens=args.default_max_new_tokens)
    config = EngineConfig(kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
                          max_batched_tokens=args.max_batched_tokens, max_queued=args.max_queued_requests,
                          queue_timeout=args.queue_timeout, prefix_caching=not args.no_prefix_caching,
                          max_model_len=args.max_model_len, int4_max_rows=args.int4_max_rows,
                          single_thread_rows=args.single_thread_rows, batch_invariant=args.batch_invariant,
                          compile_max_rows=args.compile_max_rows)
    asyncio.run(serve(model_path, host=args.host, port=args.port, dtype=args.dtype,
                      device=args.device, name=args.model if args.model in registry.REGISTRY else "",
                      limits=limits, engine_config=config, drain_timeout=args.drain_timeout,
                      metrics_port=args.metrics_port or None, health_port=args.health_port,
                      http_port=args.http_port or None,
                      http_tls=(args.tls_cert, args.tls_key, args.tls_client_ca) if credentials else None,
                      credentials=credentials, api_keys=api_keys, log_prompts=args.log_prompts))


ENV_PREFIX = "TOKENWIRE_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def env_defaults(parser: argparse.ArgumentParser, environ=os.environ) -> None:
    """Let TOKENWIRE_<FLAG> set each long flag's default (a flag on the command line wins), and
    name the variable in --help. Bad values fail at start-up, naming the variable."""
    for action in parser._actions:  # argparse has no public iterator over its actions
        if not any(o.startswith("--") for o in action.option_strings) or action.dest == "help":
            continue
        name = env_name(action.dest)
        action.help = f"{action.help + ' ' if action.help else ''}[env {name}]"
        if name not in environ:
            continue
        raw = environ[name]
        if raw.startswith(("tcp://", "udp://")):
            # Kubernetes service links: a Service named tokenwire sets TOKENWIRE_PORT=tcp://...
            print(f"tokenwire-server: ignoring {name}={raw} (a Kubernetes service link, not a setting)",
                  file=sys.stderr)
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if raw.strip().lower() not in _TRUE | _FALSE:
                parser.error(f"{name}={raw!r}: expected true or false")
            action.default = raw.strip().lower() in _TRUE
            continue
        try:
            value = action.type(raw) if action.type else raw
        except ValueError:
            parser.error(f"{name}={raw!r}: not a valid value for {action.option_strings[-1]}")
        if action.choices and value not in action.choices:
            parser.error(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        action.default = value


def build_parser(environ=os.environ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire-server", description=__doc__)
    parser.add_argument("--log-level", default=environ.get(env_name("log_level"), "INFO"),
                        help=f"[env {env_name('log_level')}]")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a registry model into the model cache ($TOKENWIRE_HOME)")
    p.add_argument("name", choices=sorted(registry.REGISTRY))
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("serve", help="serve a model over gRPC",
                       description="Serve a model over gRPC. Every flag can also be set by the environment "
                                   "variable named after it, e.g. --max-num-seqs as TOKENWIRE_MAX_NUM_SEQS "
                                   "(the flag wins). API keys may also come from TOKENWIRE_API_KEYS "
                                   "(comma-separated).")
    add_model_args(p)
    net = p.add_argument_group("network")
    net.add_argument("--host", default="0.0.0.0")
    net.add_argument("--port", type=int, default=50051, help="gRPC port")
    net.add_argument("--health-port", type=int,
                     help="also serve gRPC health alone, in plaintext, on this port (for Kubernetes probes, "
                          "which cannot speak TLS)")
    net.add_argument("--http-port", type=int, default=8000,
                     help="OpenAI-compatible HTTP API port, same engine, TLS and API keys (0: off)")
    net.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0: off)")
    net.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM/SIGINT, seconds in-flight requests get to finish before the exit")
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    sec.add_argument("--tls-key", help="PEM private key for --tls-cert")
    sec.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    sec.add_argument("--api-keys-file", help="file of API keys, one per line: requests must send "
                                             "'authorization: Bearer <key>' (health stays open)")
    logs = p.add_argument_group("logging")
    logs.add_argument("--log-format", default="text", choices=["text", "json"])
    logs.add_argument("--log-prompts", action="store_true", help="include prompt text in request logs")
    eng = p.add_argument_group("engine and limits")
    eng.add_argument("--max-model-len", type=int, help="cap the context below the model's (tokens)")
    eng.add_argument("--max-new-tokens-limit", type=int, default=4096, help="largest max_new_tokens a request may ask")
    eng.add_argument("--default-max-new-tokens", type=int, default=256, help="max_new_tokens when a request sets none")
    eng.add_argument("--kv-cache-tokens", type=int, default=65536,
                     help="KV cache capacity in tokens, allocated at start (memory: tokens x 2 x layers x kv heads "
                          "x head dim x dtype size)")
    eng.add_argument("--max-num-seqs", type=int, default=64, help="sequences running in one batch")
    eng.add_argument("--max-batched-tokens", type=int, default=256,
                     help="tokens computed per step; long prompts are prefilled in chunks under it")
    eng.add_argument("--max-queued-requests", type=int, default=256,
                     help="waiting requests; beyond it new ones fail at once with RESOURCE_EXHAUSTED")
    eng.add_argument("--queue-timeout", type=float, help="seconds a request may wait before it fails")
    eng.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    eng.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    eng.add_argument("--batch-invariant", action="store_true",
                     help="a request's tokens and logprobs do not depend on what else is in the batch "
                          "(slower; see the README)")
    eng.add_argument("--single-thread-rows", type=int, default=4,
                     help="steps of at most this many tokens run on one CPU thread (small operations lose "
                          "more to thread synchronisation than they gain; 0: always --threads)")
    eng.add_argument("--int4-max-rows", type=int, default=8,
                     help="steps of at most this many tokens multiply with the checkpoint's 4-bit weights as "
                          "stored (Q4_0/Q4_1 GGUF layers, CPU, bfloat16 or float16); larger steps use the "
                          "dequantized weights (0: always)")
    eng.add_argument("--compile-max-rows", type=int, default=64,
                     help="decode steps of at most this many sequences run a forward compiled by torch.compile "
                          "at start-up (readiness waits for it; eager where no C++ compiler is found; 0: off)")
    env_defaults(p, environ)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate from a prompt in this process (no server)")
    p.add_argument("prompt")
    add_model_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, getattr(args, "log_format", "text"))  # --log-format is a serve flag
    try:
        args.func(args)
    except TokenwireError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
