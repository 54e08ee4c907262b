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
import re
import shlex
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


def test_launchers_open_and_fix_the_ports_they_document():
    aws = _load(CLUSTER / "aws.yaml")
    opened = {r["FromPort"] for r in aws["provider"]["security_group"]["IpPermissions"]}
    assert opened >= {6379, 8265, 8080, 50051}
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
