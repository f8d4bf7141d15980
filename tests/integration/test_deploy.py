"""SPEC part 2 "Deployment": deploy/ holds a container build and Kubernetes manifests valid against the schemas.

Every manifest validates with `kubernetes-validate` (its bundled schemas, offline, strict: an unknown
field is an error), against the oldest Kubernetes README supports and the newest; `kubectl kustomize`
builds the base and every overlay when kubectl is installed
(skipped otherwise) and each built resource validates too.  The operational promises are checked
across files: 3 replicas, /readyz and /livez probes, preStop equal to `timeouts.shutdown_delay`,
terminationGracePeriodSeconds covering preStop + delay + grace and the last close, keys from a Secret through
`${file:}`, a LoadBalancer Service that keeps the client address, a PodDisruptionBudget, a
gateway StatefulSet whose headless Service the config discovers by SRV, NetworkPolicies (the
balancer's ws port open to all, its admin port not; the gateways reachable from the balancers
only), and a soft spread of balancers and gateways over zones.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from backends_demo.__main__ import SHUTDOWN_TIMEOUT
from backends_demo.app import CLOSE_ANSWER_WAIT
from lb.config.load import parse_config
from lb.config.model import DiscoveryType
from lb.control.tunnel_closing import LAST_CLOSE_ANSWER

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in KUBE.rglob("kustomization.yaml"))
BUILT_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "StatefulSet", "ConfigMap", "Namespace", "NetworkPolicy"}
# README: "Kubernetes 1.30 or newer".  The newest schemas alone took a field 1.30 does not have (pod-level
# `resources`, say), which that cluster's API server would then refuse; so both ends of the range.
OLDEST_KUBERNETES = "1.30.0"
SCHEMA_VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name not in ("kustomization.yaml", "lb.yaml"))


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


# The Prometheus Operator's custom resources (overlays/prometheus-operator): kubernetes-validate has no schema
# for them, so `validate` holds them to the fields of the operator's CRDs (monitoring.coreos.com/v1) we use.
OPERATOR_FIELDS: dict[str, dict[str, set[str]]] = {
    "PodMonitor": {
        "spec": {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels"},
        "podMetricsEndpoints": {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"},
    },
    "PrometheusRule": {"spec": {"groups"}},
}


def validate(resource: dict[str, Any]) -> None:
    if resource.get("kind") in OPERATOR_FIELDS:
        validate_operator_resource(resource)
        return
    for version in SCHEMA_VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
            pytest.fail(f"{name} does not validate against Kubernetes {version}: {exc.message} at {list(exc.path)}")


def validate_operator_resource(resource: dict[str, Any]) -> None:
    fields = OPERATOR_FIELDS[resource["kind"]]
    assert resource["apiVersion"] == "monitoring.coreos.com/v1", resource["apiVersion"]
    assert set(resource) == {"apiVersion", "kind", "metadata", "spec"}, set(resource)
    assert set(resource["spec"]) <= fields["spec"], set(resource["spec"]) - fields["spec"]
    for endpoint in resource["spec"].get("podMetricsEndpoints", []):
        assert set(endpoint) <= fields["podMetricsEndpoints"], set(endpoint) - fields["podMetricsEndpoints"]


def base_resources() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in (KUBE / "base").glob("*.yaml"):
        if path.name in ("kustomization.yaml", "lb.yaml"):
            continue
        for doc in load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBE)))
def test_manifest_validates(path: Path) -> None:
    """Every manifest file validates against the bundled Kubernetes schemas (strict)."""
    docs = load_all(path.read_text())
    assert docs, f"{path} holds no resource"
    for doc in docs:
        validate(doc)


def test_the_oldest_kubernetes_checked_is_the_one_readme_names() -> None:
    """The oldest Kubernetes version the manifests are validated against is the one README names."""
    major_minor = OLDEST_KUBERNETES.rsplit(".", 1)[0]
    assert f"Kubernetes {major_minor} or newer" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(KUBE)))
def test_kustomize_builds_and_validates(directory: Path) -> None:
    """`kubectl kustomize DIR` builds; every resource it outputs validates."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # Not from Debian: bookworm's kubernetes-client is kubectl 1.20, whose kustomize (v2) reads neither
        # `labels:` nor `patches:`; the Kubernetes project's package repository or release binary has one.
        pytest.skip("kubectl is not installed (1.29 or newer, for the 1.30 clusters README asks for: Kubernetes' "
                    "own apt repository or a release binary; Debian's kubernetes-client 1.20 is too old for these "
                    "kustomizations)")
    built = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    resources = load_all(built.stdout)
    kinds = {r["kind"] for r in resources}
    assert kinds >= BUILT_KINDS, f"missing: {BUILT_KINDS - kinds}"
    for resource in resources:
        validate(resource)
        if resource["kind"] != "Namespace":
            assert resource["metadata"].get("namespace") == "game", resource["metadata"]


