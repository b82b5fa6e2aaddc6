"""deploy/: the kustomizations render, pass the Kubernetes schema offline (strict: unknown fields
fail) and agree with the real server: its command line parses the Deployment's args and
environment, ports, probes, Services, drain timing, security context and TLS paths line up.

Each check returns a list of problems; the mutation tests at the end break one thing in the
rendered manifests (or the Dockerfile) and show the check that should catch it does."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml
from tokenwire.v1 import tokenwire_pb2

from tokenwire_server import registry
from tokenwire_server.main import build_parser, env_name
from tokenwire_server.server import LIVENESS_SERVICE, READINESS_SERVICES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S_VERSION = "1.32.0"  # bundled by kubernetes-validate; gRPC probes are GA since 1.27
KUSTOMIZATIONS = ("base", "overlays/secure", "overlays/mtls")
EXPECT = {  # kustomization -> (TLS, mutual TLS, API keys)
    "base": (False, False, False),
    "overlays/secure": (True, False, True),
    "overlays/mtls": (True, True, True),
}
SERVER_CONTAINER = "tokenwire"
# Variables the server reads besides TOKENWIRE_<flag dest>: registry.home(), the API-key list,
# and the top-level --log-level default.
EXTRA_ENV = {"TOKENWIRE_HOME", "TOKENWIRE_API_KEYS", "TOKENWIRE_LOG_LEVEL"}
# Health services the server reports: readiness ("" and the Tokenwire service) and liveness.
SERVICE_NAME = tokenwire_pb2.DESCRIPTOR.services_by_name["Tokenwire"].full_name
READINESS = set(READINESS_SERVICES)
TLS_SECRET, API_KEYS_SECRET = "tokenwire-tls", "tokenwire-api-keys"
TLS_KEYS = {"tls_cert": "tls.crt", "tls_key": "tls.key", "tls_client_ca": "ca.crt"}
CONTAINER_PORTS = {"port": "grpc", "http_port": "http", "health_port": "health", "metrics_port": "metrics"}
# The client ports: gRPC and the OpenAI-compatible HTTP API. Both Services carry each (same name,
# targetPort the container port of that name) and the NetworkPolicy admits both from the same clients.
CLIENT_PORTS = {"grpc": "port", "http": "http_port"}  # port name -> server flag dest
# Memory footprint per registry model: parameters, and KV cache bytes per token in float32
# (K and V x layers x KV heads x head dim x 4). SmolLM2-135M: 30 layers, 3 KV heads, head dim 64.
FOOTPRINT = {"smollm2-135m-instruct": (135e6, 2 * 30 * 3 * 64 * 4)}
OVERHEAD = 2**30  # Python, torch, gRPC and working buffers (measured: ~0.5 GiB at rest)


class Problem(Exception):
    pass


# --- rendering -------------------------------------------------------------------------------

@cache
def _render(kustomization: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: deploy/ cannot be rendered with `kubectl kustomize`")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / kustomization)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize deploy/{kustomization} failed:\n{out.stderr}"
    return out.stdout


def render(kustomization: str) -> list[dict]:
    """Fresh objects every call, so a test may mutate them."""
    return [doc for doc in yaml.safe_load_all(_render(kustomization)) if doc]


# --- the Dockerfile --------------------------------------------------------------------------

def dockerfile_stages(text: str) -> list[dict]:
    """Stages in order: name, base, args, env (inherited from a parent stage), user, expose,
    entrypoint and the instructions. Enough of the syntax for deploy/Dockerfile."""
    lines, buf = [], ""
    for raw in text.splitlines():
        if not buf and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.lstrip().startswith("#"):  # comment inside a continued instruction
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append(buf + raw)
        buf = ""
    stages: list[dict] = []
    global_args: dict[str, str] = {}
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            parent = next((s for s in stages if s["name"] == parts[0]), None)
            stage = {"name": name, "base": parts[0], "args": {}, "env": {}, "user": None, "expose": set(),
                     "entrypoint": None, "instructions": []}
            if parent:
                for key in ("env", "user", "expose", "entrypoint"):
                    stage[key] = copy.deepcopy(parent[key])
            stages.append(stage)
            continue
        if word == "ARG":
            key, _, value = rest.partition("=")
            (stages[-1]["args"] if stages else global_args)[key] = value or global_args.get(key, "")
            continue
        stage = stages[-1]
        stage["instructions"].append((word, rest))
        if word == "ENV":
            for token in shlex.split(rest):
                key, eq, value = token.partition("=")
                if not eq:
                    raise Problem(f"Dockerfile: ENV {rest!r}: use the KEY=VALUE form")
                stage["env"][key] = value
        elif word == "USER":
            stage["user"] = rest
        elif word == "EXPOSE":
            stage["expose"] |= {int(p.split("/")[0]) for p in rest.split()}
        elif word == "ENTRYPOINT":
            stage["entrypoint"] = json.loads(rest)  # exec form only: the server must be PID 1
    return stages


def image(text: str) -> dict:
    return dockerfile_stages(text)[-1]  # the default build target


# --- the server's view of the Deployment -----------------------------------------------------

def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    if len(found) != 1:
        raise Problem(f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def pod_spec(objects) -> dict:
    return one(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"]


def server_container(objects) -> dict:
    found = [c for c in pod_spec(objects)["containers"] if c["name"] == SERVER_CONTAINER]
    if len(found) != 1:
        raise Problem(f"no container named {SERVER_CONTAINER!r} in the Deployment")
    return found[0]


def serve_parser():
    parser = build_parser(environ={})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def known_env_names() -> set[str]:
    return {env_name(a.dest) for a in serve_parser()._actions
            if any(o.startswith("--") for o in a.option_strings) and a.dest != "help"} | EXTRA_ENV


def service_link_env(objects, spec) -> dict[str, str]:
    """The docker-link variables the kubelet injects for each Service of the namespace, unless
    enableServiceLinks is false: a Service named tokenwire gives TOKENWIRE_PORT=tcp://...."""
    if spec.get("enableServiceLinks", True) is False:
        return {}
    env = {}
    for svc in (o for o in objects if o["kind"] == "Service"):
        if svc["spec"].get("clusterIP") == "None":
            continue
        prefix, port = svc["metadata"]["name"].upper().replace("-", "_"), svc["spec"]["ports"][0]["port"]
        env |= {f"{prefix}_SERVICE_HOST": "10.0.0.10", f"{prefix}_SERVICE_PORT": str(port),
                f"{prefix}_PORT": f"tcp://10.0.0.10:{port}"}
    return env


