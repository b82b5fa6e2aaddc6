"""Client and AsyncClient: the tokenwire service from Python, with plain results.

    from tokenwire import Client
    with Client("localhost:50051") as client:
        print(client.generate("Once upon a time", max_new_tokens=20).text)

Several replicas: Client("10.0.0.1:50051,10.0.0.2:50051"), Client(["host1:50051", "host2:50051"]) or
Client("dns:///tokenwire.svc:50051") (every address of the name). Calls are balanced round robin over
one channel; a call a replica answers with UNAVAILABLE is retried on the next (see _channel.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import _convert as convert
from ._channel import channel_options
from .errors import TokenwireError
from .types import Delta, Final, Generation, InputInfo, ModelInfo, Scored, Tokenized
from .v1 import tokenwire_pb2 as pb
from .v1 import tokenwire_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"


def _credentials(root_certificates: bytes | None, private_key: bytes | None,
                 certificate_chain: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The server checks 'authorization: Bearer <key>' on every call but health."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _tokenize_request(texts, add_special_tokens, allow_special, truncate_input_tokens, encoding, return_tokens):
    return pb.TokenizeRequest(texts=[texts] if isinstance(texts, str) else list(texts),
                              add_special_tokens=add_special_tokens, allow_special=allow_special,
                              truncate_input_tokens=truncate_input_tokens, encoding=encoding or "",
                              return_tokens=return_tokens)


class GenerateStream:
    """A generation's events as they arrive, as AsyncClient.generate_stream yields them:
    InputInfo, then Deltas, then Final (one per sample). `input` and `final` fill in on the way;
    deltas() gives only the Deltas. Stopping early (break, close(), garbage collection, leaving
    a `with` block) cancels the call, which stops the server's work."""

    def __init__(self, call):
        self._call = call
        self.input: InputInfo | None = None
        self.final: Final | None = None
        self._collector = convert.Collector()

    def __iter__(self) -> Iterator[InputInfo | Delta | Final]:
        try:
            for msg in self._call:
                item = convert.event(msg)
                self._collector.add(item)
                if isinstance(item, InputInfo):
                    self.input = item
                elif isinstance(item, Final):
                    self.final = item
                yield item
        except grpc.RpcError as e:
            raise TokenwireError.from_rpc_error(e) from None
        finally:
            self._call.cancel()  # no-op when the stream is complete; stops the server's work otherwise

    def deltas(self) -> Iterator[Delta]:
        """Only the Deltas (what iterating the stream gave before it gave every event)."""
        for item in self:
            if isinstance(item, Delta):
                yield item

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def result(self) -> Generation:
        """The whole generation (consumes what is left of the stream)."""
        for _ in self:
            pass
        return self._collector.result()

    def results(self) -> list[Generation]:
        """Every sample's generation, by index (n > 1)."""
        for _ in self:
            pass
        return self._collector.results()


