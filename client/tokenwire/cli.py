"""The `tokenwire` command: talk to a tokenwire server from a terminal.

    tokenwire generate "Once upon a time" --max-new-tokens 40
    tokenwire generate --chat "What is the capital of France?"
    tokenwire tokenize "Hello world" --tokens
    tokenwire score "The cat sat on the mat." ; tokenwire score " Paris" --context "The capital of France is"
    tokenwire info ; tokenwire health
    tokenwire bench --concurrency 32 --prompt-tokens 128 --output-tokens 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .client import Client
from .errors import TokenwireError


def _json(obj) -> None:
    print(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else
                     [dataclasses.asdict(o) for o in obj], indent=2, ensure_ascii=False))


def _file_or_text(value: str | None) -> str | None:
    """A path to read, or the text itself (a JSON Schema given inline)."""
    if value is None or value.lstrip().startswith("{"):
        return value
    with open(value, encoding="utf-8") as f:
        return f.read()


def cmd_generate(client: Client, args) -> int:
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                  seed=args.seed, max_new_tokens=args.max_new_tokens, stop=args.stop, logprobs=args.json,
                  json_schema=_file_or_text(args.json_schema), json_object=args.json_object, regex=args.regex,
                  choice=args.choice, grammar=_file_or_text(args.grammar))
    if args.chat:
        kwargs["messages"] = ([{"role": "system", "content": args.system}] if args.system else []) + \
                             [{"role": "user", "content": args.prompt}]
        prompt = None
    else:
        prompt = args.prompt
    stream = client.generate_stream(prompt, **kwargs)
    if args.json:
        _json(stream.result())
        return 0
    for delta in stream.deltas():
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    final, info = stream.final, stream.input
    print(f"[{final.finish_reason}: {final.usage.completion_tokens} tokens in {final.usage.total_seconds:.2f}s, "
          f"first after {final.usage.first_token_seconds:.2f}s, seed {info.seed}]", file=sys.stderr)
    return 0


def cmd_tokenize(client: Client, args) -> int:
    results = client.tokenize(args.texts, encoding=args.encoding, return_tokens=args.tokens,
                              add_special_tokens=args.add_special_tokens, allow_special=args.allow_special)
    if args.json:
        _json(results)
        return 0
    for r in results:
        print(f"{r.token_count} tokens: {r.ids}")
        for t in r.tokens:
            print(f"  {t.text!r:<20} bytes {t.byte_start}-{t.byte_end}  chars {t.char_start}-{t.char_end}")
    return 0


def cmd_score(client: Client, args) -> int:
    items = [(args.context, t) for t in args.texts] if args.context is not None else args.texts
    results = client.score(items, ranks=True)
    if args.json:
        _json(results)
        return 0
    for r in results:
        print(f"logprob {r.logprob_sum:.4f} over {r.token_count} tokens, perplexity {r.perplexity:.3f}, "
              f"greedy {'yes' if r.is_greedy else 'no'}")
        for t in r.tokens:
            print(f"  {t.text!r:<20} {t.logprob:9.4f}  rank {t.rank}")
    return 0


def cmd_info(client: Client, args) -> int:
    info = client.info()
    if args.json:
        _json(info)
        return 0
    for f in dataclasses.fields(info):
        print(f"{f.name:<18} {getattr(info, f.name)}")
    return 0


def cmd_health(client: Client, args) -> int:
    status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_bench(client: Client, args) -> int:
    import asyncio

    from .bench import BenchError, format_report, report_dict, run

    if args.model is not None and args.http is None:
        print("error: --model goes with --http (over gRPC the server's own model answers)", file=sys.stderr)
        return 2
    options = dict(concurrency=args.concurrency, rate=args.rate, prompt_tokens=args.prompt_tokens,
                   output_tokens=args.output_tokens, requests=args.requests, duration=args.duration,
                   warmup=args.warmup, temperature=args.temperature, prompts_file=args.prompts_file,
                   progress=not args.json, client_options=args.client_options)
    if args.timeout is not None:  # (else run's default: a generous bound per request)
        options["timeout"] = args.timeout
    try:
        if args.http is not None:
            report = asyncio.run(run(args.http, protocol="http", model=args.model, **options))
        else:
            report = asyncio.run(run(args.server, **options))
    except BenchError as e:  # unreachable, no model, no prompts, a failed warmup: nothing measured
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report_dict(report), indent=2) if args.json else format_report(report))
    return 1 if report.errors else 0


def _add_global_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """How to reach the server and how to print. The top parser holds the defaults; each
    subcommand takes the same options with no defaults (SUPPRESS), so that they work after the
    subcommand too without overwriting a value given before it."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--server", default=default(os.environ.get("TOKENWIRE_SERVER", "localhost:50051")),
                        help="host:port of the server, several host:port separated by commas (balanced, "
                             "retried on the next when one is unavailable), or a grpc target such as "
                             "dns:///name:port (env TOKENWIRE_SERVER; default localhost:50051)")
    parser.add_argument("--timeout", type=float, default=default(None), help="seconds before the call is abandoned")
    parser.add_argument("--tls-ca", default=default(None),
                        help="PEM file of the CA that signed the server's certificate (turns TLS on)")
    parser.add_argument("--tls-cert", default=default(None),
                        help="PEM client certificate chain, for servers that require mutual TLS")
    parser.add_argument("--tls-key", default=default(None), help="PEM private key of --tls-cert")
    parser.add_argument("--api-key", default=default(os.environ.get("TOKENWIRE_API_KEY")),
                        help="sent as 'authorization: Bearer <key>' (env TOKENWIRE_API_KEY)")
    parser.add_argument("--json", action="store_true", default=default(False), help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_global_options(parser)
    after = argparse.ArgumentParser(add_help=False)  # the same options, after the subcommand
    _add_global_options(after, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", parents=[after], help="stream a generation to the terminal")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    p.add_argument("--system", help="a system message, with --chat")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 is greedy (server default 1.0)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    p.add_argument("--json-schema", metavar="FILE|JSON", help="the output is JSON valid under this schema")
    p.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    p.add_argument("--regex", help="the whole output matches this regular expression")
    p.add_argument("--choice", action="append", help="the output is exactly one of these (repeatable)")
    p.add_argument("--grammar", metavar="FILE", help="the output follows this Lark grammar (llguidance syntax)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tokenize", parents=[after], help="token ids (and with --tokens, token texts and offsets)")
    p.add_argument("texts", nargs="+")
    p.add_argument("--encoding", help="count with a named encoding (cl100k_base) instead of the model's")
    p.add_argument("--tokens", action="store_true")
    p.add_argument("--add-special-tokens", action="store_true")
    p.add_argument("--allow-special", action="store_true")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("score", parents=[after], help="log-probabilities of texts, or of continuations given --context")
    p.add_argument("texts", nargs="+")
    p.add_argument("--context")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("info", parents=[after], help="the model served and the server's limits")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", parents=[after], help="load-test the server: latency percentiles and throughput")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (closed loop)")
    p.add_argument("--rate", type=float, help="requests per second, Poisson arrivals (open loop)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--prompts-file", help="text prompts, one per line (instead of --prompt-tokens)")
    p.add_argument("--requests", type=int, help="requests to measure (default: 4 x concurrency)")
    p.add_argument("--duration", type=float, help="seconds to measure instead of a request count")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and not measured")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--http", metavar="URL",
                   help="bench an OpenAI-compatible HTTP server instead of --server (tokenwire's HTTP API, "
                        "llama-server, vLLM): its API base, such as http://localhost:8000/v1; --api-key is "
                        "sent as 'Authorization: Bearer'")
    p.add_argument("--model", help="with --http: the model to ask for (default: the first GET /v1/models lists)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("health", parents=[after], help="SERVING or NOT_SERVING (exit code 0 only when serving)")
    p.add_argument("--service", default="")
    p.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tls = {name: open(path, "rb").read() if path else None for name, path in
               [("root_certificates", args.tls_ca), ("certificate_chain", args.tls_cert),
                ("private_key", args.tls_key)]}
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    # How to connect: the same for this client and the bench's own AsyncClient.
    args.client_options = dict(api_key=args.api_key, tls=bool(args.tls_cert), **tls)
    try:
        client = Client(args.server, timeout=args.timeout, **args.client_options)
    except (ValueError, OSError) as e:  # a malformed --server, or no listed host resolves
        print(f"error: --server: {e}", file=sys.stderr)
        return 2
    try:
        with client:
            return args.func(client, args)
    except TokenwireError as e:
        print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
        for field, description in e.field_violations:
            print(f"  {field}: {description}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
