"""kubernetes/base and kubernetes/overlays/*: each builds with `kubectl kustomize`, every object
validates offline against Kubernetes' OpenAPI schemas (kubernetes-validate, strict: unknown
fields are errors), and the rendered objects hold what kubernetes/README.md promises: the
security contexts, the probes, the shared state directory, the node-local probe targets, the
labels, ports and images the other parts of the project rely on.

The container arguments are read by the programs' own configuration loaders (exporter/config.py,
inference/config.py, notifier/config.py), so a flag that does not exist, or a path that differs
between the exporter and the inference process, fails here rather than on a cluster. The
notifier's Service is checked against the webhook URLs of the generated
kubernetes/prometheus-operator/alertmanagerconfig.yaml, read from that file.

Schemas: Kubernetes 1.37, the newest release kubernetes-validate carries, and 1.35, the oldest
still maintained upstream when this was written (November 2026; the project maintains release
branches for the three most recent minor releases: https://kubernetes.io/releases/).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from exporter.config import load_config as load_exporter_config
from inference.config import load_config as load_inference_config
from notifier.config import OPTIONS as NOTIFIER_OPTIONS
from notifier.config import ConfigError as NotifierConfigError
from notifier.config import load_config as load_notifier_config
from notifier.server import WEBHOOKS
from vigil.engines import parse_target

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "kubernetes"
KUBECTL = shutil.which("kubectl")
BUILDS = (
    "base",
    "overlays/inference",
    "overlays/cpu",
    "overlays/vllm",
    "overlays/sglang",
    "overlays/vllm-sglang",
)
WITH_INFERENCE = ("overlays/inference", "overlays/cpu")
WITH_GPU = tuple(name for name in BUILDS if name != "overlays/cpu")
# The engines each build's exporter probes (--target ENGINE=URL), one node-local probe Service each.
TARGET_ENGINES = {
    "base": set(),
    "overlays/inference": {"vigil"},
    "overlays/cpu": {"vigil"},
    "overlays/vllm": {"vllm"},
    "overlays/sglang": {"sglang"},
    "overlays/vllm-sglang": {"vllm", "sglang"},
}
# The engines' default ports: vLLM's --port, SGLang's --port (the probe Services' comments).
ENGINE_PORTS = {"vllm": 8000, "sglang": 30000}
PODMONITORS = KUBERNETES / "prometheus-operator" / "podmonitors.yaml"
README = KUBERNETES / "README.md"
SERVING_NODES = {"llm-vigil.io/serving": "true"}
SCHEMA_VERSIONS = ("1.35.0", "1.37.0")
NAMESPACE = "llm-vigil"
# Pods are reached on their IP (the kubelet's probes, Prometheus, the Service).
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - a value compared, nothing bound
# The labels kubernetes/prometheus-operator/ (PodMonitors) and the dashboards select on.
POD_LABELS = {"app.kubernetes.io/name": "llm-vigil", "app.kubernetes.io/part-of": "llm-vigil"}
COMPONENTS = {"exporter", "inference", "notifier"}
# The notifier runs from the exporter's image (the light install), as compose runs it.
IMAGES = {
    "exporter": "llm-vigil-exporter",
    "inference": "llm-vigil-inference",
    "notifier": "llm-vigil-exporter",
}
COMMANDS = {
    "exporter": "vigil-exporter",
    "inference": "vigil-inference",
    "notifier": "vigil-notifier",
}
ALERTMANAGER_CONFIG = KUBERNETES / "prometheus-operator" / "alertmanagerconfig.yaml"
# The one container that runs as root, and the capability it holds (kubernetes/README.md).
ROOT_CONTAINERS = {"state-dir-owner": ["CHOWN"]}
# Capabilities any other container may add: ptrace, for py-spy's stack dumps of a foreign engine.
# NVML needs none.
ALLOWED_CAPABILITIES = {"SYS_PTRACE"}
WORKLOADS = {"DaemonSet", "Deployment"}

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not installed: it renders the Kustomize builds"
)


@functools.cache
def _build(name: str) -> tuple[dict, ...]:
    done = subprocess.run(
        [KUBECTL, "kustomize", str(KUBERNETES / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"kubectl kustomize {name}: {done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def build(name: str) -> list[dict]:
    return list(_build(name))


def workloads(objects: list[dict]) -> dict[str, dict]:
    """component -> the DaemonSet or Deployment that runs it."""
    found = {}
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            component = obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            assert component not in found, f"two workloads for {component}"
            found[component] = obj
    return found


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def main_container(workload: dict) -> dict:
    (container,) = pod_spec(workload)["containers"]
    return container


def all_containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def environ(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def exporter_config(objects: list[dict]):
    container = main_container(workloads(objects)["exporter"])
    assert container["command"] == ["vigil-exporter"]
    return load_exporter_config(container["args"], environ(container))


def inference_config(objects: list[dict]):
    container = main_container(workloads(objects)["inference"])
    assert container["command"] == ["vigil-inference"]
    return load_inference_config(container["args"], environ(container))


def notifier_config(objects: list[dict]):
    container = main_container(workloads(objects)["notifier"])
    assert container["command"] == ["vigil-notifier"]
    return load_notifier_config(container["args"], environ(container))


def host_path_mount(workload: dict, container: dict) -> tuple[str, str]:
    """(mount path in the container, node path) of the container's one hostPath volume."""
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    found = [
        (mount["mountPath"], volumes[mount["name"]]["hostPath"]["path"])
        for mount in container["volumeMounts"]
        if "hostPath" in volumes[mount["name"]]
    ]
    assert len(found) == 1, f"{container['name']}: hostPath mounts {found}"
    return found[0]