class Client:
    """Calls to one tokenwire server or to several replicas.

    target: "host:port", any grpc target ("dns:///name:port" balances over every address of the
    name), or several host:port addresses, as a list or comma-separated; hostnames in a list are
    resolved once, here. api_key: sent as 'authorization: Bearer <key>' on every call; TLS:
    root_certificates (the server's CA), plus private_key and certificate_chain for mutual TLS.
    Tokenize, Detokenize, Score and ModelInfo, and Generate before its first
    message, are retried on UNAVAILABLE (up to 5 attempts, within the timeout); retries=False
    turns that off. Raises ValueError for a malformed address, OSError when no listed host resolves.
    """

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float | None = None,
                 tls: bool = False, root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, retries: bool = True, api_key: str | None = None):
        self.target, options = channel_options(target, retries=retries)
        self._metadata = _auth_metadata(api_key)
        if tls or root_certificates:
            self._channel = grpc.secure_channel(
                self.target, _credentials(root_certificates, private_key, certificate_chain), options)
        else:
            self._channel = grpc.insecure_channel(self.target, options)
        self._stub = pb_grpc.TokenwireStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise TokenwireError.from_rpc_error(e) from None

    def tokenize(self, texts: str | list[str], *, add_special_tokens: bool = False, allow_special: bool = False,
                 truncate_input_tokens: int | None = None, encoding: str | None = None,
                 return_tokens: bool = False, timeout: float | None = None) -> list[Tokenized]:
        req = _tokenize_request(texts, add_special_tokens, allow_special, truncate_input_tokens, encoding,
                                return_tokens)
        return [convert.tokenized(r) for r in self._call(self._stub.Tokenize, req, timeout).results]

    def detokenize(self, ids: list[int], *, skip_special_tokens: bool = False, timeout: float | None = None) -> str:
        req = pb.DetokenizeRequest(ids=ids, skip_special_tokens=skip_special_tokens)
        return self._call(self._stub.Detokenize, req, timeout).text

    def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> GenerateStream:
        """Start a generation; iterate the result for Deltas. See generate() for the arguments."""
        req = convert.generate_request(prompt, **kwargs)
        return GenerateStream(self._stub.Generate(req, timeout=timeout if timeout is not None else self.timeout,
                                                  metadata=self._metadata))

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Generation:
        """Generate from text (or token_ids=..., or messages=[{"role", "content"}]) and collect
        the stream. Keyword arguments: temperature, top_k, top_p, min_p, seed,
        repetition_penalty, presence_penalty, frequency_penalty, logit_bias ({id: bias}),
        max_new_tokens, min_new_tokens, stop, stop_token_ids, include_stop_sequence, time_limit,
        ignore_eos, logprobs, ranks, top_n, prompt_tokens, truncate_input_tokens, and at most one
        constraint: json_schema (dict or JSON text), json_object=True, regex, choice (list of
        strings) or grammar (Lark text)."""
        return self.generate_stream(prompt, timeout=timeout, **kwargs).result()

    def generate_samples(self, prompt: str | None = None, *, n: int, timeout: float | None = None,
                         **kwargs) -> list[Generation]:
        """n samples of one prompt in one call (the prompt is computed once); sample i used
        seed + i. Same keyword arguments as generate()."""
        return self.generate_stream(prompt, timeout=timeout, n=n, **kwargs).results()

    def score(self, items: list, *, ranks: bool = False, top_n: int = 0, timeout: float | None = None) -> list[Scored]:
        """items: texts (every token after the first is scored) or (context, continuation) pairs."""
        resp = self._call(self._stub.Score, convert.score_request(items, ranks, top_n), timeout)
        return [convert.scored(r) for r in resp.results]

    def info(self, timeout: float | None = None) -> ModelInfo:
        return convert.model_info(self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... for the server ("") or a named service."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncClient:
    """The same calls for asyncio code; the same targets, balancing and retries as Client."""

    def __init__(self, target: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float | None = None,
                 tls: bool = False, root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None, retries: bool = True, api_key: str | None = None):
        self.target, options = channel_options(target, retries=retries)
        self._metadata = _auth_metadata(api_key)
        if tls or root_certificates:
            self._channel = grpc.aio.secure_channel(
                self.target, _credentials(root_certificates, private_key, certificate_chain), options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options)
        self._stub = pb_grpc.TokenwireStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=timeout if timeout is not None else self.timeout,
                                metadata=self._metadata)
        except grpc.RpcError as e:
            raise TokenwireError.from_rpc_error(e) from None

    async def tokenize(self, texts: str | list[str], *, add_special_tokens: bool = False,
                       allow_special: bool = False, truncate_input_tokens: int | None = None,
                       encoding: str | None = None, return_tokens: bool = False,
                       timeout: float | None = None) -> list[Tokenized]:
        req = _tokenize_request(texts, add_special_tokens, allow_special, truncate_input_tokens, encoding,
                                return_tokens)
        return [convert.tokenized(r) for r in (await self._call(self._stub.Tokenize, req, timeout)).results]

    async def detokenize(self, ids: list[int], *, skip_special_tokens: bool = False,
                         timeout: float | None = None) -> str:
        req = pb.DetokenizeRequest(ids=ids, skip_special_tokens=skip_special_tokens)
        return (await self._call(self._stub.Detokenize, req, timeout)).text

    async def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                              **kwargs) -> AsyncIterator[Delta | InputInfo | Final]:
        """Every event of the stream: InputInfo, then Deltas, then Final."""
        call = self._stub.Generate(convert.generate_request(prompt, **kwargs),
                                   timeout=timeout if timeout is not None else self.timeout,
                                   metadata=self._metadata)
        try:
            async for msg in call:
                yield convert.event(msg)
        except grpc.RpcError as e:
            raise TokenwireError.from_rpc_error(e) from None
        finally:
            call.cancel()  # no-op when the stream is complete; stops the server's work otherwise

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Generation:
        collector = convert.Collector()
        async for item in self.generate_stream(prompt, timeout=timeout, **kwargs):
            collector.add(item)
        return collector.result()

    async def generate_samples(self, prompt: str | None = None, *, n: int, timeout: float | None = None,
                               **kwargs) -> list[Generation]:
        collector = convert.Collector()
        async for item in self.generate_stream(prompt, timeout=timeout, n=n, **kwargs):
            collector.add(item)
        return collector.results()

    async def score(self, items: list, *, ranks: bool = False, top_n: int = 0,
                    timeout: float | None = None) -> list[Scored]:
        resp = await self._call(self._stub.Score, convert.score_request(items, ranks, top_n), timeout)
        return [convert.scored(r) for r in resp.results]

    async def info(self, timeout: float | None = None) -> ModelInfo:
        return convert.model_info(await self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        resp = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
