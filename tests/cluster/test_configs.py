"""Every YAML under cluster/ is checked the way its consumer would check it.

- Ray cluster-launcher configs (a top-level ``provider``): Ray's own steps of
  ``ray up`` before it talks to a cloud, ``prepare_config`` (defaults, the ``local``
  provider's host list) then ``validate_config`` (``ray-schema.json`` with jsonschema).
- Kubernetes manifests (``apiVersion`` and ``kind``): the openAPIV3Schema of the KubeRay
  CRDs (a subset vendored in cluster/kuberay/schemas/, see its header) or a core/v1
  subset, checked with jsonschema in strict mode: a field the schema does not know is an
  error, as ``kubectl apply`` (``--validate=strict``) makes it.

Each check also runs on a broken copy of a real file, so a check that accepts anything
fails here. No network, no cloud account, no Kubernetes API server.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SCHEMAS = CLUSTER / "kuberay" / "schemas"
SCHEMA_FILES = {
    ("ray.io/v1", "RayCluster"): "ray.io_v1.yaml",
    ("ray.io/v1", "RayJob"): "ray.io_v1.yaml",
    ("v1", "Service"): "core_v1.yaml",
    ("v1", "PersistentVolumeClaim"): "core_v1.yaml",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networking_v1.yaml",
}


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*.yaml") if SCHEMAS not in p.parents)


def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _is_launcher(doc: dict) -> bool:
    return "provider" in doc and "cluster_name" in doc


def _is_manifest(doc: dict) -> bool:
    return "apiVersion" in doc and "kind" in doc


LAUNCHERS = [p for p in _yaml_files() if _is_launcher(_load(p))]
MANIFESTS = [p for p in _yaml_files() if _is_manifest(_load(p))]


# ---- validators ------------------------------------------------------------------------
def validate_launcher(config: dict) -> None:
    """What `ray up` does to a config before it calls the cloud provider."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def _strict(schema):
    """The schema with unknown fields refused wherever it lists an object's fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def manifest_errors(doc: dict) -> list[str]:
    """Schema errors of a Kubernetes manifest, one line each (empty: valid)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in SCHEMA_FILES:
        return [f"no schema for apiVersion/kind {key}"]
    vendored = _load(SCHEMAS / SCHEMA_FILES[key])
    schema = _strict({"$defs": vendored["$defs"], **vendored[key[1]]})
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


# ---- every file ------------------------------------------------------------------------
def test_every_yaml_parses_and_is_checked_by_one_validator():
    files = _yaml_files()
    assert {p.name for p in files} >= {
        "aws.yaml",
        "onprem.yaml",
        "raycluster.yaml",
        "rayjob.yaml",
        "service.yaml",
        "networkpolicy.yaml",
    }
    for path in files:
        doc = _load(path)
        assert isinstance(doc, dict) and doc, path
        assert _is_launcher(doc) != _is_manifest(doc), f"{path}: neither or both kinds"
    for name in SCHEMA_FILES.values():
        assert "$defs" in _load(SCHEMAS / name)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema(path):
    validate_launcher(_load(path))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_its_schema(path):
    assert manifest_errors(_load(path)) == []


# ---- the checks reject broken files ------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("max_workers", "16"),  # a string where Ray wants an integer
        ("available_node_types.gpu_worker.resources.GPU", "8"),
        ("available_node_types.gpu_worker.node_config", None),  # a required field removed
        ("head_start_ray_command", ["ray start --head"]),  # misspelt key
    ],
)
def test_launcher_check_rejects_a_broken_config(field, value):
    config = _load(CLUSTER / "aws.yaml")
    *parents, last = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    with pytest.raises(jsonschema.ValidationError) as raised:
        validate_launcher(config)
    assert last in str(raised.value) or repr(value) in str(raised.value)