def manifest_env(objects, container) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom sources in order, then env
    (which wins). Secret values are dummies; ConfigMap references are resolved."""
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            if name not in configmaps:
                raise Problem(f"envFrom names ConfigMap {name!r}, which the kustomization does not render")
            env |= {prefix + k: v for k, v in configmaps[name].items()}
        else:
            raise Problem(f"envFrom {source}: only ConfigMaps are modelled by this test")
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            if "$(" in var["value"]:
                raise Problem(f"{name}: $(VAR) expansion is not modelled by this test")
            env[name] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[name] = f"dummy-{ref['name']}-{ref['key']}"
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            if ref["key"] not in configmaps.get(ref["name"], {}):
                raise Problem(f"{name}: ConfigMap {ref['name']!r} has no key {ref['key']!r}")
            env[name] = configmaps[ref["name"]][ref["key"]]
        else:
            env[name] = "0"
    return env


def server_env(objects, dockerfile: str) -> dict[str, str]:
    """Image ENV, then the kubelet's service links, then envFrom and env."""
    container = server_container(objects)
    return (image(dockerfile)["env"] | service_link_env(objects, pod_spec(objects))
            | manifest_env(objects, container))


def serve_argv(objects, dockerfile: str) -> list[str]:
    container = server_container(objects)
    command = container.get("command") or image(dockerfile)["entrypoint"]
    if not command or Path(command[0]).name != "tokenwire-server":
        raise Problem(f"the container runs {command}, not tokenwire-server")
    return command[1:] + container.get("args", [])


def parse_serve(objects, dockerfile: str) -> argparse.Namespace:
    """Parse the container's command line and environment with the server's own parser."""
    argv, env = serve_argv(objects, dockerfile), server_env(objects, dockerfile)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            ns = build_parser(environ=env).parse_args(argv)
    except SystemExit:
        raise Problem(f"tokenwire-server rejects argv {argv}: {stderr.getvalue().strip().splitlines()[-1]}")
    if ns.command != "serve":
        raise Problem(f"the container runs `tokenwire-server {ns.command}`, not serve")
    return ns


def named_ports(container) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def prestop_sleep(container) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    if not pre:
        raise Problem("the server container has no preStop hook")
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    if len(command) == 3 and command[1] == "-c":
        command = shlex.split(command[2])
    if len(command) == 2 and Path(command[0]).name == "sleep":
        return float(command[1])
    raise Problem(f"preStop {pre}: expected a sleep")


def quantity(value) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    if not match or (match[2] and match[2] not in units):
        raise Problem(f"cannot read quantity {value!r}")
    return float(match[1]) * units.get(match[2], 1)


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def admitted_from(policy: dict, name: str, number: int) -> list[str] | None:
    """Whom a NetworkPolicy admits to the container port called `name` (number `number`, TCP): the
    `from` peers of every ingress rule covering it, as sorted JSON, or None if a rule admits anyone.
    A rule without `ports`, or a port entry without `port`, covers every port."""
    def covers(entry):
        port = entry.get("port")
        if port is None:
            return True
        if entry.get("protocol", "TCP") != "TCP":
            return False
        if isinstance(port, str):
            return port == name
        return port <= number <= entry.get("endPort", port)

    peers: set[str] = set()
    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and not any(covers(p) for p in rule["ports"]):
            continue
        if not rule.get("from"):
            return None
        peers |= {json.dumps(peer, sort_keys=True) for peer in rule["from"]}
    return sorted(peers)