# -- building and validating ----------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", BUILDS)
def test_each_build_renders_our_objects_and_no_custom_resource(name):
    objects = build(name)
    kinds = {obj["kind"] for obj in objects}
    assert {"Namespace", "DaemonSet", "Deployment", "Service"} <= kinds
    # Never a Secret: the notifier's robots and their secrets are the operator's, created apart.
    assert "Secret" not in kinds
    # The Prometheus Operator's resources are kubernetes/prometheus-operator/'s, applied on
    # their own (they need its CRDs); these builds hold core kinds only.
    groups = {obj["apiVersion"].rpartition("/")[0] for obj in objects}
    assert groups <= {"", "apps", "policy"}, groups


@needs_kubectl
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("name", BUILDS)
def test_every_object_validates_against_the_kubernetes_schemas(name, version):
    for obj in build(name):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(
                f"{name}: {obj['kind']}/{obj['metadata']['name']} at {where}: {exc.message}"
            )


@needs_kubectl
def test_the_validator_rejects_a_field_the_schema_lacks():
    """The validation above is strict: a misspelt field of a rendered object is an error."""
    daemonset = next(o for o in build("base") if o["kind"] == "DaemonSet")
    spoiled = yaml.safe_load(yaml.safe_dump(daemonset))
    main_container(spoiled)["readinesProbe"] = {"httpGet": {"path": "/", "port": 9400}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(spoiled, SCHEMA_VERSIONS[-1], strict=True)


# -- namespace, labels, images ----------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", BUILDS)
def test_the_namespace_is_ours_and_admits_the_exporter(name):
    objects = build(name)
    (namespace,) = [o for o in objects if o["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == NAMESPACE
    # hostPID and hostPath are refused by the Baseline level (Pod Security Standards).
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for obj in objects:
        if obj["kind"] == "Namespace":
            continue
        if obj["kind"] == "Service" and obj["metadata"]["name"] in ENGINE_SERVICES:
            continue  # in the engine's namespace: test_targets_reach_only_the_pod_on_the_node
        assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]


ENGINE_SERVICES = {"llm-vigil-vllm-probe", "llm-vigil-sglang-probe"}


@needs_kubectl
@pytest.mark.parametrize("name", BUILDS)
def test_pod_templates_carry_the_contract_labels_images_and_no_service_links(name):
    for component, workload in workloads(build(name)).items():
        assert component in COMPONENTS
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert POD_LABELS.items() <= labels.items()
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        spec = pod_spec(workload)
        assert main_container(workload)["command"] == [COMMANDS[component]]
        # Service links would inject VIGIL_<SERVICE>_* variables, which the programs refuse.
        assert spec["enableServiceLinks"] is False
        for container in all_containers(workload):
            image, _, tag = container["image"].partition(":")
            assert image == IMAGES[component], container["image"]
            assert tag in ("local", "local-cpu"), container["image"]
            # kind load / a pushed tag: never pulled again once on the node.
            assert container["imagePullPolicy"] == "IfNotPresent"


def test_the_commands_are_the_installed_programs():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(COMMANDS.values()) <= scripts.keys()
    for image in IMAGES.values():
        dockerfile = image.removeprefix("llm-vigil-")
        assert (REPO / "compose" / f"{dockerfile}.Dockerfile").is_file()
    # The notifier's image is the exporter's: its build installs the notifier package too.
    light = REPO / "compose" / f"{IMAGES['notifier'].removeprefix('llm-vigil-')}.Dockerfile"
    assert "COPY notifier ./notifier" in light.read_text()


# -- security contexts ---------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", BUILDS)
def test_security_contexts(name):
    for component, workload in workloads(build(name)).items():
        spec = pod_spec(workload)
        # The exporter shares the node's pid namespace (procview.py); nothing else does.
        assert spec.get("hostPID", False) is (component == "exporter")
        assert not spec.get("hostNetwork", False) and not spec.get("hostIPC", False)
        pod = spec["securityContext"]
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001
        for container in all_containers(workload):
            context = container["securityContext"]
            where = f"{name} {component}/{container['name']}"
            assert context.get("privileged", False) is False, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert "seccompProfile" not in context, where  # the pod's RuntimeDefault holds
            capabilities = context["capabilities"]
            assert capabilities["drop"] == ["ALL"], where
            added = capabilities.get("add", [])
            if container["name"] in ROOT_CONTAINERS:
                assert context["runAsNonRoot"] is False and context["runAsUser"] == 0, where
                assert added == ROOT_CONTAINERS[container["name"]], where
                assert container["command"][0] == "chown", where
            else:
                assert context["runAsNonRoot"] is True, where
                assert "runAsUser" not in context, where  # the pod's uid 10001
                assert set(added) <= ALLOWED_CAPABILITIES, where


_FLOW_ADD = re.compile(r"^\s*add:\s*\[([^\]]*)\]")
_BLOCK_ADD = re.compile(r"^\s*add:\s*$")


def test_each_added_capability_is_explained_where_it_is_added():
    """Every `add: [CAP, ...]` of a securityContext names each CAP with its reason in a comment
    (`# CAP: why`) on the same or the preceding line."""
    sources = sorted((KUBERNETES / "base").rglob("*.yaml")) + sorted(
        (KUBERNETES / "overlays").rglob("*.yaml")
    )
    seen = set()
    for path in sources:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            assert not _BLOCK_ADD.match(line), f"{path}:{number + 1}: write add: [CAP] on one line"
            match = _FLOW_ADD.match(line)
            if not match:
                continue
            context = line + "\n" + (lines[number - 1] if number else "")
            for cap in (c.strip().strip("'\"") for c in match.group(1).split(",")):
                if cap:
                    seen.add(cap)
                    assert re.search(rf"#.*\b{cap}: \w+", context), f"{path}:{number + 1}: {cap}"
    assert seen == {"CHOWN"}  # the state-dir-owner init containers; nothing else adds any


# -- the exporter and the inference process -----------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", BUILDS)
def test_the_exporter_listens_for_prometheus_and_reads_the_node_state_directory(name):
    objects = build(name)
    exporter = workloads(objects)["exporter"]
    container = main_container(exporter)
    config = exporter_config(objects)
    assert (config.host, config.port) == (ALL_INTERFACES, 9400)
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    mount, node_path = host_path_mount(exporter, container)
    assert config.state_dir == mount
    # The init container hands the same node directory to uid 10001.
    (init,) = pod_spec(exporter)["initContainers"]
    assert host_path_mount(exporter, init) == (mount, node_path)
    assert init["command"][-1] == mount


@needs_kubectl
@pytest.mark.parametrize("name", WITH_INFERENCE)
def test_the_exporter_and_the_inference_process_share_one_node_directory(name):
    objects = build(name)
    found = workloads(objects)
    exporter_mount = host_path_mount(found["exporter"], main_container(found["exporter"]))
    inference_mount = host_path_mount(found["inference"], main_container(found["inference"]))
    assert exporter_mount[1] == inference_mount[1]  # the same directory on the node
    assert exporter_config(objects).state_dir == exporter_mount[0]
    assert inference_config(objects).state_dir == inference_mount[0]
    # One inference pod per node: its pid (1) names its files in that directory.
    (term,) = pod_spec(found["inference"])["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    labels = found["inference"]["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()


@needs_kubectl
@pytest.mark.parametrize("name", WITH_INFERENCE)
def test_the_inference_probes_cover_the_model_load(name):
    objects = build(name)
    inference = workloads(objects)["inference"]
    container = main_container(inference)
    config = inference_config(objects)
    assert (config.host, config.port) == (ALL_INTERFACES, 8000)
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    probes = {kind: container[f"{kind}Probe"] for kind in ("liveness", "readiness", "startup")}
    assert probes["liveness"]["httpGet"] == {"path": "/health", "port": "http"}
    assert probes["readiness"]["httpGet"] == {"path": "/ready", "port": "http"}
    # /health is 200 while the model loads; /ready only once it is loaded. The startup probe
    # outlasts --load-timeout so that the watchdog declares an overdue load (stack dump, exit 75)
    # before the kubelet kills the container.
    startup = probes["startup"]
    assert startup["httpGet"] == {"path": "/ready", "port": "http"}
    assert startup["failureThreshold"] * startup["periodSeconds"] > config.load_timeout
    # The watchdog exits on a stall and the container is restarted.
    assert config.on_stall == "exit"
    assert pod_spec(inference).get("restartPolicy", "Always") == "Always"


def services_of(objects: list[dict]) -> dict[tuple[str, str], dict]:
    """(name, namespace) -> Service."""
    return {
        (o["metadata"]["name"], o["metadata"]["namespace"]): o
        for o in objects
        if o["kind"] == "Service"
    }


def target_service(objects: list[dict], url: str) -> dict:
    """The Service of this build that a --target URL's host names (NAME.NAMESPACE.svc)."""
    service_name, namespace, svc = urlsplit(url).hostname.split(".")
    assert svc == "svc", url
    return services_of(objects)[service_name, namespace]


def selects(service: dict, labels: dict) -> bool:
    return service["spec"]["selector"].items() <= labels.items()


@needs_kubectl
@pytest.mark.parametrize("name", BUILDS)
def test_targets_reach_the_pod_on_the_node_ready_or_not(name):
    """Each --target names a Service of the build that is node-local (the pod of the
    exporter's own node) and publishes not-ready addresses: a pod loading its model or stalled
    (/ready 503, out of every ready-only Service) still answers the probe with /health 200 and
    /ready 503 instead of no endpoint at all (InferenceTargetDown on every start)."""
    objects = build(name)
    found = workloads(objects)
    exporter_spec = pod_spec(found["exporter"])
    targets = [parse_target(text) for text in exporter_config(objects).target]
    assert {target.engine for target in targets} == TARGET_ENGINES[name]
    assert len(targets) == len(TARGET_ENGINES[name])
    if name == "base":
        assert "nodeSelector" not in exporter_spec  # every GPU node, by the base's affinity
        return
    probed = set()
    for target in targets:
        service = target_service(objects, target.url)
        probed.add(service["metadata"]["name"])
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert service["spec"]["internalTrafficPolicy"] == "Local"
        assert service["spec"]["publishNotReadyAddresses"] is True
        (port,) = service["spec"]["ports"]
        assert port["port"] == target.port
        if target.engine == "vigil":
            inference = found["inference"]
            assert selects(service, inference["spec"]["template"]["metadata"]["labels"])
            (container_port,) = main_container(inference)["ports"]
            assert port["targetPort"] in (container_port["name"], container_port["containerPort"])
            assert pod_spec(inference)["nodeSelector"] == exporter_spec["nodeSelector"]
        else:
            # The label the PodMonitors of kubernetes/prometheus-operator/ select engine pods by.
            assert service["spec"]["selector"] == {"llm-vigil.io/engine": target.engine}
            assert port["targetPort"] == ENGINE_PORTS[target.engine]
    assert len(probed) == len(targets)  # one probe Service per engine
    # Only probe Services publish not-ready addresses: a client must never reach a pod that
    # is not ready.
    for (service_name, _), service in services_of(objects).items():
        assert bool(service["spec"].get("publishNotReadyAddresses")) is (service_name in probed), (
            service_name
        )
    # Exporters only where the watched server runs: elsewhere the probe would find no endpoint.
    assert exporter_spec["nodeSelector"] == SERVING_NODES


@needs_kubectl
@pytest.mark.parametrize("name", WITH_INFERENCE)
def test_clients_keep_a_ready_only_service_on_every_node(name):
    """llm-vigil-inference, the clients' Service, routes to ready pods only, from any node; the
    exporter's probe Service is another one over the same pods."""
    objects = build(name)
    found = workloads(objects)
    labels = found["inference"]["spec"]["template"]["metadata"]["labels"]
    over_inference = {
        key: service for key, service in services_of(objects).items() if selects(service, labels)
    }
    client = over_inference.pop(("llm-vigil-inference", NAMESPACE))
    assert "publishNotReadyAddresses" not in client["spec"]
    assert "internalTrafficPolicy" not in client["spec"]  # Cluster, the default: any node
    assert client["spec"].get("type", "ClusterIP") == "ClusterIP"
    ((probe_name, _),) = over_inference  # the other one is the exporter's
    (target,) = exporter_config(objects).target
    assert urlsplit(parse_target(target).url).hostname.split(".")[0] == probe_name
    assert probe_name != "llm-vigil-inference"


@needs_kubectl
@pytest.mark.parametrize("name", [n for n in BUILDS if TARGET_ENGINES[n] - {"vigil"}])
def test_engine_probe_services_and_podmonitors_agree_on_the_port(name):
    """The PodMonitors keep only pods whose container declares their portNumber; the probe
    Service reaches the same port; kubernetes/README.md tells the engine to declare it."""
    monitors = {
        doc["spec"]["selector"]["matchLabels"]["llm-vigil.io/engine"]: doc
        for doc in yaml.safe_load_all(PODMONITORS.read_text())
        if doc and "llm-vigil.io/engine" in doc["spec"]["selector"].get("matchLabels", {})
    }
    section = readme_section("Watching vLLM or SGLang")
    objects = build(name)
    for text in exporter_config(objects).target:
        target = parse_target(text)
        # Every endpoint (the normal one and the 2 s one for the hang series) scrapes that port.
        endpoints = monitors[target.engine]["spec"]["podMetricsEndpoints"]
        assert endpoints
        (port,) = target_service(objects, target.url)["spec"]["ports"]
        for endpoint in endpoints:
            assert endpoint["portNumber"] == port["targetPort"] == ENGINE_PORTS[target.engine]
            assert f"containerPort: {endpoint['portNumber']}" in section, target.engine


def readme_section(title: str) -> str:
    text = README.read_text()
    assert f"\n## {title}\n" in text, title
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_states_the_limits_of_node_local_probing():
    """kubernetes/README.md says what the manifests cannot enforce: replicas equal to the
    labelled nodes, one engine pod per node per probe Service, the combined overlay for both
    engines, and where the base's GPU affinity finds no node."""
    which = " ".join(readme_section("Which nodes").split())
    assert "replicas must equal the number of labelled nodes" in which
    assert "0 pods" in which and "GPU Feature Discovery" in which
    engines = " ".join(readme_section("Watching vLLM or SGLang").split())
    assert "one engine pod per node" in engines
    assert "overlays/vllm-sglang" in engines
    probing = " ".join(readme_section("Probing a server that is not ready").split())
    assert "publishNotReadyAddresses" in probing and "kube-proxy" in probing


# -- GPU and CPU ----------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", WITH_GPU)
def test_on_gpu_nodes_the_exporter_reads_every_gpu_without_taking_one(name):
    objects = build(name)
    exporter = workloads(objects)["exporter"]
    spec = pod_spec(exporter)
    container = main_container(exporter)
    assert exporter_config(objects).gpu_backend == "nvml"
    assert environ(container)["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "nvidia.com/gpu" not in str(container["resources"])
    if name == "base":
        # Every GPU node, as NFD or GPU Feature Discovery labels them.
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        keys = {e["key"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]}
        assert keys == {"feature.node.kubernetes.io/pci-10de.present", "nvidia.com/gpu.present"}
    else:
        # With a target, the labelled nodes only: no affinity on labels that a cluster with
        # the device plugin alone lacks (the DaemonSet would get 0 pods).
        assert "affinity" not in spec
        assert spec["nodeSelector"] == SERVING_NODES
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    if "inference" in workloads(objects):
        inference = main_container(workloads(objects)["inference"])
        assert inference_config(objects).device == "cuda"
        assert inference["resources"]["limits"]["nvidia.com/gpu"] == 1


@needs_kubectl
def test_the_cpu_overlay_needs_no_gpu_anywhere():
    objects = build("overlays/cpu")
    found = workloads(objects)
    assert exporter_config(objects).gpu_backend == "none"
    assert inference_config(objects).device == "cpu"
    assert "affinity" not in pod_spec(found["exporter"])
    assert "NVIDIA_VISIBLE_DEVICES" not in environ(main_container(found["exporter"]))
    for workload in found.values():
        for container in all_containers(workload):
            assert "nvidia.com/gpu" not in str(container.get("resources", {}))
    # The image compose/docker-compose.cpu.yml builds with PyTorch's CPU wheels.
    assert {c["image"] for c in all_containers(found["inference"])} == {
        "llm-vigil-inference:local-cpu"
    }


@needs_kubectl
@pytest.mark.parametrize("name", WITH_INFERENCE)
def test_the_disruption_budget_covers_the_inference_pods_and_lets_a_drain_through(name):
    objects = build(name)
    (budget,) = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    labels = workloads(objects)["inference"]["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # maxUnavailable 1, not minAvailable: a single replica must not block a drain for good.
    assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]


# -- the notifier ----------------------------------------------------------------------------------


def alertmanager_webhook_urls() -> dict[str, str]:
    """receiver name -> webhook URL, as the generated AlertmanagerConfig sends them."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    urls = {}
    for receiver in config["spec"]["receivers"]:
        (webhook,) = receiver["webhookConfigs"]
        urls[receiver["name"]] = webhook["url"]
    return urls


@needs_kubectl
@pytest.mark.parametrize("name", BUILDS)
def test_the_notifier_listens_where_its_probes_and_service_look(name):
    objects = build(name)
    notifier = workloads(objects)["notifier"]
    container = main_container(notifier)
    config = notifier_config(objects)
    assert (config.host, config.port) == (ALL_INTERFACES, 5001)
    assert container["ports"] == [{"name": "http", "containerPort": 5001, "protocol": "TCP"}]
    for kind in ("liveness", "readiness"):
        assert container[f"{kind}Probe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "startupProbe" not in container


@needs_kubectl
@pytest.mark.parametrize("name", BUILDS)
def test_alertmanager_reaches_the_notifier_at_the_generated_urls(name):
    """Every webhook URL of kubernetes/prometheus-operator/alertmanagerconfig.yaml names the
    notifier's Service, namespace, port and one of its webhook paths: renaming either side
    fails here."""
    objects = build(name)
    notifier = workloads(objects)["notifier"]
    labels = notifier["spec"]["template"]["metadata"]["labels"]
    container = main_container(notifier)
    urls = alertmanager_webhook_urls()
    paths = {}
    for receiver, url in urls.items():
        parts = urlsplit(url)
        assert parts.scheme == "http", url
        service_name, namespace, svc = parts.hostname.split(".")
        assert svc == "svc", url
        (service,) = [
            o
            for o in objects
            if o["kind"] == "Service"
            and (o["metadata"]["name"], o["metadata"]["namespace"]) == (service_name, namespace)
        ]
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert "internalTrafficPolicy" not in service["spec"]  # any node's Alertmanager
        assert service["spec"]["selector"].items() <= labels.items()
        for component, other in workloads(objects).items():  # the notifier's pods only
            other_labels = other["spec"]["template"]["metadata"]["labels"]
            assert (component == "notifier") is (
                service["spec"]["selector"].items() <= other_labels.items()
            )
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == parts.port]
        (target,) = [
            p for p in container["ports"] if port["targetPort"] in (p["name"], p["containerPort"])
        ]
        assert target["containerPort"] == notifier_config(objects).port
        paths[receiver] = WEBHOOKS[parts.path]  # KeyError: a path the notifier does not serve
    # The dead man's switch route posts to /watchdog, everything else to /alerts.
    assert paths == {"webhook": "alerts", "deadmansswitch": "watchdog"}


@needs_kubectl
@pytest.mark.parametrize("name", BUILDS)
def test_one_notifier_anywhere_with_its_secrets_from_an_optional_secret(name):
    notifier = workloads(build(name))["notifier"]
    spec = pod_spec(notifier)
    container = main_container(notifier)
    # Two would each run a dead man's switch (one alarming for the Watchdogs the other got)
    # and print and relay a notification Alertmanager retried twice; a rollout stops the old
    # pod before it starts the new one.
    assert notifier["spec"]["replicas"] == 1
    assert notifier["spec"]["strategy"] == {"type": "Recreate"}
    assert spec["automountServiceAccountToken"] is False
    # No GPU and no node state: any node.
    for field in ("nodeSelector", "affinity", "tolerations", "volumes", "runtimeClassName"):
        assert field not in spec, field
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert "NVIDIA_VISIBLE_DEVICES" not in environ(container)
    # Webhooks and secrets only from the Secret, which may be absent (printing only).
    assert container["envFrom"] == [{"secretRef": {"name": "llm-vigil-notifier", "optional": True}}]
    assert not [item for item in container.get("env", []) if item["name"].startswith("VIGIL_")]


def test_the_notifier_variables_the_manifests_and_readme_name_exist():
    """The Secret's keys shown in notifier-deployment.yaml and kubernetes/README.md are
    variables the notifier's loader knows; an unknown VIGIL_NOTIFIER_* key stops it at start."""
    known = {option.env for option in NOTIFIER_OPTIONS}
    for path in (KUBERNETES / "base" / "notifier-deployment.yaml", KUBERNETES / "README.md"):
        named = set(re.findall(r"\bVIGIL_NOTIFIER_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
        assert named, path
        assert named <= known, (path, named - known)
        # The example names both robots' webhook and secret.
        assert {
            f"VIGIL_NOTIFIER_{tool}_{what}"
            for tool in ("DINGTALK", "FEISHU")
            for what in ("WEBHOOK", "SECRET")
        } <= named, path
    with pytest.raises(NotifierConfigError, match="VIGIL_NOTIFIER_DINGTALK_WEBHOK"):
        load_notifier_config([], {"VIGIL_NOTIFIER_DINGTALK_WEBHOK": "https://example.com/x"})