@pytest.mark.parametrize(
    "file, path, value",
    [
        ("raycluster.yaml", ["spec", "workerGroupSpecs", 0, "replicas"], "2"),
        ("raycluster.yaml", ["spec", "workerGroupSpecs", 0, "minReplicas"], None),
        (
            "raycluster.yaml",
            [
                "spec",
                "headGroupSpec",
                "template",
                "spec",
                "containers",
                0,
                "ports",
                0,
                "containerPort",
            ],
            "6379",
        ),
        ("raycluster.yaml", ["spec", "workerGroupSpecs", 0, "rayStartParam"], {}),  # typo
        ("rayjob.yaml", ["spec", "shutdownAfterJobFinishes"], "no"),
        ("rayjob.yaml", ["spec", "entrypoint"], ["memstore", "train"]),
        ("service.yaml", ["spec", "ports", 0, "port"], "50051"),
        ("service.yaml", ["spec", "type"], "Public"),
        ("networkpolicy.yaml", ["spec", "policyTypes", 0], "ingress"),
        ("networkpolicy.yaml", ["spec", "ingress", 1, "ports", 0, "protocol"], "tcp"),
        ("networkpolicy.yaml", ["spec", "ingress", 0, "from", 0, "podSelektor"], {}),
        ("networkpolicy.yaml", ["spec", "podSelector"], None),
    ],
)
def test_manifest_check_rejects_a_wrong_field(file, path, value):
    doc = _load(CLUSTER / "kuberay" / file)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    errors = manifest_errors(doc)
    assert errors, f"{file}: {path} = {value!r} was accepted"
    where = ".".join(map(str, path[:-1]))  # the error names the object holding the field
    assert all(e.startswith(where) for e in errors), errors


# ---- the files agree with each other and with the code -----------------------------------
def _kuberay(name: str) -> dict:
    return _load(CLUSTER / "kuberay" / name)


def _head_ports(raycluster: dict) -> dict[str, int]:
    containers = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for c in containers for p in c.get("ports", [])}