def config_text(overlay: Path | None = None) -> str:
    return ((overlay or KUBE / "base") / "lb.yaml").read_text()


def load_deploy_config(text: str, tmp_path: Path) -> Any:
    """Parse a deploy config with its ${file:/etc/lb/secrets/...} pointed at freshly generated keys."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(exist_ok=True)
    for name in set(re.findall(r"\$\{file:/etc/lb/secrets/([^}]+)\}", text)):
        (secrets_dir / name).write_text(secrets.token_urlsafe(32) + "\n")
    text = text.replace("/etc/lb/secrets/", f"{secrets_dir}/")
    return parse_config(text, base_dir=tmp_path, environ={}, cpu_count=2)


@pytest.mark.parametrize("overlay", [None, KUBE / "overlays" / "aws-nlb-proxy-protocol"], ids=["base", "nlb"])
def test_config_validates_with_keys_from_files(overlay: Path | None, tmp_path: Path) -> None:
    """The ConfigMap's lb.yaml is a valid config once the Secret's files exist: keys come via ${file:}."""
    text = config_text(overlay)
    assert "${file:/etc/lb/secrets/cookie-key-current}" in text and "${file:/etc/lb/secrets/admin-token}" in text
    config = load_deploy_config(text, tmp_path)
    assert len(config.affinity.secret_keys) == 2 and config.admin.token
    assert config.workers == 2  # workers: auto, one per CPU
    discovery = config.pools["gateways"].discovery
    assert discovery is not None and discovery.type is DiscoveryType.SRV


def test_the_nlb_overlay_s_config_is_the_base_s_with_proxy_protocol() -> None:
    """The overlay replaces the ConfigMap whole (a file cannot be patched): a change to the base's lb.yaml must
    be made there too, and this says so, rather than the overlay running on an old config."""
    base = yaml.safe_load(config_text())
    nlb = yaml.safe_load(config_text(KUBE / "overlays" / "aws-nlb-proxy-protocol"))
    assert all(listener.pop("proxy_protocol", False) for listener in nlb["listeners"])
    for listener in nlb["listeners"]:
        listener.pop("proxy_protocol_from", None)
    assert nlb == base, "overlays/aws-nlb-proxy-protocol/lb.yaml must be base/lb.yaml plus proxy_protocol"


EXIT_MARGIN = 2.0  # seconds for the process to exit once the last tunnel is closed (with workers: N, theirs too)


def test_balancer_deployment_promises() -> None:
    """3 replicas; /readyz and /livez; preStop = shutdown_delay; grace period covers preStop + delay + grace."""
    resources = base_resources()
    deployment = resources[("Deployment", "lb")]
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["args"] == ["run", "--config", "/etc/lb/lb.yaml"]
    timeouts = yaml.safe_load(config_text())["timeouts"]
    delay = _seconds(timeouts["shutdown_delay"])
    grace = _seconds(timeouts["shutdown_grace"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop == delay, "preStop must match timeouts.shutdown_delay"
    # After the grace the balancer gives the last 1001s LAST_CLOSE_ANSWER to be answered, then exits (measured on
    # this config with workers: 2 and three clients that never answer: exit 0 at 46.1 s, 15 + 30 + 1.1): a period
    # of just preStop + delay + grace, which this test took, had the kubelet's SIGKILL cut those last closes.
    needed = pre_stop + delay + grace + LAST_CLOSE_ANSWER + EXIT_MARGIN
    assert pod["terminationGracePeriodSeconds"] >= needed, f"terminationGracePeriodSeconds under {needed:g}"
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    secret_mount = mounts["/etc/lb/secrets"]
    assert "subPath" not in secret_mount, "a subPath mount never sees a rotated Secret"
    assert volumes[secret_mount["name"]]["secret"]["secretName"] == "lb-keys"
    referenced = set(re.findall(r"\$\{file:/etc/lb/secrets/([^}]+)\}", config_text()))
    example = yaml.safe_load((KUBE / "secret.example.yaml").read_text())
    assert example["metadata"]["name"] == "lb-keys"
    assert referenced == set(example["stringData"]), "the config reads keys the example Secret does not hold"


def test_ports_and_paths_agree_across_files() -> None:
    """What one file names, the others match: the config's binds are the container's ports (which the probes,
    the Service and the NetworkPolicy use), the config and the Secret are mounted where `--config` and
    `${file:}` read them, and the gateway listens on the port its container, Service and policy declare."""
    resources = base_resources()
    config = yaml.safe_load(config_text())
    deployment = resources[("Deployment", "lb")]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(config["listeners"][0]["bind"].rsplit(":", 1)[1]) == ports["ws"]
    assert int(config["admin"]["bind"].rsplit(":", 1)[1]) == ports["admin"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in (ports["admin"], "admin")
    assert resources[("Service", "lb")]["spec"]["ports"][0]["targetPort"] in (ports["ws"], "ws")
    policy_ports = {p["port"] for rule in resources[("NetworkPolicy", "lb")]["spec"]["ingress"] for p in rule["ports"]}
    assert policy_ports == set(ports.values())
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path in mounts and mounts[config_path].get("subPath") == "lb.yaml"
    files = re.findall(r"\$\{file:(/[^}]+)\}", config_text())
    assert files and {str(Path(f).parent) for f in files} == {"/etc/lb/secrets"} and "/etc/lb/secrets" in mounts

    statefulset = resources[("StatefulSet", "gw")]
    [gateway] = statefulset["spec"]["template"]["spec"]["containers"]
    port = int(gateway["args"][gateway["args"].index("--port") + 1])
    assert port == _container_port(statefulset, "ws")
    headless = resources[("Service", statefulset["spec"]["serviceName"])]["spec"]["ports"][0]
    assert headless["port"] == port and headless["targetPort"] in (port, "ws")
    gateway_policy = resources[("NetworkPolicy", "gateway")]["spec"]["ingress"]
    assert {p["port"] for rule in gateway_policy for p in rule["ports"]} == {port}
    assert f"127.0.0.1:{port}/drain" in gateway["lifecycle"]["preStop"]["exec"]["command"][-1]


def test_the_prometheus_operator_overlay_scrapes_the_admin_port_and_carries_every_alert() -> None:
    """kube-prometheus-stack ignores the pods' prometheus.io annotations: its PodMonitor must select the
    balancer's pods and name their admin port, and its PrometheusRule must be alerts.yaml itself
    (`make prometheusrule` writes it; an edit of either alone fails here)."""
    overlay = KUBE / "overlays" / "prometheus-operator"
    deployment = base_resources()[("Deployment", "lb")]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [monitor] = load_all((overlay / "podmonitor.yaml").read_text())
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container["ports"]} and endpoint["port"] == "admin"
    assert endpoint["path"] == "/metrics"

    script = DEPLOY / "observability" / "prometheusrule.py"
    rendered = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    committed = (overlay / "prometheusrule.yaml").read_text()
    assert rendered.stdout == committed, "prometheusrule.yaml is out of date: run `make prometheusrule`"
    [rule] = load_all(committed)
    assert rule["spec"] == yaml.safe_load((DEPLOY / "observability" / "alerts.yaml").read_text())
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "game"
    assert set(kustomization["resources"]) == {"../../base", "podmonitor.yaml", "prometheusrule.yaml"}


def test_service_pdb_and_gateways() -> None:
    """LoadBalancer keeping client addresses; PDB over the balancers; SRV name matches the headless Service."""
    resources = base_resources()
    service = resources[("Service", "lb")]["spec"]
    assert service["type"] == "LoadBalancer" and service["externalTrafficPolicy"] == "Local"
    labels = resources[("Deployment", "lb")]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    pdb = resources[("PodDisruptionBudget", "lb")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    statefulset = resources[("StatefulSet", "gw")]
    headless = resources[("Service", statefulset["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    port_name = headless["spec"]["ports"][0]["name"]
    dns = yaml.safe_load(config_text())["pools"]["gateways"]["discovery"]["dns"]
    assert dns == f"_{port_name}._tcp.{headless['metadata']['name']}.game.svc.cluster.local"
    gateway = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert "/drain" in " ".join(gateway["lifecycle"]["preStop"]["exec"]["command"])


def test_gateway_grace_period_covers_its_drain_and_close_spread() -> None:
    """The gateway's preStop drains for its sleep, then SIGTERM closes its players over --close-spread; the demo
    gateway then waits up to 2 s for the last close's answer and shuts down (measured: exit 0 at 22.1 s after
    SIGTERM with --close-spread 20 and five clients that never answer).  The kubelet's SIGKILL must come later."""
    statefulset = base_resources()[("StatefulSet", "gw")]
    pod = statefulset["spec"]["template"]["spec"]
    [gateway] = pod["containers"]
    [sleep] = re.findall(r"time\.sleep\((\d+(?:\.\d+)?)\)", gateway["lifecycle"]["preStop"]["exec"]["command"][-1])
    spread = float(gateway["args"][gateway["args"].index("--close-spread") + 1])
    needed = float(sleep) + spread + CLOSE_ANSWER_WAIT + SHUTDOWN_TIMEOUT
    assert pod["terminationGracePeriodSeconds"] >= needed, f"gateway terminationGracePeriodSeconds under {needed:g}"


