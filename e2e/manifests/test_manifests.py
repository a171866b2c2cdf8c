"""Parley's CRDs and rendered objects checked against the official Kubernetes schemas
(kubernetes-validate), and the sample CRs against the CRDs' own schemas (check-jsonschema),
including broken copies that must be refused: the schemas have teeth."""
import copy
import json
import pathlib
import subprocess
import sys

import pytest
import yaml

from conftest import KUBERNETES_VERSION, REPO

BIN = pathlib.Path(sys.executable).parent


def kubernetes_validate(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
    )


def test_crds_pass_kubernetes_validate_strict(crds_yaml, tmp_path):
    path = tmp_path / "crds.yaml"
    path.write_text(crds_yaml)
    result = kubernetes_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 3, result.stdout


def structural_violations(node, where="openAPIV3Schema"):
    """Yields the places where a schema is not structural in Kubernetes' sense."""
    if not isinstance(node, dict):
        return
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "type" not in node and not int_or_string and not preserve:
        yield f"{where}: no type"
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in node and not int_or_string:
            for branch in node[combinator]:
                if "type" in branch or "properties" in branch or "items" in branch:
                    yield f"{where}.{combinator}: branches may not declare types or fields"
    if "additionalProperties" in node and "properties" in node:
        yield f"{where}: properties and additionalProperties together"
    if node.get("type") == "array" and "items" not in node:
        yield f"{where}: array without items"
    if node.get("x-kubernetes-list-type") == "map" and not node.get("x-kubernetes-list-map-keys"):
        yield f"{where}: list-map without keys"
    for name, child in node.get("properties", {}).items():
        yield from structural_violations(child, f"{where}.{name}")
    if isinstance(node.get("items"), dict):
        yield from structural_violations(node["items"], f"{where}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from structural_violations(node["additionalProperties"], f"{where}{{}}")


def crd_schemas(crds_yaml):
    return {
        crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for crd in yaml.safe_load_all(crds_yaml)
        if crd
    }


def test_crd_schemas_are_structural(crds_yaml):
    schemas = crd_schemas(crds_yaml)
    assert set(schemas) == {"Chatbot", "Tenant", "ModelRoute"}
    for kind, schema in schemas.items():
        problems = list(structural_violations(schema))
        assert not problems, f"{kind}: {problems}"


def test_structural_check_has_teeth():
    untyped = {"type": "object", "properties": {"spec": {"properties": {"x": {}}}}}
    assert list(structural_violations(untyped))


def test_quantities_are_int_or_string(crds_yaml):
    schema = crd_schemas(crds_yaml)["Chatbot"]
    resources = schema["properties"]["spec"]["properties"]["gateway"]["properties"]["resources"]
    assert resources["properties"]["limits"]["additionalProperties"]["x-kubernetes-int-or-string"] is True
    pdb = schema["properties"]["spec"]["properties"]["gateway"]["properties"]["podDisruptionBudget"]
    assert pdb["properties"]["minAvailable"]["x-kubernetes-int-or-string"] is True


def to_json_schema(node):
    """Turns an OpenAPI v3 CRD schema into a JSON Schema that also refuses unknown fields,
    as `kubectl apply --validate=strict` does."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not node.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="session")
def schema_files(crds_yaml, tmp_path_factory):
    directory = tmp_path_factory.mktemp("schemas")
    files = {}
    for kind, schema in crd_schemas(crds_yaml).items():
        root = to_json_schema(schema)
        root.setdefault("properties", {}).update(
            {
                "apiVersion": {"const": "parley.dev/v1alpha1"},
                "kind": {"const": kind},
                "metadata": {"type": "object"},
            }
        )
        root["required"] = sorted(set(root.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
        root["$schema"] = "http://json-schema.org/draft-07/schema#"
        path = directory / f"{kind}.json"
        path.write_text(json.dumps(root))
        files[kind] = path
    return files


def sample_crs():
    for path in sorted((REPO / "config/samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("apiVersion") == "parley.dev/v1alpha1":
                yield path.name, doc


def check(schema_files, document, tmp_path, name="cr.json") -> subprocess.CompletedProcess:
    instance = tmp_path / name
    instance.write_text(json.dumps(document))
    return subprocess.run(
        [BIN / "check-jsonschema", "--schemafile", str(schema_files[document["kind"]]), str(instance)],
        capture_output=True,
        text=True,
    )


def test_every_sample_cr_validates(schema_files, tmp_path):
    docs = list(sample_crs())
    assert {d["kind"] for _, d in docs} == {"Chatbot", "Tenant", "ModelRoute"}
    for file, doc in docs:
        result = check(schema_files, doc, tmp_path)
        assert result.returncode == 0, f"{file} {doc['metadata']['name']}: {result.stdout}{result.stderr}"


def sample(kind, name):
    for _, doc in sample_crs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return copy.deepcopy(doc)
    raise LookupError(f"{kind}/{name}")


def _del(path):
    def mutate(doc):
        *parents, last = path
        target = doc
        for key in parents:
            target = target[key]
        del target[last]

    return mutate


def _set(path, value):
    def mutate(doc):
        *parents, last = path
        target = doc
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


BROKEN = [
    ("ModelRoute", "gpt-4o", "missing required backends", _del(["spec", "backends"])),
    ("ModelRoute", "gpt-4o", "backend without provider", _del(["spec", "backends", 0, "provider"])),
    ("ModelRoute", "gpt-4o", "weight of the wrong type", _set(["spec", "backends", 0, "weight"], "heavy")),
    ("ModelRoute", "gpt-4o", "negative weight", _set(["spec", "backends", 0, "weight"], -1)),
    ("ModelRoute", "gpt-4o", "unknown provider", _set(["spec", "backends", 0, "provider"], "azure")),
    ("ModelRoute", "gpt-4o", "empty backends", _set(["spec", "backends"], [])),
    ("ModelRoute", "gpt-4o", "money with a comma", _set(["spec", "pricing", "inputPerMillionTokens"], "2,50")),
    ("ModelRoute", "gpt-4o", "money as a number", _set(["spec", "pricing", "inputPerMillionTokens"], 2.5)),
    ("ModelRoute", "gpt-4o", "zero attempts", _set(["spec", "retry", "maxAttempts"], 0)),
    ("Tenant", "globex", "negative budget", _set(["spec", "budget", "monthlyUsd"], "-5")),
    ("Tenant", "acme", "rate limit of zero", _set(["spec", "rateLimit", "requestsPerMinute"], 0)),
    ("Tenant", "acme", "key without secretRef", _set(["spec", "apiKeys", 0], {})),
    ("Chatbot", "support", "missing defaultModel", _del(["spec", "defaultModel"])),
    ("Chatbot", "support", "typo in a field name", _set(["spec", "gateway", "replica"], 3)),
    ("Chatbot", "support", "maxReplicas of zero", _set(["spec", "gateway", "autoscaling", "maxReplicas"], 0)),
    ("Chatbot", "support", "unknown failure mode", _set(["spec", "rateLimitFailureMode"], "maybe")),
]


@pytest.mark.parametrize("kind,name,what,mutate", BROKEN, ids=[b[2] for b in BROKEN])
def test_broken_copies_are_refused(schema_files, tmp_path, kind, name, what, mutate):
    document = sample(kind, name)
    assert check(schema_files, document, tmp_path).returncode == 0, "the unbroken sample must pass"
    mutate(document)
    result = check(schema_files, document, tmp_path, "broken.json")
    assert result.returncode != 0, f"{what} was accepted by the schema"


def test_rendered_objects_pass_kubernetes_validate(rendered_samples, tmp_path):
    docs = [d for d in yaml.safe_load_all(rendered_samples) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ServiceAccount", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    )
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered_samples)
    result = kubernetes_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(docs), result.stdout


def test_rendered_deployment_is_restricted(rendered_samples):
    deployment = next(d for d in yaml.safe_load_all(rendered_samples) if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert "replicas" not in deployment["spec"], "an HPA owns replicas"
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config_mount["mountPath"] == "/etc/parley" and "subPath" not in config_mount


def test_rendered_kong_example_passes_kubernetes_validate(operator_bin, tmp_path):
    """config/examples/kong-chatbot.yaml: the Ingress and the workload pass the official
    schemas (the Kong kinds have no official schema; their shape is checked here)."""
    result = subprocess.run(
        [operator_bin, "render", "-f", REPO / "config/examples/kong-chatbot.yaml"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    core = [d for d in docs if d["apiVersion"] != "configuration.konghq.com/v1"]
    assert "Ingress" in [d["kind"] for d in core]
    path = tmp_path / "kong.yaml"
    path.write_text(yaml.safe_dump_all(core))
    validated = kubernetes_validate(path)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert validated.stdout.count("passed") == len(core), validated.stdout
    plugins = {d["metadata"]["name"]: d for d in docs if d["kind"] == "KongPlugin"}
    assert set(plugins) == {"edge-rate-limiting", "edge-key-auth"}
    for plugin in plugins.values():
        assert "spec" not in plugin and set(plugin) == {"apiVersion", "kind", "metadata", "plugin", "config"}
    assert plugins["edge-rate-limiting"]["config"]["redis"] == {"host": "kong-redis", "port": 6379, "timeout": 2000}
    consumers = [d for d in docs if d["kind"] == "KongConsumer"]
    assert [c["username"] for c in consumers] == ["default-hooli", "default-initech"]
    assert "Secret" not in [d["kind"] for d in docs]