def test_service_and_job_point_at_the_raycluster():
    cluster, job, service = (
        _kuberay("raycluster.yaml"),
        _kuberay("rayjob.yaml"),
        _kuberay("service.yaml"),
    )
    name = cluster["metadata"]["name"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": name}
    assert service["spec"]["selector"] == {"ray.io/cluster": name, "ray.io/node-type": "head"}
    port = service["spec"]["ports"][0]
    assert port["port"] == 50051
    assert _head_ports(cluster)[port["targetPort"]] == 50051


def test_ray_version_is_the_one_installed_everywhere():
    version = ray.__version__
    assert _kuberay("raycluster.yaml")["spec"]["rayVersion"] == version
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{version}-" in dockerfile
    for path in LAUNCHERS:
        assert any(f'"ray[default]=={version}"' in cmd for cmd in _load(path)["setup_commands"])


def test_rayjob_entrypoint_is_a_valid_trainer_command():
    """The job's `memstore train` arguments load with the trainer's strict config loader
    (unknown keys and bad values raise), from a config the installed package ships."""
    from memstore.trainer import configs
    from memstore.trainer.train import load_config

    argv = shlex.split(_kuberay("rayjob.yaml")["spec"]["entrypoint"])
    assert argv[:2] == ["memstore", "train"]
    config = argv[argv.index("--config") + 1]
    # A built-in config by name: the image installs the package, not the source tree.
    assert configs.path(config).parent == REPO / "memstore" / "trainer" / "configs"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    args = load_config(config, sets)
    assert args.store.keep is True and args.run_dir.startswith("/data/")


def test_launchers_fix_the_ports_they_document():
    for path in LAUNCHERS:
        config = _load(path)
        head = " ".join(config["head_start_ray_commands"])
        worker = " ".join(config["worker_start_ray_commands"])
        for flag in (
            "--object-manager-port=8076",
            "--node-manager-port=8077",
            "--min-worker-port=10002",
            "--max-worker-port=19999",
            "--metrics-export-port=8080",
        ):
            assert flag in head and flag in worker, (path.name, flag)
        assert re.search(r"--port=6379\b", head)
        assert "--address=$RAY_HEAD_IP:6379" in worker


def test_documented_data_channel_ports_are_the_ones_the_shards_bind():
    """The shards' data channel binds with pyzmq's bind_to_random_port and no range of
    its own, so its ports are pyzmq's default range, which the configs document."""
    import inspect

    import zmq

    from memstore._internal import data_channel

    source = inspect.getsource(data_channel)
    assert re.search(r"bind_to_random_port\(f\"tcp://\{host\}\"\)", source)
    defaults = inspect.signature(zmq.Socket.bind_to_random_port).parameters
    low, high = defaults["min_port"].default, defaults["max_port"].default - 1
    for path in [*LAUNCHERS, CLUSTER / "README.md"]:
        assert f"{low}-{high}" in path.read_text(), path.name


# ---- Ray's own doors: token auth, the dashboard, the ports ----------------------------------
RAY_PORTS = {6379, 8265, 10001, 8076, 8077, 8080, 52365, *range(10002, 20000)}
RAY_TOKEN_SECRET = "memstore-ray-token"
CHECKPOINT_SECRET = "memstore-checkpoint-secret"
# A token, a key or a password written into a file: 32+ hex digits or 40+ base64url
# characters in a row.
SECRET_VALUE = re.compile(r"(?<![\w/.-])([0-9a-fA-F]{32,}|[A-Za-z0-9_+/=-]{40,})(?![\w/.-])")


def _containers(raycluster: dict) -> list[dict]:
    spec = raycluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _head_spec(raycluster: dict) -> dict:
    return raycluster["spec"]["headGroupSpec"]["template"]["spec"]


def _container(raycluster: dict, name: str) -> dict:
    (container,) = [c for c in _containers(raycluster) if c["name"] == name]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _start_commands(config: dict) -> list[str]:
    """Each `ray start` of a launcher config with the shell text before it."""
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [c for c in commands if "ray start" in c]


def _flag(command: str, name: str) -> str | None:
    found = re.findall(rf"{name}=(\S+)", command)
    return found[-1] if found else None


def test_launchers_start_every_node_with_token_auth_from_a_mounted_file():
    for path in LAUNCHERS:
        config = _load(path)
        starts = _start_commands(config)
        assert len(starts) == 2, path.name  # the head's and the workers'
        for command in starts:
            before = command[: command.index("ray start")]
            assert re.search(r"(^|[;\s])export RAY_AUTH_MODE=token;", before), (path.name, command)
            assert "RAY_AUTH_TOKEN=" not in command, path.name  # a value, never
        # Ray's default token path on every node, copied from a local file (not a value).
        local = config["file_mounts"]["~/.ray/auth_token"]
        assert local.startswith("~/.ray/") and local.endswith(".token"), local
        assert local in path.read_text().split("cluster_name:")[0]  # how to create it
        init = " ; ".join(config["initialization_commands"])
        assert "chmod 600 ~/.ray/auth_token" in init
        assert "echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in init  # drivers on nodes


def test_kuberay_gives_every_ray_container_the_token_from_a_secret():
    cluster = _kuberay("raycluster.yaml")
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET}
    # authOptions sets RAY_AUTH_MODE and RAY_AUTH_TOKEN on each group's Ray container
    # (the first); every other container that talks to Ray has them itself.
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    extra = [c for g in groups for c in g["template"]["spec"]["containers"][1:]]
    assert [c["name"] for c in extra] == ["memstore-serve"]
    for container in extra:
        env = _env(container)
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {
            "secretKeyRef": {"name": RAY_TOKEN_SECRET, "key": "auth_token"}
        }


