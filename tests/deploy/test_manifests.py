"""Every kustomization builds, validates strictly, and agrees with the code it deploys.

- Core kinds validate offline against the Kubernetes OpenAPI schemas in strict mode
  (``kubernetes-validate``: unknown fields are errors), for the oldest Kubernetes with
  native sidecars on by default (1.29) and the newest the package ships.
- The custom resources validate against ``crd_schemas``.
- The sidecar's args parse with ``sidecar.settings.load_settings``, the EPP's with
  ``epp.settings.parse_args``, and the EndpointPickerConfig each EPP mounts loads with
  ``epp.config.load_config``: a renamed flag or plugin breaks these tests, not a rollout.
- The objects reference each other consistently (pool -> pods and EPP, route -> pool).
"""

from __future__ import annotations

import copy
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from epp.config import ConfigError, load_config
from epp.settings import EppSettings, parse_args
from sidecar.settings import Settings, SettingsError, load_settings
from tests.deploy.crd_schemas import CRD_SCHEMAS
from tests.deploy.kube import Built, Container, build, containers, kustomizations, mounted_file
from tests.deploy.kube import resolve_args as resolve

KUSTOMIZATIONS = kustomizations()
# Kubernetes 1.29 turned native sidecars (restartPolicy: Always init containers) on by
# default; the newest version is the one kubernetes-validate ships.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
ROLES = {"decode", "prefill", "encode", "prefill-decode", "encode-prefill", "encode-prefill-decode"}
ROLE_LABEL = "llm-d.ai/role"


def _dirs_with(kind: str) -> list[str]:
    return [d for d in KUSTOMIZATIONS if build(d).of_kind(kind)]


def _programs(built: Built, program: str) -> list[Container]:
    return [c for c in containers(built) if c.program == program]


def _port(container: Container, port: int | str) -> int:
    if isinstance(port, int):
        return port
    for item in container.spec.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise AssertionError(f"{container.where}: no port named {port}")


def _sidecar_settings(
    built: Built, container: Container, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    # load_settings also reads PD_SIDECAR_* and INFERENCE_POOL_*: give it exactly the
    # container's environment.
    import os

    for name in list(os.environ):
        if name.startswith(("PD_SIDECAR_", "INFERENCE_POOL_")):
            monkeypatch.delenv(name)
    for item in container.spec.get("env") or []:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    return load_settings(resolve(built, container))


def _epp_settings(
    built: Built, container: Container, capsys: pytest.CaptureFixture[str]
) -> EppSettings:
    try:
        return parse_args(resolve(built, container))
    except SystemExit as exc:
        raise AssertionError(
            f"{container.where}: epp rejects its args: {capsys.readouterr().err}"
        ) from exc


def test_every_example_and_manifest_directory_is_built() -> None:
    assert {"manifests/base", "examples/pd-nixl", "examples/epd", "examples/standalone"} <= set(
        KUSTOMIZATIONS
    )


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_builds_into_one_namespace(directory: str) -> None:
    built = build(directory)
    assert built.objects, directory
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    namespaced = [o for o in built.objects if o["kind"] not in cluster_scoped]
    namespaces = {o["metadata"].get("namespace") for o in namespaced}
    if directory == "manifests/gateway":
        assert namespaces == {None}  # a component: its user sets the namespace
        return
    assert len(namespaces) == 1 and None not in namespaces, namespaces
    for ns in built.of_kind("Namespace"):
        assert ns["metadata"]["name"] in namespaces


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_core_objects_validate_strictly(directory: str, version: str) -> None:
    for obj in build(directory).objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
            continue
        where = f"{directory}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no schema for {obj['apiVersion']} {obj['kind']}")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'/'.join(map(str, exc.path))}")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_custom_resources_validate(directory: str) -> None:
    for obj in build(directory).objects:
        schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if schema is None:
            continue
        errors = sorted(
            jsonschema.Draft202012Validator(schema).iter_errors(obj), key=lambda e: list(e.path)
        )
        assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_strict_validation_rejects_a_misspelt_field() -> None:
    # The negative control: the validators above do fail on typos.
    decode = copy.deepcopy(build("manifests/base").get("Deployment", "disagg-decode"))
    decode["spec"]["template"]["spec"]["initContainers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(decode, K8S_VERSIONS[0], strict=True)
    pool = copy.deepcopy(build("manifests/base").of_kind("InferencePool")[0])
    pool["spec"]["targetPortNumber"] = 8000
    schema = CRD_SCHEMAS[("inference.networking.k8s.io/v1", "InferencePool")]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, schema)


# -- the sidecar ------------------------------------------------------------------------

SIDECAR_DIRS = [d for d in _dirs_with("Deployment") if _programs(build(d), "pd-sidecar")]