def describe_peers(peers: list[str] | None) -> str:
    return "anyone" if peers is None else "; ".join(peers) or "no one"


# --- checks: each returns its problems -------------------------------------------------------

def check_env_names(objects, dockerfile) -> list[str]:
    known = known_env_names()
    names = [(f"ConfigMap {o['metadata']['name']}", k) for o in objects if o["kind"] == "ConfigMap"
             for k in o.get("data", {})]
    spec = pod_spec(objects)
    for c in spec.get("initContainers", []) + spec["containers"]:
        names += [(f"container {c['name']}", v["name"]) for v in c.get("env", [])]
    names += [("Dockerfile ENV", k) for k in image(dockerfile)["env"]]
    return [f"{where}: {name} is not a tokenwire-server serve setting" for where, name in names
            if name.startswith("TOKENWIRE_") and name not in known]


def check_parses(objects, dockerfile) -> list[str]:
    try:
        parse_serve(objects, dockerfile)
    except Problem as e:
        return [str(e)]
    return []


def check_ports(objects, dockerfile) -> list[str]:
    ns, ports = parse_serve(objects, dockerfile), named_ports(server_container(objects))
    problems = []
    for dest, port_name in CONTAINER_PORTS.items():
        if port_name not in ports:
            problems.append(f"no containerPort named {port_name!r}")
        elif getattr(ns, dest) != ports[port_name]:
            problems.append(f"the server's {dest} is {getattr(ns, dest)}, containerPort {port_name!r} is "
                            f"{ports[port_name]}")
    if ns.health_port is None or ns.health_port == ns.port:
        problems.append("the health port must be set and differ from the gRPC port (probes speak plaintext)")
    listening = {dest: getattr(ns, dest) for dest in CONTAINER_PORTS if getattr(ns, dest)}
    if len(set(listening.values())) < len(listening):
        problems.append(f"the server's ports {listening} are not distinct")
    if ns.host not in ("0.0.0.0", "::", "[::]"):
        problems.append(f"the server listens on {ns.host}, not on every interface: the pod IP is unreachable")
    if not image(dockerfile)["expose"] >= set(ports.values()):
        problems.append(f"Dockerfile EXPOSE {sorted(image(dockerfile)['expose'])} lacks one of {ports}")
    return problems


def check_probes(objects, dockerfile) -> list[str]:
    ns, container = parse_serve(objects, dockerfile), server_container(objects)
    problems = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if not probe or "grpc" not in probe:
            problems.append(f"{kind}: missing or not a gRPC probe")
            continue
        if probe["grpc"]["port"] != ns.health_port:
            problems.append(f"{kind} probes port {probe['grpc']['port']}, the health port is {ns.health_port}")
        # Liveness must not fail while the model loads or a drain runs: it asks for "liveness";
        # startup and readiness wait for the model.
        want = {LIVENESS_SERVICE} if kind == "livenessProbe" else READINESS
        if probe["grpc"].get("service", "") not in want:
            problems.append(f"{kind} asks for health service {probe['grpc'].get('service')!r}, "
                            f"expected one of {sorted(want)}")
    startup = container.get("startupProbe", {})
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get(
        "failureThreshold", 3)
    if budget < 120:  # model load ~10 s and warm-up on 2 cores; slow nodes take several times that
        problems.append(f"startupProbe allows only {budget} s for the model to load")
    return problems


def check_services(objects, dockerfile) -> list[str]:
    template = one(objects, "Deployment", "tokenwire")["spec"]["template"]
    labels, ports = template["metadata"]["labels"], named_ports(server_container(objects))
    services = [o for o in objects if o["kind"] == "Service"]
    problems = []
    for svc in services:
        name = svc["metadata"]["name"]
        if not selects(svc["spec"].get("selector", {}), labels):
            problems.append(f"Service {name} does not select the tokenwire pods")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if (target not in ports) if isinstance(target, str) else (target not in ports.values()):
                problems.append(f"Service {name} port {port.get('name')}: targetPort {target!r} is not a "
                                f"container port ({ports})")
        for client_port in CLIENT_PORTS:
            found = [p for p in svc["spec"]["ports"] if p.get("name") == client_port]
            if not found or found[0].get("targetPort") != client_port:
                problems.append(f"Service {name} has no port {client_port} targeting the container's "
                                f"{client_port} port")
    if not any(s["spec"].get("clusterIP") == "None" for s in services):
        problems.append("no headless Service (clusterIP: None) for client-side load balancing")
    if not any(s["spec"].get("type", "ClusterIP") == "ClusterIP" and s["spec"].get("clusterIP") != "None"
               for s in services):
        problems.append("no ClusterIP Service")
    return problems


def check_termination(objects, dockerfile) -> list[str]:
    ns, spec = parse_serve(objects, dockerfile), pod_spec(objects)
    try:
        sleep = prestop_sleep(server_container(objects))
    except Problem as e:
        return [str(e)]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= sleep + ns.drain_timeout:
        return [(f"terminationGracePeriodSeconds {grace} <= preStop sleep {sleep} + drain timeout "
                 f"{ns.drain_timeout}: the kubelet kills streams still draining")]
    return []