def test_every_pod_that_runs_tables_gets_the_checkpoint_secret_from_a_secret():
    """Shards, trainers and `memstore serve` sign and verify checkpoints with the
    operator's secret: on KubeRay every container has it from one Secret, so all pods
    agree (a pod without it would make a key of its own and refuse the others')."""
    cluster = _kuberay("raycluster.yaml")
    containers = _containers(cluster)
    assert len(containers) >= 3
    for container in containers:
        env = _env(container).get("MEMSTORE_CHECKPOINT_SECRET")
        assert env is not None, container["name"]
        assert env["valueFrom"] == {"secretKeyRef": {"name": CHECKPOINT_SECRET, "key": "secret"}}


def test_launchers_copy_the_checkpoint_secret_to_every_node():
    for path in LAUNCHERS:
        config = _load(path)
        local = config["file_mounts"]["~/.config/memstore/checkpoint-secret"]
        assert local.startswith("~/.config/memstore/"), local
        assert local in path.read_text().split("cluster_name:")[0]  # how to create it
        init = " ; ".join(config["initialization_commands"])
        assert "chmod 600 ~/.config/memstore/checkpoint-secret" in init


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.name)
def test_no_yaml_holds_a_secret_value(path):
    text = path.read_text()
    assert SECRET_VALUE.findall(text) == [], path.name
    doc = _load(path)
    if _is_manifest(doc) and doc["kind"] == "RayCluster":
        for container in _containers(doc):
            for name, env in _env(container).items():
                if re.search(r"TOKEN|SECRET|PASSWORD|KEY", name):
                    assert "value" not in env, (container["name"], name)


def test_secret_check_finds_a_token_written_into_a_manifest():
    text = (CLUSTER / "kuberay" / "raycluster.yaml").read_text()
    planted = text.replace(
        "- {name: RAY_AUTH_MODE, value: token}",
        "- {name: RAY_AUTH_MODE, value: token}\n"
        "              - {name: MEMSTORE_TOKEN, value: 3f9a0c1e5b7d2a4c6e8f0a1b3c5d7e9f}",
    )
    assert planted != text
    assert SECRET_VALUE.findall(planted) == ["3f9a0c1e5b7d2a4c6e8f0a1b3c5d7e9f"]


def test_launchers_bind_the_dashboard_to_loopback_and_open_no_ray_port():
    import ipaddress

    for path in LAUNCHERS:
        head = _start_commands(_load(path))[0]
        assert "--head" in head
        host = _flag(head, "--dashboard-host")
        assert host is not None and ipaddress.ip_address(host).is_loopback, (path.name, host)
    # On AWS the launcher's own rule opens every port between the group's members; the
    # config may add rules for clients, never for a Ray port or a whole network.
    rules = _load(CLUSTER / "aws.yaml")["provider"]["security_group"]["IpPermissions"]
    assert rules, "the gRPC clients' rule"
    for rule in rules:
        ports = set(range(rule["FromPort"], rule["ToPort"] + 1))
        assert not ports & RAY_PORTS, rule
        for cidr in rule.get("IpRanges", []):
            network = ipaddress.ip_network(cidr["CidrIp"])
            assert network.prefixlen >= 16, rule  # a subnet, not 10.0.0.0/8 or the world
    onprem = (CLUSTER / "onprem.yaml").read_text()
    assert "10.0.0.0/8" not in onprem and "0.0.0.0" not in onprem


def test_local_script_binds_its_dashboard_to_the_heads_loopback_address():
    script = (CLUSTER / "local" / "start-local.sh").read_text()
    assert '--dashboard-host="$HEAD_IP"' in script
    assert script.count("--dashboard-host") == 1
    assert "--include-dashboard=false" in script  # no dashboard unless DASHBOARD_PORT


# ---- KubeRay: the NetworkPolicy, evaluated as Kubernetes does ---------------------------
NAMESPACE = {"kubernetes.io/metadata.name": "ml"}  # where the manifests are applied
OPERATOR_NAMESPACE = {"kubernetes.io/metadata.name": "ray-system"}


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector matches labels (matchLabels and matchExpressions, ANDed)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels[key] in values,
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[op]
        if not ok:
            return False
    return True