@pytest.mark.parametrize("directory", SIDECAR_DIRS)
def test_sidecar_args_parse_with_the_sidecar_cli(
    directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build(directory)
    for container in _programs(built, "pd-sidecar"):
        settings = _sidecar_settings(built, container, monkeypatch)
        pod = container.pod
        engines = [c for c in pod["containers"] if c["name"] == "vllm"]
        assert len(engines) == 1, container.where
        engine_args = resolve(built, Container(container.workload, engines[0], init=False))
        assert f"--port={settings.model_server_port}" in engine_args, container.where


def test_sidecar_arg_check_rejects_bad_args(monkeypatch: pytest.MonkeyPatch) -> None:
    built = build("manifests/base")
    (container,) = _programs(built, "pd-sidecar")
    bad = copy.deepcopy(container.spec)
    bad["args"] = [*bad["args"], "--kv-connector=nixl"]
    with pytest.raises(SettingsError, match="kv-connector"):
        _sidecar_settings(built, Container(container.workload, bad, init=True), monkeypatch)


@pytest.mark.parametrize("directory", [d for d in SIDECAR_DIRS if isinstance(d, str)])
def test_decode_pods_run_the_sidecar_as_a_native_sidecar(
    directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build(directory)
    for container in _programs(built, "pd-sidecar"):
        assert container.init and container.spec.get("restartPolicy") == "Always", container.where
        labels = container.workload["spec"]["template"]["metadata"]["labels"]
        assert labels[ROLE_LABEL] in {"decode", "prefill-decode", "encode-prefill-decode"}
        settings = _sidecar_settings(built, container, monkeypatch)
        ready = container.spec["readinessProbe"]["httpGet"]
        live = container.spec["livenessProbe"]["httpGet"]
        assert ready["path"] == "/ready" and _port(container, ready["port"]) == settings.port
        assert live["path"] == "/health" and _port(container, live["port"]) == settings.port
        ports = {int(p["containerPort"]) for p in container.spec["ports"]}
        assert {settings.port, settings.metrics_port} <= ports


# -- the EPP ----------------------------------------------------------------------------

EPP_DIRS = [d for d in _dirs_with("Deployment") if _programs(build(d), "epp")]


@pytest.mark.parametrize("directory", EPP_DIRS)
def test_epp_args_parse_and_its_config_loads(
    directory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    built = build(directory)
    (container,) = _programs(built, "epp")
    settings = _epp_settings(built, container, capsys)
    assert settings.config_file is not None, "the EPP must load its ConfigMap, not the default"
    text = mounted_file(built, container, settings.config_file)
    config = load_config(config_text=text, pool_configured=settings.pool_name is not None)
    # The profiles a P/D deployment needs are there.
    assert {"decode", "prefill"} <= set(config.scheduler.profiles)
    # The probes ask the EPP's health service on the port it serves it on, by the names
    # llm-d's chart uses: "inference-extension" for one replica, liveness/readiness with
    # leader election.
    replicas = int(container.workload["spec"].get("replicas", 1))
    names = ("liveness", "readiness") if replicas > 1 else ("inference-extension",) * 2
    for probe, service in zip(("livenessProbe", "readinessProbe"), names, strict=True):
        grpc = container.spec[probe]["grpc"]
        assert grpc == {"port": settings.grpc_health_port, "service": service}
    assert settings.ha_enable_leader_election == (replicas > 1)
    ports = {p["name"]: int(p["containerPort"]) for p in container.spec["ports"]}
    assert ports == {
        "grpc": settings.grpc_port,
        "grpc-health": settings.grpc_health_port,
        "metrics": settings.metrics_port,
    }


# The args, environment and probes llm-d's chart (routerlib _deployment.yaml) gives the
# EPP container for one replica in InferencePool mode, tracing off, metrics auth on.
CHART_ARGS = [
    "--pool-name", "<pool>", "--pool-namespace", "$(NAMESPACE)",
    "--pool-group", "inference.networking.k8s.io", "--zap-encoder", "json",
    "--config-file", "/config/<file>", "--grpc-health-port", "9003", "--tracing=false",
]  # fmt: skip
CHART_ENV = {"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}


@pytest.mark.parametrize("directory", EPP_DIRS)
def test_epp_starts_as_llm_ds_chart_starts_it(directory: str) -> None:
    built = build(directory)
    (container,) = _programs(built, "epp")
    args = list(container.spec["args"])
    pool = built.of_kind("InferencePool")[0]["metadata"]["name"]
    config_file = args[args.index("--config-file") + 1]
    assert config_file.startswith("/config/")
    expected = [
        a.replace("<pool>", pool).replace("/config/<file>", config_file) for a in CHART_ARGS
    ]
    assert args == expected, container.where
    env = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container.spec["env"]
        if "valueFrom" in e
    }
    assert CHART_ENV.items() <= env.items()
    assert container.workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 130
    assert container.spec["livenessProbe"]["initialDelaySeconds"] == 5
    assert container.spec["livenessProbe"]["periodSeconds"] == 10
    assert container.spec["readinessProbe"]["periodSeconds"] == 2
    # --metrics-endpoint-auth is on (the chart's default): the EPP may review tokens.
    rules = [
        rule
        for role in built.of_kind("ClusterRole")
        for rule in role["rules"]
        if "authentication.k8s.io" in rule.get("apiGroups", ())
        or "authorization.k8s.io" in rule.get("apiGroups", ())
    ]
    assert {r["resources"][0] for r in rules} == {"tokenreviews", "subjectaccessreviews"}
    sa = container.workload["spec"]["template"]["spec"]["serviceAccountName"]
    bound = [
        b for b in built.of_kind("ClusterRoleBinding")
        if any(s["name"] == sa and s.get("namespace") == container.workload["metadata"]["namespace"]
               for s in b["subjects"])
    ]  # fmt: skip
    assert bound, f"{directory}: the EPP's service account cannot create TokenReviews"


@pytest.mark.parametrize("directory", _dirs_with("ConfigMap"))
def test_every_endpoint_picker_config_in_a_configmap_loads(directory: str) -> None:
    found = 0
    for cm in build(directory).of_kind("ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            doc = yaml.safe_load(text) if key.endswith((".yaml", ".yml", ".json")) else None
            if isinstance(doc, dict) and doc.get("kind") == "EndpointPickerConfig":
                load_config(config_text=text, pool_configured=True)
                found += 1
    if any(c.program == "epp" for c in containers(build(directory))):
        assert found == 1, f"{directory}: expected one EndpointPickerConfig, found {found}"


@pytest.mark.parametrize("directory", _dirs_with("Deployment"))
def test_images_are_pinned(directory: str) -> None:
    for container in containers(build(directory)):
        image = container.spec["image"]
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), (container.where, image)


def test_epp_config_check_rejects_a_bad_config() -> None:
    built = build("manifests/base")
    (container,) = _programs(built, "epp")
    text = mounted_file(built, container, "/config/config.yaml")
    broken = text.replace("prefix-based-pd-decider", "prefix-based-decider", 1)
    assert broken != text
    with pytest.raises(ConfigError, match="prefix-based-decider"):
        load_config(config_text=broken, pool_configured=True)


def test_epd_config_has_the_encode_stage() -> None:
    built = build("examples/epd")
    (container,) = _programs(built, "epp")
    text = mounted_file(built, container, "/config/config.yaml")
    config = load_config(config_text=text, pool_configured=True)
    assert set(config.scheduler.profiles) == {"decode", "prefill", "encode"}
    types = {p.type_name for p in config.plugins}
    assert {"encode-filter", "always-disagg-multimodal-decider"} <= types
    roles = {d["spec"]["template"]["metadata"]["labels"][ROLE_LABEL] for d in built.workloads()
             if ROLE_LABEL in d["spec"]["template"]["metadata"]["labels"]}  # fmt: skip
    assert roles == {"encode", "prefill", "decode"}


# -- wiring -----------------------------------------------------------------------------


@pytest.mark.parametrize("directory", _dirs_with("InferencePool"))
def test_pool_selects_the_engines_and_points_at_the_epp(
    directory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    built = build(directory)
    (pool,) = built.of_kind("InferencePool")
    selector = pool["spec"]["selector"]["matchLabels"]
    (target,) = (p["number"] for p in pool["spec"]["targetPorts"])
    selected = [
        w for w in built.workloads()
        if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
    ]  # fmt: skip
    assert selected, "the pool selects no pods"
    for workload in selected:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels.get(ROLE_LABEL) in ROLES, workload["metadata"]["name"]
        # Selectors of the Deployment itself must select its own template.
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = workload["spec"]["template"]["spec"]
        served = {
            int(p["containerPort"])
            for c in [*pod.get("initContainers", []), *pod["containers"]]
            for p in c.get("ports", [])
        }
        assert target in served, f"{workload['metadata']['name']} does not serve port {target}"
    # The EPP is not in its own pool.
    assert all(c.workload not in selected for c in _programs(built, "epp"))

    ref = pool["spec"]["endpointPickerRef"]
    service = built.get("Service", ref["name"])
    (container,) = _programs(built, "epp")
    settings = _epp_settings(built, container, capsys)
    assert settings.pool_name == pool["metadata"]["name"]
    epp_labels = container.workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= epp_labels.items()
    (svc_port,) = (p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert _port(container, svc_port["targetPort"]) == settings.grpc_port


@pytest.mark.parametrize("directory", _dirs_with("HTTPRoute"))
def test_route_sends_everything_to_the_pool(directory: str) -> None:
    built = build(directory)
    pools = {p["metadata"]["name"] for p in built.of_kind("InferencePool")}
    for route in built.of_kind("HTTPRoute"):
        for rule in route["spec"]["rules"]:
            for backend in rule["backendRefs"]:
                assert backend["group"] == "inference.networking.k8s.io"
                assert backend["kind"] == "InferencePool"
                assert backend["name"] in pools
        gateways = {g["metadata"]["name"] for g in built.of_kind("Gateway")}
        if gateways:
            assert {p["name"] for p in route["spec"]["parentRefs"]} <= gateways


@pytest.mark.parametrize("directory", _dirs_with("Role"))
def test_epp_and_sidecar_may_read_pools_and_pods_and_nothing_more(directory: str) -> None:
    # Two readers of the pool: the EPP (discovery) and the decode pods' pd-sidecar
    # (SSRF protection). Each has its own account, role and binding, all read-only.
    built = build(directory)
    read = {"get", "list", "watch"}
    expected = {("inference.networking.k8s.io", "inferencepools", v) for v in read} | {
        ("", "pods", v) for v in read
    }
    roles = {role["metadata"]["name"]: role for role in built.of_kind("Role")}
    for role in roles.values():
        granted = {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        want = expected
        if role["metadata"]["name"] == "disagg-epp":
            want = expected | {
                ("llm-d.ai", resource, v)
                for resource in ("inferenceobjectives", "inferencemodelrewrites")
                for v in read
            }
        assert granted == want, role["metadata"]["name"]
    bound: dict[str, str] = {}
    for binding in built.of_kind("RoleBinding"):
        assert binding["roleRef"]["name"] in roles
        (subject,) = binding["subjects"]
        assert subject == {
            "kind": "ServiceAccount",
            "name": subject["name"],
            "namespace": binding["metadata"]["namespace"],
        }
        bound[subject["name"]] = binding["roleRef"]["name"]
    (epp,) = _programs(built, "epp")
    readers = [epp] + [
        c
        for c in _programs(built, "pd-sidecar")
        if "--enable-ssrf-protection=true" in c.spec["args"]
    ]
    assert len(readers) == 2, directory
    for container in readers:
        account = container.pod["serviceAccountName"]
        assert account in bound, container.where
        built.get("ServiceAccount", account)
    assert len(bound) == len(roles) == 2


@pytest.mark.parametrize("directory", _dirs_with("Deployment"))
def test_pods_are_non_root_and_locked_down(directory: str) -> None:
    for workload in build(directory).workloads():
        pod = workload["spec"]["template"]["spec"]
        pod_security = pod["securityContext"]
        assert pod_security["runAsNonRoot"] is True
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_security.get("runAsUser", 1) != 0
    for container in containers(build(directory)):
        sc = container.spec["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, container.where
        assert sc["capabilities"]["drop"] == ["ALL"], container.where
        assert "add" not in sc["capabilities"], container.where
        assert sc.get("runAsUser", 1) != 0, container.where
        # Only the vLLM engines need a writable root filesystem (compile caches).
        if container.name != "vllm":
            assert sc["readOnlyRootFilesystem"] is True, container.where
        requests = container.spec["resources"]["requests"]
        assert {"cpu", "memory"} <= requests.keys(), container.where
        if not (container.init and container.spec.get("restartPolicy") != "Always"):
            assert "readinessProbe" in container.spec, container.where
            assert "livenessProbe" in container.spec, container.where


@pytest.mark.parametrize("directory", _dirs_with("Deployment"))
def test_engines_share_a_hash_seed_and_reach_each_other_over_nixl(directory: str) -> None:
    built = build(directory)
    engines = [c for c in containers(built) if c.name == "vllm"]
    if not engines:
        pytest.skip("no engines in this kustomization")
    assert {c.env_value("PYTHONHASHSEED") for c in engines} == {"42"}
    assert len({c.spec["image"] for c in engines}) == 1, "engines must run one vLLM version"
    for engine in engines:
        args = resolve(built, engine)
        kv = [a.split("=", 1)[1] for a in args if a.startswith("--kv-transfer-config=")]
        if kv and json.loads(kv[0])["kv_connector"] == "NixlConnector":
            host = engine.env_value("VLLM_NIXL_SIDE_CHANNEL_HOST")
            assert host["fieldRef"]["fieldPath"] == "status.podIP", engine.where
            port = int(engine.env_value("VLLM_NIXL_SIDE_CHANNEL_PORT"))
            assert port in {int(p["containerPort"]) for p in engine.spec["ports"]}
        ec = [a.split("=", 1)[1] for a in args if a.startswith("--ec-transfer-config=")]
        if ec:
            json.loads(ec[0])
        labels = engine.workload["spec"]["template"]["metadata"]["labels"]
        assert labels.get(ROLE_LABEL) in ROLES, engine.where
