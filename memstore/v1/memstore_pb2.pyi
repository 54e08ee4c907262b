from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
INT32: DType
INT64: DType
BFLOAT16: DType
FLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StepSeen(_message.Message):
    __slots__ = ("step", "shard_steps", "consistent")
    class ShardStepsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHARD_STEPS_FIELD_NUMBER: _ClassVar[int]
    CONSISTENT_FIELD_NUMBER: _ClassVar[int]
    step: int
    shard_steps: _containers.ScalarMap[str, int]
    consistent: bool
    def __init__(self, step: _Optional[int] = ..., shard_steps: _Optional[_Mapping[str, int]] = ..., consistent: _Optional[bool] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableSummary(_message.Message):
    __slots__ = ("name", "rows", "dim", "seen")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    dim: int
    seen: StepSeen
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., seen: _Optional[_Union[StepSeen, _Mapping]] = ...) -> None: ...

class ListTablesReply(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableSummary]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableSummary, _Mapping]]] = ...) -> None: ...

class DescribeTableRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("block", "rows", "cols", "bytes", "last_step", "pending_steps", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    PENDING_STEPS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    block: str
    rows: int
    cols: int
    bytes: int
    last_step: int
    pending_steps: _containers.RepeatedScalarFieldContainer[int]
    counters: _containers.ScalarMap[str, float]
    def __init__(self, block: _Optional[str] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., bytes: _Optional[int] = ..., last_step: _Optional[int] = ..., pending_steps: _Optional[_Iterable[int]] = ..., counters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DescribeTableReply(_message.Message):
    __slots__ = ("seen", "name", "rows", "dim", "grid", "dtype", "optimizer", "optimizer_params", "mode", "keys_published", "shards", "key_heads", "key_dim", "max_batch", "max_pairs")
    class OptimizerParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SEEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    KEYS_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    KEY_HEADS_FIELD_NUMBER: _ClassVar[int]
    KEY_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_PAIRS_FIELD_NUMBER: _ClassVar[int]
    seen: StepSeen
    name: str
    rows: int
    dim: int
    grid: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    optimizer: str
    optimizer_params: _containers.ScalarMap[str, float]
    mode: str
    keys_published: bool
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    key_heads: int
    key_dim: int
    max_batch: int
    max_pairs: int
    def __init__(self, seen: _Optional[_Union[StepSeen, _Mapping]] = ..., name: _Optional[str] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., grid: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., optimizer: _Optional[str] = ..., optimizer_params: _Optional[_Mapping[str, float]] = ..., mode: _Optional[str] = ..., keys_published: _Optional[bool] = ..., shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., key_heads: _Optional[int] = ..., key_dim: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_pairs: _Optional[int] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("table", "q", "k", "return_values")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RETURN_VALUES_FIELD_NUMBER: _ClassVar[int]
    table: str
    q: Tensor
    k: int
    return_values: bool
    def __init__(self, table: _Optional[str] = ..., q: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., return_values: _Optional[bool] = ...) -> None: ...

class QueryReply(_message.Message):
    __slots__ = ("seen", "indices", "scores", "values")
    SEEN_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    seen: StepSeen
    indices: Tensor
    scores: Tensor
    values: Tensor
    def __init__(self, seen: _Optional[_Union[StepSeen, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("table", "idx", "w")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDX_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    table: str
    idx: Tensor
    w: Tensor
    def __init__(self, table: _Optional[str] = ..., idx: _Optional[_Union[Tensor, _Mapping]] = ..., w: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("seen", "y")
    SEEN_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    seen: StepSeen
    y: Tensor
    def __init__(self, seen: _Optional[_Union[StepSeen, _Mapping]] = ..., y: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GatherRequest(_message.Message):
    __slots__ = ("table", "rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows: Tensor
    def __init__(self, table: _Optional[str] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GatherReply(_message.Message):
    __slots__ = ("seen", "values")
    SEEN_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    seen: StepSeen
    values: Tensor
    def __init__(self, seen: _Optional[_Union[StepSeen, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ApplyGradientsRequest(_message.Message):
    __slots__ = ("table", "idx", "w", "dy", "step", "push_id", "lr", "rows", "top_t", "background", "doc_ids")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDX_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    DY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOP_T_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    idx: Tensor
    w: Tensor
    dy: Tensor
    step: int
    push_id: int
    lr: float
    rows: Tensor
    top_t: int
    background: str
    doc_ids: Tensor
    def __init__(self, table: _Optional[str] = ..., idx: _Optional[_Union[Tensor, _Mapping]] = ..., w: _Optional[_Union[Tensor, _Mapping]] = ..., dy: _Optional[_Union[Tensor, _Mapping]] = ..., step: _Optional[int] = ..., push_id: _Optional[int] = ..., lr: _Optional[float] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., top_t: _Optional[int] = ..., background: _Optional[str] = ..., doc_ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ApplyGradientsReply(_message.Message):
    __slots__ = ("seen", "dw")
    SEEN_FIELD_NUMBER: _ClassVar[int]
    DW_FIELD_NUMBER: _ClassVar[int]
    seen: StepSeen
    dw: Tensor
    def __init__(self, seen: _Optional[_Union[StepSeen, _Mapping]] = ..., dw: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("table", "step", "pushes_per_step", "lr", "rows", "top_t", "background")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PUSHES_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOP_T_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    table: str
    step: int
    pushes_per_step: int
    lr: float
    rows: Tensor
    top_t: int
    background: str
    def __init__(self, table: _Optional[str] = ..., step: _Optional[int] = ..., pushes_per_step: _Optional[int] = ..., lr: _Optional[float] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., top_t: _Optional[int] = ..., background: _Optional[str] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("seen", "rows_updated")
    SEEN_FIELD_NUMBER: _ClassVar[int]
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    seen: StepSeen
    rows_updated: int
    def __init__(self, seen: _Optional[_Union[StepSeen, _Mapping]] = ..., rows_updated: _Optional[int] = ...) -> None: ...

class PublishKeysRequest(_message.Message):
    __slots__ = ("table", "keys")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    table: str
    keys: Tensor
    def __init__(self, table: _Optional[str] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PublishKeysReply(_message.Message):
    __slots__ = ("seen",)
    SEEN_FIELD_NUMBER: _ClassVar[int]
    seen: StepSeen
    def __init__(self, seen: _Optional[_Union[StepSeen, _Mapping]] = ...) -> None: ...

class SaveRequest(_message.Message):
    __slots__ = ("table", "path")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    table: str
    path: str
    def __init__(self, table: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class SaveReply(_message.Message):
    __slots__ = ("seen", "path")
    SEEN_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    seen: StepSeen
    path: str
    def __init__(self, seen: _Optional[_Union[StepSeen, _Mapping]] = ..., path: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("table", "rows", "background", "row_start", "row_count")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows: bool
    background: str
    row_start: int
    row_count: int
    def __init__(self, table: _Optional[str] = ..., rows: _Optional[bool] = ..., background: _Optional[str] = ..., row_start: _Optional[int] = ..., row_count: _Optional[int] = ...) -> None: ...

class RowStats(_message.Message):
    __slots__ = ("row_start", "tf", "df", "steps", "table_rows", "max_rows")
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    TF_FIELD_NUMBER: _ClassVar[int]
    DF_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TABLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    row_start: int
    tf: Tensor
    df: Tensor
    steps: int
    table_rows: int
    max_rows: int
    def __init__(self, row_start: _Optional[int] = ..., tf: _Optional[_Union[Tensor, _Mapping]] = ..., df: _Optional[_Union[Tensor, _Mapping]] = ..., steps: _Optional[int] = ..., table_rows: _Optional[int] = ..., max_rows: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("seen", "bytes", "shards", "row_stats")
    SEEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ROW_STATS_FIELD_NUMBER: _ClassVar[int]
    seen: StepSeen
    bytes: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    row_stats: RowStats
    def __init__(self, seen: _Optional[_Union[StepSeen, _Mapping]] = ..., bytes: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., row_stats: _Optional[_Union[RowStats, _Mapping]] = ...) -> None: ...