def _peer_admits(peer: dict, pod: dict, policy_namespace: dict) -> bool:
    if "ipBlock" in peer:
        return False  # the peers checked here are pods, not address ranges
    namespace_ok = (
        _selects(peer["namespaceSelector"], pod["namespace"])
        if "namespaceSelector" in peer
        else pod["namespace"] == policy_namespace
    )
    return namespace_ok and _selects(peer.get("podSelector", {}), pod["labels"])


def admitted(policy: dict, target: dict, source: dict, port: int) -> bool:
    """Whether a NetworkPolicy (alone) lets ``source`` open a TCP connection to ``port``
    of ``target``: pods selected by no policy admit everything; a selected pod admits
    what one ingress rule allows (no ``from``: any source; no ``ports``: any port)."""
    spec = policy["spec"]
    if target["namespace"] != NAMESPACE or not _selects(spec["podSelector"], target["labels"]):
        return True
    if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
        return True
    for rule in spec.get("ingress", []):
        peers = rule.get("from")
        ports = rule.get("ports")
        source_ok = not peers or any(_peer_admits(p, source, NAMESPACE) for p in peers)
        port_ok = not ports or any(
            p.get("protocol", "TCP") == "TCP"
            and p.get("port") is not None
            and p["port"] <= port <= p.get("endPort", p["port"])
            for p in ports
        )
        if source_ok and port_ok:
            return True
    return False


def _pods() -> dict[str, dict]:
    cluster = _kuberay("raycluster.yaml")["metadata"]["name"]
    job = _kuberay("rayjob.yaml")["metadata"]["name"]

    def pod(labels, namespace=NAMESPACE):
        return {"labels": labels, "namespace": namespace}

    # The labels KubeRay gives its pods (ray.io/cluster, ray.io/node-type) and the
    # RayJob submitter (ray.io/originated-from-*), as in KubeRay's NetworkPolicy guide.
    return {
        "head": pod({"ray.io/cluster": cluster, "ray.io/node-type": "head"}),
        "worker": pod({"ray.io/cluster": cluster, "ray.io/node-type": "worker"}),
        "grpc-client": pod({"app": "reader", "memstore.io/grpc-client": "true"}),
        "submitter": pod(
            {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": job}
        ),
        "operator": pod({"app.kubernetes.io/name": "kuberay-operator"}, OPERATOR_NAMESPACE),
        "other-pod": pod({"app": "notebook"}),
        "operator-label-elsewhere": pod(
            {"app.kubernetes.io/name": "kuberay-operator"}, {"kubernetes.io/metadata.name": "x"}
        ),
        "cluster-label-elsewhere": pod(
            {"ray.io/cluster": cluster}, {"kubernetes.io/metadata.name": "x"}
        ),
    }


# source -> the ports of the head it may reach (of Ray's 6379, 8265, 10001, a worker
# process and a shard's data channel, and memstore's 50051)
PROBED = (6379, 8265, 10001, 10002, 50051, 55555)
EXPECTED_ACCESS = {
    "head": set(PROBED),
    "worker": set(PROBED),
    "grpc-client": {50051},
    "submitter": {8265},
    "operator": {8265},
    "other-pod": set(),
    "operator-label-elsewhere": set(),
    "cluster-label-elsewhere": set(),
}


def _access(policy: dict) -> dict[str, set[int]]:
    pods = _pods()
    return {
        name: {port for port in PROBED if admitted(policy, pods["head"], source, port)}
        for name, source in pods.items()
    }


def test_network_policy_admits_the_clusters_pods_and_labelled_clients_only():
    policy = _kuberay("networkpolicy.yaml")
    assert _access(policy) == EXPECTED_ACCESS
    pods = _pods()
    for port in PROBED:  # the workers are covered as the head is
        assert admitted(policy, pods["worker"], pods["head"], port)
        assert not admitted(policy, pods["worker"], pods["other-pod"], port)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda p: p["spec"]["ingress"][0]["from"][0]["podSelector"].update(matchLabels={}),
        lambda p: p["spec"]["ingress"][1].pop("ports"),
        lambda p: p["spec"]["ingress"][2]["from"][1].pop("namespaceSelector"),
        lambda p: p["spec"]["ingress"][2]["ports"][0].update(port=8265, endPort=10001),
        lambda p: p["spec"]["podSelector"]["matchLabels"].update({"ray.io/node-type": "head"}),
    ],
    ids=["any-pod-in", "grpc-clients-any-port", "operator-any-namespace", "range", "head-only"],
)
def test_network_policy_check_notices_a_wider_policy(break_it):
    policy = copy.deepcopy(_kuberay("networkpolicy.yaml"))
    break_it(policy)
    pods = _pods()
    wider = _access(policy) != EXPECTED_ACCESS or any(
        admitted(policy, pods["worker"], pods["other-pod"], port) for port in PROBED
    )
    assert wider


