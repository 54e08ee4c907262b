"""trainer.config and the strict config helper it shares with memstore.

Types, bounds and unknown keys are refused naming the field by its path; ``--set``
overrides and cross-field checks name the field; choices are enums with string values
that round-trip through YAML; every shipped config is valid; a URI run_dir is refused
before anything is written; a storage path keeps its query in every path of the run;
YAML 1.2 exponent floats without a dot are numbers. Expected values are written here.
"""

import dataclasses
import enum
from pathlib import Path

import pytest
import yaml

from memstore import InvalidArgument
from memstore._internal.validation import bounded, check_fields, dataclass_from_dict
from memstore.trainer.config import (
    DataChannel,
    DataKind,
    Device,
    StoreMode,
    TrainArgs,
    ValueSchedule,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "memstore" / "trainer" / "configs"


class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Inner:
    size: int = bounded(1, min=1)

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass
class Outer:
    count: int = bounded(0, min=0)
    rate: float = bounded(1.0, gt=0)
    name: str = "x"
    flag: bool = False
    color: Color = Color.RED
    sizes: list[int] | None = bounded(None, min=1)
    maybe: float | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)

    def __post_init__(self):
        check_fields(self)


def test_the_config_helper_checks_types_bounds_and_keys_by_name():
    out = dataclass_from_dict(
        Outer,
        {"count": 2, "rate": 3, "color": "blue", "sizes": [1, 2], "inner": {"size": 4}},
        "outer",
    )
    assert out == Outer(2, 3.0, "x", False, Color.BLUE, [1, 2], None, Inner(4))
    assert isinstance(out.rate, float) and out.color is Color.BLUE
    for d, field, expected in [
        ({"count": -1}, "count", "an int >= 0"),
        ({"count": True}, "count", "an int"),
        ({"count": 1.5}, "count", "an int"),
        ({"rate": 0}, "rate", "> 0"),
        ({"rate": float("nan")}, "rate", "finite"),
        ({"name": 3}, "name", "a string"),
        ({"flag": "yes"}, "flag", "true or false"),
        ({"color": "green"}, "color", "'red'"),
        ({"sizes": [1, 0]}, "sizes", ">= 1"),
        ({"sizes": "1"}, "sizes", "a list"),
        ({"maybe": "a"}, "maybe", "None"),
        ({"inner": {"size": 0}}, "inner.size", ">= 1"),
        ({"inner": 3}, "inner", "a mapping"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            dataclass_from_dict(Outer, d, "outer")
        assert e.value.field == field and expected in e.value.expected, d
    with pytest.raises(InvalidArgument) as e:
        dataclass_from_dict(Outer, {"inner": {"sise": 1}, "cnt": 1}, "outer")
    assert e.value.field == "outer" and "outer.cnt" in str(e.value.got)
    with pytest.raises(InvalidArgument) as e:
        dataclass_from_dict(Outer, {"inner": {"sise": 1}}, "outer")
    assert e.value.field == "inner" and "inner.sise" in str(e.value.got)
    with pytest.raises(InvalidArgument, match="a mapping"):
        dataclass_from_dict(Outer, [1], "outer")


def test_unknown_keys_are_rejected_by_name(tmp_path):
    for text, name in [
        ("stepz: 3\n", "stepz"),
        ("data:\n  entitiez: 3\n", "data.entitiez"),
        ("store:\n  shardz: 2\n", "store.shardz"),
        ("ray:\n  max_failurez: 2\n", "ray.max_failurez"),
        ("model:\n  dimm: 8\n", "model.dimm"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(InvalidArgument, match=name.replace(".", r"\.")):
            load_config(path)
    with pytest.raises(InvalidArgument, match="nosuch"):
        load_config(CONFIGS / "tiny.yaml", ["data.nosuch=1"])
    with pytest.raises(InvalidArgument, match="a path into"):
        load_config(CONFIGS / "tiny.yaml", ["steps.x=1"])


def test_overrides_and_validation_name_the_field():
    args = load_config(
        CONFIGS / "tiny.yaml",
        ["model.dim=64", "workers=2", "store.shards=[2, 1]", "ray.max_failures=1"],
    )
    assert args.model["dim"] == 64 and args.workers == 2 and args.store.shards == (2, 1)
    assert args.ray.max_failures == 1
    for override, field in [
        ("workers=3", "batch_size"),
        ("lr=-1", "lr"),
        ("lr=true", "lr"),
        ("steps=0", "steps"),
        ("store.data_channel=grpc", "store.data_channel"),
        ("store.shards=[1, 2, 3]", "store.shards"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker"),
        ("device=tpu", "device"),
        ("data.seq_len=0", "data.seq_len"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            load_config(CONFIGS / "tiny.yaml", [override])
        assert e.value.field == field, override
    with pytest.raises(InvalidArgument) as e:
        load_config(CONFIGS / "tiny.yaml", ["store.mode=async", "store.step_on_push=true"])
    assert e.value.field == "store.step_on_push"
    assert load_config(CONFIGS / "tiny.yaml", ["store.mode=async"]).store.step_on_push is False


def test_choices_are_enums_with_string_values_and_round_trip_through_yaml(tmp_path):
    args = load_config(
        CONFIGS / "tiny.yaml",
        ["store.mode=async", "value_schedule=constant", "store.data_channel=ray", "device=auto"],
    )
    assert args.store.mode is StoreMode.ASYNC and args.value_schedule is ValueSchedule.CONSTANT
    assert args.store.data_channel is DataChannel.RAY and args.device is Device.AUTO
    assert args.data.kind is DataKind.FACTS and args.data.kind == "facts"
    d = args.to_dict()
    assert d["store"]["mode"] == "async" and type(d["store"]["mode"]) is str
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_config(path) == args
    assert TrainArgs(device="cuda").device is Device.CUDA


def test_every_shipped_config_is_valid():
    for path in sorted(CONFIGS.glob("*.yaml")):
        args = load_config(path)
        assert args.model_args(100).vocab_size == 100


@pytest.mark.parametrize("uri", ["s3://bucket/run", "file:///tmp/run", "gs://b/r?x=1"])
def test_a_uri_run_dir_is_refused_before_anything_is_written(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgument, match="run_dir: expected a local directory"):
        TrainArgs.from_dict({"run_dir": uri})
    assert list(tmp_path.iterdir()) == []  # no folder "s3:" or "file:"
    assert TrainArgs.from_dict({"run_dir": "runs/a:b"}).run_dir == "runs/a:b"  # local


@pytest.mark.parametrize(
    ("storage", "root", "ray_storage"),
    [
        (
            "s3://b/exp?endpoint_override=127.0.0.1:9000&scheme=http",
            "s3://b/exp/run7?endpoint_override=127.0.0.1:9000&scheme=http",
            "s3://b/exp?endpoint_override=127.0.0.1:9000&scheme=http",
        ),
        (
            "s3://b/exp/?region=us-east-1&endpoint_override=127.0.0.1:1",
            "s3://b/exp/run7?region=us-east-1&endpoint_override=127.0.0.1:1",
            "s3://b/exp?region=us-east-1&endpoint_override=127.0.0.1:1",
        ),
    ],
)
def test_a_storage_path_keeps_its_query_in_every_path_of_the_run(storage, root, ray_storage):
    from memstore.trainer import checkpoint
    from memstore.trainer.ray_train import experiment_root, storage_and_name

    args = TrainArgs.from_dict({"run_dir": "runs/run7", "ray": {"storage_path": storage}})
    assert experiment_root(args, Path("/x/runs/run7")) == root
    assert storage_and_name(root) == (ray_storage, "run7")
    query = storage.partition("?")[2]
    base = root.partition("?")[0]
    assert checkpoint.store_path(root, "memory", 3) == f"{base}/store/memory/step-000000003?{query}"
    assert checkpoint.step_dir(root, 3) == f"{base}/checkpoints/step-000000003?{query}"


def test_a_local_storage_path_joins_as_a_directory(tmp_path):
    from memstore.trainer.ray_train import experiment_root, storage_and_name

    args = TrainArgs.from_dict({"run_dir": "r", "ray": {"storage_path": str(tmp_path / "st")}})
    root = experiment_root(args, tmp_path / "r")
    assert root == str(tmp_path / "st" / "r")
    assert storage_and_name(root) == (str(tmp_path / "st"), "r")


@pytest.mark.parametrize("text", ["1e-5", "2.5E-3", "3e+2", "7e0"])
def test_exponent_floats_without_a_dot_are_numbers(text, tmp_path):
    """YAML 1.1 (PyYAML's default) reads ``1e-5`` as a string; configs and --set read it
    as the float Python reads."""
    assert load_config("tiny", [f"grad_clip={text}"]).grad_clip == float(text)
    path = tmp_path / "run.yaml"
    path.write_text((CONFIGS / "tiny.yaml").read_text() + f"\nweight_decay: {text}\n")
    assert load_config(path).weight_decay == float(text)


FINETUNE = {"method": "sparse_memory", "from": "runs/pre", "top_t": 8, "background": "pretrain"}


def test_the_finetune_section_round_trips_with_its_yaml_key_from(tmp_path):
    args = TrainArgs.from_dict({"finetune": FINETUNE, "stats_snapshot": "pretrain"})
    assert args.finetune.from_ == "runs/pre" and args.finetune.top_t == 8
    assert args.to_dict()["finetune"] == {**FINETUNE, "lora_rank": 8, "lora_alpha": 16.0}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(args.to_dict()))
    assert load_config(path).finetune == args.finetune
    set_by_path = load_config(None, ["finetune.method=memory", "finetune.from=runs/x"])
    assert set_by_path.finetune.from_ == "runs/x"
    assert TrainArgs().finetune.method is None  # a run from scratch by default


@pytest.mark.parametrize(
    "section, field",
    [
        ({"method": "sparse_memory", "from": "x"}, "finetune.top_t"),
        ({"method": "memory", "from": "x", "top_t": 4}, "finetune.top_t"),
        ({"method": "lora", "from": "x", "background": "pretrain"}, "finetune.background"),
        ({"method": "memory"}, "finetune.from"),
        ({"from": "x"}, "finetune.from"),
        ({"method": "partial", "from": "x"}, "finetune.method"),
        ({"method": "lora", "from": "x", "lora_rank": 0}, "finetune.lora_rank"),
        ({"method": "lora", "from": "x", "lora_alpha": -1.0}, "finetune.lora_alpha"),
        ({**FINETUNE, "top_t": 0}, "finetune.top_t"),
        ({**FINETUNE, "background": "a b"}, "finetune.background"),
        ({"from_": "x"}, "finetune"),
    ],
)
def test_bad_finetune_settings_name_the_field(section, field):
    with pytest.raises(InvalidArgument) as e:
        TrainArgs.from_dict({"finetune": section})
    assert e.value.field == field


def test_finetuning_refuses_ray_workers_and_a_dense_twin():
    with pytest.raises(InvalidArgument, match="finetune.method"):
        TrainArgs.from_dict({"finetune": FINETUNE, "workers": 2, "batch_size": 64})
    with pytest.raises(InvalidArgument, match="dense_equivalent"):
        TrainArgs.from_dict({"finetune": FINETUNE, "dense_equivalent": True})
    with pytest.raises(InvalidArgument, match="stats_snapshot"):
        TrainArgs.from_dict({"stats_snapshot": "two words"})


@pytest.mark.parametrize(
    "data, field",
    [
        ({"kind": "mixed"}, "path"),
        ({"kind": "mixed", "path": "t", "text_fraction": 1.0}, "text_fraction"),
        ({"kind": "mixed", "path": "t", "new_facts": 1.0}, "new_facts"),
        ({"kind": "mixed", "path": "t", "train_facts": "second"}, "train_facts"),
        ({"kind": "facts", "text_fraction": 0.5}, "text_fraction"),
        ({"kind": "text", "path": "t", "new_facts": 0.1}, "new_facts"),
    ],
)
def test_bad_mixed_data_settings_name_the_field(data, field):
    with pytest.raises(InvalidArgument) as e:
        TrainArgs.from_dict({"data": data})
    assert e.value.field.endswith(field)


def test_mixed_data_defaults():
    d = TrainArgs.from_dict({"data": {"kind": "mixed", "path": "t"}}).data
    assert (d.text_fraction, d.new_facts, d.train_facts.value) == (0.5, None, "first")