def check_security(objects, dockerfile) -> list[str]:
    spec, problems = pod_spec(objects), []
    pod_sc = spec.get("securityContext", {})
    user = image(dockerfile)["user"] or ""
    image_uid = int(user.split(":")[0]) if user.split(":")[0].isdigit() else None
    if image_uid is None or image_uid == 0:
        problems.append(f"Dockerfile USER {user!r}: must be a numeric, non-root UID")
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc, where = c.get("securityContext", {}), f"container {c['name']}"

        def effective(key, sc=sc):
            return sc.get(key, pod_sc.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if not isinstance(effective("runAsUser"), int) or effective("runAsUser") == 0:
            problems.append(f"{where}: runAsUser must be a non-zero UID")
        elif image_uid is not None and effective("runAsUser") != image_uid:
            problems.append(f"{where}: runAsUser {effective('runAsUser')} is not the image's USER {image_uid}")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            problems.append(f"{where}: capabilities must drop ALL and add none")
        if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    tmp = [m for m in server_container(objects).get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
        problems.append("/tmp is not an emptyDir (the root filesystem is read-only)")
    return problems


def check_env_sources(objects, dockerfile) -> list[str]:
    """Settings come from a ConfigMap (envFrom); the image provides the model cache path."""
    container, problems = server_container(objects), []
    if not any("configMapRef" in s for s in container.get("envFrom", [])):
        problems.append("the server container takes no envFrom ConfigMap")
    home = image(dockerfile)["env"].get("TOKENWIRE_HOME")
    if not home:
        problems.append("Dockerfile: no ENV TOKENWIRE_HOME")
    ns = parse_serve(objects, dockerfile)
    model_stage_args = {k: v for s in dockerfile_stages(dockerfile) for k, v in s["args"].items()}
    pulls = [rest for s in dockerfile_stages(dockerfile) for word, rest in s["instructions"]
             if word == "RUN" and "tokenwire-server pull" in rest]
    if ns.model not in registry.REGISTRY:
        problems.append(f"--model {ns.model!r} is not a registry model the image can carry")
    elif not pulls or model_stage_args.get("MODEL", "").strip('"') != ns.model:
        problems.append(f"the Dockerfile does not pull {ns.model!r} (ARG MODEL={model_stage_args.get('MODEL')})")
    copies = [rest for word, rest in image(dockerfile)["instructions"] if word == "COPY"]
    if home and f"--from=model {home} {home}" not in copies:
        problems.append(f"the image does not copy the model stage's {home} into {home}")
    return problems


def check_resources(objects, dockerfile) -> list[str]:
    ns, container = parse_serve(objects, dockerfile), server_container(objects)
    requests = container.get("resources", {}).get("requests", {})
    limits = container.get("resources", {}).get("limits", {})
    if not {"cpu", "memory"} <= set(requests) or "memory" not in limits:
        return [f"resources need cpu and memory requests and a memory limit, got {container.get('resources')}"]
    problems = []
    if ns.threads is not None and ns.threads != quantity(requests["cpu"]):
        problems.append(f"--threads {ns.threads} differs from the CPU request {requests['cpu']}")
    if ns.model not in FOOTPRINT:
        return problems + [f"add {ns.model!r} to FOOTPRINT in this test to check its memory"]
    params, kv_fp32 = FOOTPRINT[ns.model]

    def need(bytes_per_value):
        return ns.kv_cache_tokens * kv_fp32 * bytes_per_value / 4 + params * bytes_per_value + OVERHEAD

    low = {"float32": 4}.get(ns.dtype, 2)  # auto is bfloat16 on the CPUs we size for
    high = 2 if ns.dtype in ("bfloat16", "float16") else 4  # auto falls back to float32
    if quantity(requests["memory"]) < need(low):
        problems.append(f"memory request {requests['memory']} < {need(low) / 2**30:.1f} GiB for "
                        f"{ns.kv_cache_tokens} KV tokens in {ns.dtype}")
    if quantity(limits["memory"]) < need(high):
        problems.append(f"memory limit {limits['memory']} < {need(high) / 2**30:.1f} GiB for "
                        f"{ns.kv_cache_tokens} KV tokens in float32")
    if quantity(limits["memory"]) < quantity(requests["memory"]):
        problems.append("memory limit below the request")
    return problems


def check_companions(objects, dockerfile) -> list[str]:
    """HPA, PDB, NetworkPolicy and scrape annotations point at the Deployment and its ports."""
    deployment = one(objects, "Deployment", "tokenwire")
    template = deployment["spec"]["template"]
    labels, ports = template["metadata"]["labels"], named_ports(server_container(objects))
    ns, problems = parse_serve(objects, dockerfile), []
    if not selects(deployment["spec"]["selector"]["matchLabels"], labels):
        problems.append("the Deployment's selector does not match its own pods")
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    if (hpa["apiVersion"], target["kind"], target["name"]) != ("autoscaling/v2", "Deployment", "tokenwire"):
        problems.append(f"the HPA scales {target}, not the tokenwire Deployment")
    if not any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", [])):
        problems.append("the HPA does not scale on CPU")
    if "replicas" in deployment["spec"]:
        problems.append("the Deployment sets replicas, which every apply would reset under the HPA")
    pdb = one(objects, "PodDisruptionBudget")
    if pdb["apiVersion"] != "policy/v1" or not selects(pdb["spec"]["selector"].get("matchLabels", {}), labels):
        problems.append("the PodDisruptionBudget does not select the tokenwire pods")
    policy = one(objects, "NetworkPolicy")
    if not selects(policy["spec"]["podSelector"].get("matchLabels", {}), labels):
        problems.append("the NetworkPolicy does not select the tokenwire pods")
    for rule in policy["spec"].get("ingress", []):
        for port in rule.get("ports", []):
            if port["port"] not in ports and port["port"] not in ports.values():
                problems.append(f"the NetworkPolicy admits port {port['port']!r}, not a container port")
    client_rules = [r for r in policy["spec"].get("ingress", [])
                    if any(p["port"] in ("grpc", ns.port) for p in r.get("ports", []))
                    and any(f.get("podSelector", {}).get("matchLabels") == {"tokenwire-client": "true"}
                            for f in r.get("from", []))]
    if not client_rules:
        problems.append("the NetworkPolicy does not admit gRPC from pods labelled tokenwire-client=true")
    # HTTP serves the same model with the same API keys: whoever may reach gRPC may reach HTTP, no one else.
    grpc_peers = admitted_from(policy, "grpc", ns.port)
    for port_name, dest in CLIENT_PORTS.items():
        if port_name == "grpc":
            continue
        peers = admitted_from(policy, port_name, getattr(ns, dest))
        if peers != grpc_peers:
            problems.append(f"the NetworkPolicy admits port {port_name} from {describe_peers(peers)}, but "
                            f"gRPC from {describe_peers(grpc_peers)}")
    annotations = template["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(
            ns.metrics_port):
        problems.append(f"scrape annotations {annotations} do not match metrics port {ns.metrics_port}")
    return problems


def check_secrets(objects, dockerfile, kustomization) -> list[str]:
    """No secret material rendered; TLS and API-key settings point into read-only mounts of the
    operator's Secrets, as the kustomization promises."""
    problems = [f"{o['kind']} {o['metadata']['name']} is rendered: Secrets are created by the operator"
                for o in objects if o["kind"] == "Secret"]
    tls, mtls, api_keys = EXPECT[kustomization]
    ns, container, spec = parse_serve(objects, dockerfile), server_container(objects), pod_spec(objects)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    def secret_file(path: str, secret: str, keys: set[str]) -> str | None:
        """Why `path` is not a file of `secret` in a read-only mount, or None."""
        path = PurePosixPath(path)
        for mount in container.get("volumeMounts", []):
            base = PurePosixPath(mount["mountPath"])
            if base not in path.parents:
                continue
            source = volumes.get(mount["name"], {}).get("secret")
            if not source or source.get("secretName") != secret:
                return f"{path} is in volume {mount['name']!r}, not Secret {secret}"
            if mount.get("readOnly") is not True or "subPath" in mount:
                return f"{path}: mount {mount['name']!r} must be read-only, without subPath"
            rel = str(path.relative_to(base))
            items = {i["path"]: i["key"] for i in source.get("items", [])}
            key = items.get(rel) if items else rel
            if key not in keys:
                return f"{path}: Secret {secret} has no such key (expected {sorted(keys)})"
            return None
        return f"{path} is not under any volume mount"

    for dest, key in TLS_KEYS.items():
        wanted = mtls if dest == "tls_client_ca" else tls
        value = getattr(ns, dest)
        if not wanted:
            if value is not None:
                problems.append(f"{kustomization}: {dest} is set to {value}")
            continue
        if value is None:
            problems.append(f"{kustomization}: {env_name(dest)} is not set")
        elif why := secret_file(value, TLS_SECRET, {key}):
            problems.append(f"{env_name(dest)}: {why}")
    env_keys = [v for v in container.get("env", []) if v["name"] == "TOKENWIRE_API_KEYS"]
    if not api_keys:
        if ns.api_keys_file or env_keys:
            problems.append(f"{kustomization}: API keys are configured")
    elif ns.api_keys_file:
        if why := secret_file(ns.api_keys_file, API_KEYS_SECRET, {"api-keys"}):
            problems.append(f"TOKENWIRE_API_KEYS_FILE: {why}")
    elif not (env_keys and env_keys[0].get("valueFrom", {}).get("secretKeyRef", {}).get("name")
              == API_KEYS_SECRET):
        problems.append(f"{kustomization}: API keys come from neither a file nor Secret {API_KEYS_SECRET}")
    return problems


CHECKS = [check_env_names, check_parses, check_ports, check_probes, check_services, check_termination,
          check_security, check_env_sources, check_resources, check_companions]


def all_problems(objects, dockerfile, kustomization) -> list[str]:
    problems = []
    for check in CHECKS + [check_secrets]:
        try:
            args = (objects, dockerfile, kustomization) if check is check_secrets else (objects, dockerfile)
            problems += check(*args)
        except Problem as e:
            problems.append(f"{check.__name__}: {e}")
    return problems


# --- tests -----------------------------------------------------------------------------------

def test_every_kustomization_is_tested():
    found = {str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS) == set(EXPECT)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_objects_pass_the_kubernetes_schema(kustomization):
    objects = render(kustomization)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy"} <= kinds
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kustomization}: {obj['kind']} {obj['metadata']['name']}: {e.message} "
                        f"at {'/'.join(map(str, e.path))}")