# ---- KubeRay: `memstore serve` over TLS with a read-only token -----------------------------
def _serve_argv(raycluster: dict) -> tuple[list[str], str]:
    """The `memstore serve` arguments of the memstore-serve container, and its script."""
    (script,) = _container(raycluster, "memstore-serve")["args"]
    tail = script[script.index("exec memstore serve") + len("exec memstore ") :]
    return shlex.split(tail), script


def _secret_mounts(raycluster: dict, container: str) -> dict[str, str]:
    """mountPath -> secretName of the Secret volumes a container mounts."""
    volumes = {v["name"]: v for v in _head_spec(raycluster)["volumes"]}
    mounts = _container(raycluster, container)["volumeMounts"]
    return {
        m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
        for m in mounts
        if "secret" in volumes[m["name"]]
    }


def test_kuberay_serves_grpc_with_tls_and_a_token_file_from_secrets():
    from memstore.cli import build_parser

    cluster = _kuberay("raycluster.yaml")
    argv, script = _serve_argv(cluster)
    ns = build_parser({}).parse_args(argv)  # the installed CLI takes these arguments
    assert ns.tls_cert and ns.tls_key and ns.token_file
    secrets = _secret_mounts(cluster, "memstore-serve")

    def secret_of(path: str) -> str:
        (mount,) = [m for m in secrets if path.startswith(m + "/")]
        return secrets[mount]

    assert secret_of(ns.tls_cert) == secret_of(ns.tls_key) == "memstore-grpc-tls"
    # The token file is a private copy (memstore reads only its own user's 0600 files)
    # of the file of the memstore-grpc-tokens Secret.
    (source,) = re.findall(rf"cp (\S+) {re.escape(ns.token_file)};", script)
    assert secret_of(source) == "memstore-grpc-tokens"
    assert script.index("umask 077") < script.index("cp ")
    volumes = [v for v in _head_spec(cluster)["volumes"] if "secret" in v]
    assert volumes and all(v["secret"]["defaultMode"] == 0o440 for v in volumes)
    assert _head_spec(cluster)["securityContext"] == {"fsGroup": 100}