def _container_port(workload: dict[str, Any], name: str) -> int:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    [port] = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def _ingress_peers(resources: dict[tuple[str, str], dict[str, Any]], workload: dict[str, Any], port: int) -> list[Any]:
    """The `from` peers of every ingress rule, in every NetworkPolicy selecting the workload's pods, that covers
    `port`; None stands for a rule without `from` (any source).  Fails if no policy isolates the pods."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    policies = [
        doc["spec"]
        for (kind, _), doc in resources.items()
        if kind == "NetworkPolicy" and doc["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert any("Ingress" in p.get("policyTypes", ["Ingress"]) for p in policies), f"no policy isolates {labels}"
    peers: list[Any] = []
    for policy in policies:
        for rule in policy.get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, None) and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            peers.extend(rule.get("from") or [None])
    return peers


def test_network_policies() -> None:
    """Balancer: ws open to any source (players, the NLB's checks), admin only from this namespace and one
    monitoring namespace picked by label; gateways: ingress from the balancer pods only."""
    resources = base_resources()
    deployment = resources[("Deployment", "lb")]
    lb_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert None in _ingress_peers(resources, deployment, _container_port(deployment, "ws")), "ws must be open to all"
    admin = _ingress_peers(resources, deployment, _container_port(deployment, "admin"))
    assert admin and None not in admin, "the admin port must not be open to every source"
    for peer in admin:
        assert "ipBlock" not in peer, peer
        if "namespaceSelector" in peer:
            assert peer["namespaceSelector"].get("matchLabels"), "an empty namespaceSelector is every namespace"
    assert {"podSelector": {}} in admin, "the balancer's own namespace reaches its admin port"
    selectors = [p["namespaceSelector"].get("matchLabels", {}) for p in admin if "namespaceSelector" in p]
    monitoring = [labels for labels in selectors if "kubernetes.io/metadata.name" in labels]
    assert monitoring, "a monitoring namespace, selected by name, reaches the admin port"
    statefulset = resources[("StatefulSet", "gw")]
    gateway = _ingress_peers(resources, statefulset, _container_port(statefulset, "ws"))
    assert gateway, "the balancers must reach the gateways"
    for peer in gateway:
        assert peer is not None and set(peer) == {"podSelector"}, f"gateway ingress beyond this namespace: {peer}"
        assert peer["podSelector"].get("matchLabels"), "an empty podSelector is every pod of the namespace"
        assert peer["podSelector"]["matchLabels"].items() <= lb_labels.items(), f"not the balancer pods: {peer}"


@pytest.mark.parametrize("workload", [("Deployment", "lb"), ("StatefulSet", "gw")], ids=["lb", "gw"])
def test_spread_over_zones_soft(workload: tuple[str, str]) -> None:
    """Balancers and gateways spread over zones, ScheduleAnyway (a single-zone cluster still schedules)."""
    resource = base_resources()[workload]
    template = resource["spec"]["template"]
    [zone] = [
        c for c in template["spec"]["topologySpreadConstraints"] if c["topologyKey"] == "topology.kubernetes.io/zone"
    ]
    assert zone["whenUnsatisfiable"] == "ScheduleAnyway"
    assert zone["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_nlb_overlay_uses_proxy_protocol_on_both_sides() -> None:
    """The NLB overlay asks AWS for PROXY protocol and turns it on in the balancer's listener."""
    overlay = KUBE / "overlays" / "aws-nlb-proxy-protocol"
    text = (overlay / "kustomization.yaml").read_text()
    assert 'aws-load-balancer-proxy-protocol: "*"' in text
    assert yaml.safe_load(config_text(overlay))["listeners"][0]["proxy_protocol"] is True


READINESS_GATE = "elbv2.k8s.aws/pod-readiness-gate-inject"


def test_nlb_overlay_gates_readiness_on_the_target_group() -> None:
    """ip targets: the NLB takes a minute or more to see a new pod healthy, Kubernetes seconds to call it ready, so
    without the AWS Load Balancer Controller's readiness gate a rolling update of the balancers ended (the old
    targets draining) before any new target was healthy.  The overlay labels the namespace for the gate."""
    overlay = KUBE / "overlays" / "aws-nlb-proxy-protocol"
    text = (overlay / "kustomization.yaml").read_text()
    assert "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type: ip" in text
    kustomization = yaml.safe_load(text)
    namespace = yaml.safe_load((KUBE / "base" / "kustomization.yaml").read_text())["namespace"]
    patched = [yaml.safe_load(p["patch"]) for p in kustomization.get("patches", []) if "target" not in p]
    labels = [p["metadata"].get("labels", {}) for p in patched
              if p.get("kind") == "Namespace" and p["metadata"]["name"] == namespace]
    assert labels and labels[0].get(READINESS_GATE) == "enabled", "the NLB overlay's namespace has no readiness gate"
    kubectl = shutil.which("kubectl")
    if kubectl is not None:  # and kustomize applies it (a JSON patch's `add` of /metadata/labels would drop the rest)
        built = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0, built.stderr
        [built_namespace] = [r for r in load_all(built.stdout) if r["kind"] == "Namespace"]
        assert built_namespace["metadata"]["labels"][READINESS_GATE] == "enabled"
        assert "app.kubernetes.io/part-of" in built_namespace["metadata"]["labels"]


def test_containerfile_is_slim_non_root_uvloop_lb_run() -> None:
    """SPEC deployment: the container build uses slim images, runs as a non-root user, ships uvloop, and
    starts `lb run --config /etc/lb/lb.yaml`."""
    text = (DEPLOY / "Containerfile").read_text()
    # FROM ${BASE}: the base is an ARG (make image swaps in a local one); its default is what ships.
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    stages = [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image) for image in re.findall(r"^FROM (\S+)", text, re.M)]
    assert stages and all("slim" in image for image in stages)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert "uvloop" in text
    assert 'ENTRYPOINT ["lb"]' in text and 'CMD ["run", "--config", "/etc/lb/lb.yaml"]' in text


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether `.dockerignore`'s `patterns` leave `path` (relative to the context) out, as podman and docker read
    them: a pattern matches a path or any of its parents; `*` and `?` stay within one name, `**/` spans names."""
    def regex(pattern: str) -> re.Pattern[str]:
        parts = re.split(r"(\*\*/|\*|\?)", pattern.strip("/"))
        table = {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(table.get(part, re.escape(part)) for part in parts))

    compiled = [regex(p) for p in patterns]
    names = path.split("/")
    return any(r.fullmatch("/".join(names[:n])) for n in range(1, len(names) + 1) for r in compiled)


def test_the_build_context_leaves_out_secrets_and_caches_and_keeps_what_the_image_copies() -> None:
    """`podman build -f deploy/Containerfile .` (the README's command) and `docker build` read `.dockerignore`
    from the context's root: without it they sent the whole checkout, .venv, .git, `.dev/secrets.env` and
    the dev CA's key among it, to the builder (366 MB after `make run`)."""
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "an exception would need the rules above re-read"
    for secret in (".dev/secrets.env", "certs/ca.key", "certs/server.key", ".venv/bin/python", ".git/config",
                   "lb/__pycache__/cli.cpython-311.pyc", "lb/http/_render.cpython-311-x86_64-linux-gnu.so"):
        assert _ignored(secret, patterns), f"{secret} is sent to the image builder"
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (DEPLOY / "Containerfile").read_text(), re.M)
    tracked = subprocess.run(["git", "ls-files", *" ".join(copied).split()], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked, "git ls-files named none of the Containerfile's sources"
    left_out = [path for path in tracked if _ignored(path, patterns)]
    assert not left_out, f"the Containerfile copies {left_out[:5]}, which .dockerignore leaves out"


def test_image_build_stage_installs_every_source_build_native_compiles(tmp_path: Path) -> None:
    """The Containerfile's build stage pip-installs a copy of the checkout, then compiles the installed package
    (`build_native.py --require --into`): the wheel must hold every source build_native compiles, .c included."""
    import build_native

    src = tmp_path / "src"
    src.mkdir()
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (DEPLOY / "Containerfile").read_text(), re.M)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so", "*.partial", "_native.json")
    for name in " ".join(copied).split():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         "."],
        cwd=src, capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    missing = [path for path in build_native.sources() + build_native.c_sources() if path not in names]
    assert not missing, f"pyproject's package-data leaves out {missing}: the image's build_native --require fails"
    assert build_native.digests(site) == build_native.digests(ROOT)


def _seconds(text: str) -> float:
    from lb.config.durations import parse_duration

    return parse_duration(text)