def raw_resources() -> list[Path]:
    """Files the kustomizations list as resources (patches are partial objects)."""
    files = []
    for kustomization in KUSTOMIZATIONS:
        spec = yaml.safe_load((DEPLOY / kustomization / "kustomization.yaml").read_text())
        here = DEPLOY / kustomization
        files += [here / r for r in spec.get("resources", []) if (here / r).is_file()]
    return files


@pytest.mark.parametrize("path", raw_resources(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_raw_resource_files_pass_the_kubernetes_schema(path):
    for obj in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_schema_rejects_unknown_fields():
    deployment = one(render("base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["serviceName"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="serviceName"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_agree_with_the_server(kustomization):
    assert all_problems(render(kustomization), DOCKERFILE.read_text(), kustomization) == []


def test_the_server_reads_what_the_manifests_say():
    """A spot check that the parse is real: values from the ConfigMap and the overlay arrive."""
    ns = parse_serve(render("overlays/mtls"), DOCKERFILE.read_text())
    assert (ns.port, ns.http_port, ns.health_port, ns.metrics_port) == (50051, 8000, 50052, 9090)
    assert ns.log_format == "json" and ns.kv_cache_tokens == 65536 and ns.drain_timeout == 30.0
    assert ns.tls_client_ca == "/etc/tokenwire/tls/ca.crt"


def test_dockerfile_shape():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    names = [s["name"] for s in stages]
    assert names == ["builder", "model", "app", "runtime"]
    final = stages[-1]
    assert final["entrypoint"] == ["tokenwire-server", "serve"]
    assert final["env"]["TOKENWIRE_HOME"] == "/models"
    assert final["expose"] == {50051, 8000, 50052, 9090}
    assert stages[2]["user"] == final["user"] == "10001:10001"
    runs = " ".join(rest for word, rest in stages[0]["instructions"] if word == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs and "pip install ./client ." in runs
    # The slim stages start from the image the venv was built in (its python path is baked in).
    assert stages[0]["base"] == stages[2]["base"]


def test_dockerignore_keeps_the_build_inputs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git"} <= ignored
    assert not ignored & {"server", "client", "pyproject.toml", "README.md", "deploy", "*"}


# --- each check can fail ---------------------------------------------------------------------

def _deployment(o):
    return one(o, "Deployment", "tokenwire")


def _container(o):
    return server_container(o)


def _configmap(o):
    return one(o, "ConfigMap")["data"]


def _set(getter, *path_and_value):
    *path, value = path_and_value

    def mutate(objects):
        node = getter(objects)
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _edit_args(old, new):
    def mutate(objects):
        args = _container(objects)["args"]
        args[args.index(old)] = new
    return mutate


def _named(getter, name):
    """The entry called `name` in the list of ports `getter` returns (a container's, a Service's)."""
    return lambda o: next(p for p in getter(o) if p.get("name") == name)


def _service_ports(service):
    return lambda o: one(o, "Service", service)["spec"]["ports"]


def _drop_port(service, name):
    return lambda o: _service_ports(service)(o).remove(_named(_service_ports(service), name)(o))


def _policy_move(port, to=None):
    """Take `port` out of its NetworkPolicy rule and add it to the rule admitting port `to` (None:
    drop it)."""
    def mutate(objects):
        rules = one(objects, "NetworkPolicy")["spec"]["ingress"]

        def rule_with(name):
            return next(r for r in rules if any(p.get("port") == name for p in r.get("ports", [])))
        source = rule_with(port)
        entry = next(p for p in source["ports"] if p.get("port") == port)
        source["ports"].remove(entry)
        if to is not None:
            rule_with(to)["ports"].append(entry)
    return mutate


MUTATIONS = {
    "unknown TOKENWIRE variable": ("base", check_env_names, "TOKENWIRE_MAX_NUM_SEQ ",
                                   _set(_configmap, "TOKENWIRE_MAX_NUM_SEQ", "8")),
    "bad value": ("base", check_parses, "TOKENWIRE_LOG_FORMAT", _set(_configmap, "TOKENWIRE_LOG_FORMAT", "xml")),
    "unknown flag": ("base", check_parses, "unrecognized", _edit_args("--port=50051", "--grpc-port=50051")),
    "health port moved": ("base", check_ports, "health_port", _edit_args("--health-port=50052", "--health-port=50053")),
    "metrics port renamed": ("base", check_ports, "'metrics'",
                             _set(_named(lambda o: _container(o)["ports"], "metrics"), "name", "prom")),
    "http port moved": ("base", check_ports, "http_port is 8080", _edit_args("--http-port=8000", "--http-port=8080")),
    "http port renamed": ("base", check_ports, "'http'",
                          _set(_named(lambda o: _container(o)["ports"], "http"), "name", "openai")),
    "http on the gRPC port": ("base", check_ports, "not distinct",
                              _edit_args("--http-port=8000", "--http-port=50051")),
    "loopback host": ("base", check_ports, "every interface", _edit_args("--host=0.0.0.0", "--host=127.0.0.1")),
    "probe on gRPC port": ("base", check_probes, "readinessProbe probes port 50051",
                           _set(_container, "readinessProbe", "grpc", "port", 50051)),
    "unserved health service": ("base", check_probes, "tokenwire.v1.Other",
                                _set(_container, "livenessProbe", "grpc", "service", "tokenwire.v1.Other")),
    "short startup": ("base", check_probes, "startupProbe allows",
                      _set(_container, "startupProbe", "failureThreshold", 3)),
    "no startup probe": ("base", check_probes, "startupProbe: missing", lambda o: _container(o).pop("startupProbe")),
    "bad targetPort": ("base", check_services, "targetPort 'grpcs'",
                       _set(_named(_service_ports("tokenwire"), "grpc"), "targetPort", "grpcs")),
    "bad http targetPort": ("base", check_services, "targetPort 'https'",
                            _set(_named(_service_ports("tokenwire"), "http"), "targetPort", "https")),
    "http targets grpc": ("base", check_services, "no port http targeting",
                          _set(_named(_service_ports("tokenwire"), "http"), "targetPort", "grpc")),
    "headless without http": ("base", check_services, "tokenwire-headless has no port http",
                              _drop_port("tokenwire-headless", "http")),
    "headless not headless": ("base", check_services, "headless",
                              lambda o: one(o, "Service", "tokenwire-headless")["spec"].pop("clusterIP")),
    "service selects nothing": ("base", check_services, "does not select",
                                _set(lambda o: one(o, "Service", "tokenwire")["spec"]["selector"], "x", "y")),
    "short grace": ("base", check_termination, "terminationGracePeriodSeconds 35",
                    _set(pod_spec, "terminationGracePeriodSeconds", 35)),
    "long drain": ("base", check_termination, "drain timeout 60", _set(_configmap, "TOKENWIRE_DRAIN_TIMEOUT", "60")),
    "no preStop": ("base", check_termination, "preStop", lambda o: _container(o).pop("lifecycle")),
    "writable root": ("base", check_security, "readOnlyRootFilesystem",
                      _set(_container, "securityContext", "readOnlyRootFilesystem", False)),
    "escalation": ("base", check_security, "allowPrivilegeEscalation",
                   lambda o: _container(o)["securityContext"].pop("allowPrivilegeEscalation")),
    "capabilities kept": ("base", check_security, "drop ALL",
                          _set(_container, "securityContext", "capabilities", "drop", [])),
    "root": ("base", check_security, "runAsUser", _set(_container, "securityContext", "runAsUser", 0)),
    "other uid": ("base", check_security, "image's USER", _set(_container, "securityContext", "runAsUser", 1000)),
    "root allowed": ("base", check_security, "runAsNonRoot",
                     lambda o: (_container(o)["securityContext"].pop("runAsNonRoot"),
                                pod_spec(o)["securityContext"].pop("runAsNonRoot"))),
    "unconfined": ("base", check_security, "seccompProfile",
                   lambda o: (_container(o)["securityContext"].pop("seccompProfile"),
                              pod_spec(o)["securityContext"].pop("seccompProfile"))),
    "no /tmp": ("base", check_security, "/tmp", _set(_container, "volumeMounts", [])),
    "no ConfigMap": ("base", check_env_sources, "envFrom", lambda o: _container(o).pop("envFrom")),
    "model not in the image": ("base", check_env_sources, "registry model",
                               _set(_configmap, "TOKENWIRE_MODEL", "/data/other.gguf")),
    "too little memory": ("base", check_resources, "memory limit 3Gi",
                          _set(_container, "resources", "limits", "memory", "3Gi")),
    "bigger KV cache": ("base", check_resources, "131072 KV tokens",
                        _set(_configmap, "TOKENWIRE_KV_CACHE_TOKENS", "131072")),
    "threads vs cpu": ("base", check_resources, "--threads 2", _set(_container, "resources", "requests", "cpu", "4")),
    "HPA target": ("base", check_companions, "the HPA scales",
                   _set(lambda o: one(o, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"], "name", "other")),
    "replicas under HPA": ("base", check_companions, "sets replicas", _set(_deployment, "spec", "replicas", 3)),
    "PDB selector": ("base", check_companions, "PodDisruptionBudget",
                     _set(lambda o: one(o, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], "x", "y")),
    "policy port": ("base", check_companions, "'grpcs'",
                    _set(lambda o: one(o, "NetworkPolicy")["spec"]["ingress"][0]["ports"][0], "port", "grpcs")),
    "policy without http": ("base", check_companions, "admits port http from no one", _policy_move("http")),
    "http open to all": ("base", check_companions, "admits port http from anyone", _policy_move("http", "health")),
    "policy clients": ("base", check_companions, "tokenwire-client=true",
                       _set(lambda o: one(o, "NetworkPolicy")["spec"]["ingress"][0]["from"][0]["podSelector"],
                            "matchLabels", {"app": "anyone"})),
    "scrape port": ("base", check_companions, "scrape annotations",
                    _set(lambda o: _deployment(o)["spec"]["template"]["metadata"]["annotations"],
                         "prometheus.io/port", "9091")),
    "committed Secret": ("overlays/secure", check_secrets, "Secret tokenwire-tls is rendered",
                         lambda o: o.append({"apiVersion": "v1", "kind": "Secret",
                                             "metadata": {"name": "tokenwire-tls"}})),
    "cert outside the mount": ("overlays/secure", check_secrets, "not under any volume mount",
                               _set(_container, "env", 0, "value", "/etc/tls/tls.crt")),
    "cert and key swapped": ("overlays/secure", check_secrets, "no such key",
                             _set(_container, "env", 0, "value", "/etc/tokenwire/tls/tls.key")),
    "writable secret mount": ("overlays/secure", check_secrets, "read-only",
                              _set(_container, "volumeMounts", 1, "readOnly", False)),
    "wrong secret": ("overlays/secure", check_secrets, "not Secret tokenwire-tls",
                     _set(pod_spec, "volumes", 0, "secret", "secretName", "other")),
    "API keys file not a Secret key": ("overlays/secure", check_secrets, "TOKENWIRE_API_KEYS_FILE",
                         _set(_container, "env", 2, "value", "/etc/tokenwire/api-keys/keys")),
    "TLS in base": ("base", check_secrets, "tls_cert is set",
                    lambda o: _container(o).setdefault("env", []).append(
                        {"name": "TOKENWIRE_TLS_CERT", "value": "/x.crt"})),
}


def test_kubernetes_service_links_do_not_break_the_flags():
    """With service links on, a Service named tokenwire sets TOKENWIRE_PORT=tcp://...; the
    server ignores such values, so the port stays the one in the args."""
    objects, dockerfile = render("base"), DOCKERFILE.read_text()
    pod_spec(objects).pop("enableServiceLinks")
    assert "TOKENWIRE_PORT" in service_link_env(objects, pod_spec(objects))
    assert check_parses(objects, dockerfile) == []
    assert parse_serve(objects, dockerfile).port == 50051


@pytest.mark.parametrize("name", MUTATIONS)
def test_each_check_catches_its_mistake(name):
    kustomization, check, expected, mutate = MUTATIONS[name]
    objects, dockerfile = render(kustomization), DOCKERFILE.read_text()
    args = (dockerfile, kustomization) if check is check_secrets else (dockerfile,)
    assert check(objects, *args) == []
    mutate(objects)
    try:
        problems = check(objects, *args)
    except Problem as e:  # the parse itself fails
        problems = [str(e)]
    assert any(expected in p for p in problems), problems


DOCKERFILE_MUTATIONS = {
    "entrypoint without serve": ('ENTRYPOINT ["tokenwire-server", "serve"]', 'ENTRYPOINT ["tokenwire-server"]',
                                 check_parses, "rejects argv"),
    "root user": ("USER 10001:10001", "USER root", check_security, "numeric, non-root"),
    "port not exposed": ("EXPOSE 50051 8000 50052 9090", "EXPOSE 50051", check_ports, "EXPOSE"),
    "http port not exposed": ("EXPOSE 50051 8000 50052 9090", "EXPOSE 50051 50052 9090", check_ports, "EXPOSE"),
    "model not copied": ("COPY --from=model /models /models", "", check_env_sources, "does not copy"),
    "bad image env": ("TOKENWIRE_HOME=/models", "TOKENWIRE_HOME=/models TOKENWIRE_NO_SUCH=1", check_env_names,
                      "TOKENWIRE_NO_SUCH"),
}


@pytest.mark.parametrize("name", DOCKERFILE_MUTATIONS)
def test_dockerfile_checks_catch_their_mistake(name):
    old, new, check, expected = DOCKERFILE_MUTATIONS[name]
    text = DOCKERFILE.read_text()
    assert old in text
    objects = render("base")
    assert check(objects, text) == []
    problems = check(objects, text.replace(old, new))
    assert any(expected in p for p in problems), problems