def test_make_secrets_creates_what_the_manifests_read(tmp_path):
    """cluster/kuberay/make-secrets.sh, with kubectl replaced by a recorder: it creates
    the Secrets raycluster.yaml mounts, a token file memstore's parser reads as one
    admin and one read-only token, private copies, and a certificate for the Service."""
    import shutil

    from memstore._internal.grpc_auth import parse_tokens

    if shutil.which("openssl") is None:
        pytest.skip("make-secrets.sh needs openssl")
    recorder = tmp_path / "kubectl"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$0.calls"\n')
    recorder.chmod(0o755)
    out = tmp_path / "secrets"
    env = {"PATH": os.environ["PATH"], "KUBECTL": str(recorder), "NAMESPACE": "ml"}
    script = CLUSTER / "kuberay" / "make-secrets.sh"
    done = subprocess.run([str(script), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "kubectl.calls").read_text().splitlines()
    created = {c.split()[5]: c.split()[4] for c in calls}  # name -> generic | tls
    assert created == {
        RAY_TOKEN_SECRET: "generic",
        CHECKPOINT_SECRET: "generic",
        "memstore-grpc-tokens": "generic",
        "memstore-grpc-tls": "tls",
    }
    assert f"--from-file=auth_token={out}/ray-token" in calls[0]
    assert f"--from-file=secret={out}/checkpoint-secret" in calls[1]
    assert f"--from-file=tokens={out}/grpc-tokens" in calls[2]
    secret = (out / "checkpoint-secret").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", secret) and secret != (out / "ray-token").read_text()
    grants = parse_tokens((out / "grpc-tokens").read_text(), "grpc-tokens")
    scopes = sorted(sorted(g.scopes) for g in grants.values())
    assert scopes == [["admin", "read", "write"], ["read"]]
    (reader,) = parse_tokens((out / "grpc-read.token").read_text(), "read").values()
    assert reader.scopes == {"read"}
    assert os.stat(out).st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in out.iterdir())
    service = _kuberay("service.yaml")["metadata"]["name"]
    san = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(out / "tls.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {n.strip() for n in san.splitlines()[-1].split(",")}
    assert f"DNS:{service}.ml.svc" in names
    # Run again into the same place: refused, nothing overwritten.
    again = subprocess.run([str(script), str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "refusing" in again.stderr


# ---- start-local.sh refuses a token or directory another user could control --------------
def _plant(tmp: Path, case: str) -> Path:
    """A cluster directory for start-local.sh, planted as another user might."""
    d = tmp / "cluster"
    if case == "dir-link":
        (tmp / "real").mkdir(mode=0o700)
        d.symlink_to(tmp / "real")
        return d
    d.mkdir(mode=0o700)
    token = d / "auth_token"
    if case == "dir-writable":
        d.chmod(0o777)
    elif case == "dir-foreign":
        os.chown(d, 65534, 65534)
    elif case == "token-readable":
        token.write_text("0" * 64)
        token.chmod(0o644)
    elif case == "token-foreign":
        token.write_text("0" * 64)
        token.chmod(0o600)
        os.chown(token, 65534, 65534)
    elif case == "token-link":
        (tmp / "elsewhere").write_text("0" * 64)
        (tmp / "elsewhere").chmod(0o600)
        token.symlink_to(tmp / "elsewhere")
    return d


@pytest.mark.parametrize(
    "case, message",
    [
        ("dir-link", "is a symbolic link"),
        ("dir-writable", "writable by other users"),
        ("dir-foreign", "owned by uid 65534"),
        ("token-readable", "open to other users"),
        ("token-foreign", "owned by uid 65534"),
        ("token-link", "is a symbolic link"),
    ],
)
def test_start_local_refuses_a_planted_token_or_directory(tmp_path, case, message):
    if case.endswith("foreign") and os.getuid() != 0:
        pytest.skip("planting a file of another user needs root")
    local_dir = _plant(tmp_path, case)
    env = {
        **os.environ,
        "RAY_LOCAL_DIR": str(local_dir),
        "HEAD_IP": "127.0.0.251",
        "RAY": str(Path(sys.executable).with_name("ray")),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    try:
        done = subprocess.run(
            [str(CLUSTER / "local" / "start-local.sh"), "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:  # a script that did not refuse started a head: stop it
        subprocess.run(
            [str(CLUSTER / "local" / "stop-local.sh")], env=env, capture_output=True, timeout=60
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "refusing to start" in done.stderr
    assert done.stdout == ""  # no RAY_AUTH_TOKEN_PATH handed to a driver
