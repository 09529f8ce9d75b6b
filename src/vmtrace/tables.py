"""Events as Arrow tables: the schemas and the column conversions of :mod:`vmtrace.api`.

One place decides how an event field becomes a typed column (ints of their own width,
strings, fixed or variable lists), so that ``Trace.table``, ``Trace.event_table`` and
the Parquet exports agree on types and names.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from vmtrace.format.events import EventFormat


def base_schema() -> Any:
    import pyarrow as pa
    return pa.schema([("ts", pa.uint64()), ("cpu", pa.uint16()), ("pid", pa.int32()),
                      ("comm", pa.dictionary(pa.int32(), pa.string())),
                      ("event", pa.dictionary(pa.int32(), pa.string()))])


def _arrow_type(f: Any) -> Any:
    import pyarrow as pa
    from vmtrace.format import events as ev
    if f.is_string:
        return pa.string()
    ints = {(1, True): pa.int8(), (1, False): pa.uint8(), (2, True): pa.int16(),
            (2, False): pa.uint16(), (4, True): pa.int32(), (4, False): pa.uint32(),
            (8, True): pa.int64(), (8, False): pa.uint64()}
    if f.kind == ev.SCALAR:
        return ints.get((f.size, f.signed), pa.binary())
    elem = ints.get((f.elem_size, f.signed), pa.int64())
    if f.kind == ev.ARRAY and f.elem_size in (1, 2, 4, 8):
        return pa.list_(elem, f.count)
    return pa.list_(elem)


def arrow_column(values: np.ndarray, f: Any) -> Any:
    import pyarrow as pa
    from vmtrace.format import events as ev
    typ = _arrow_type(f)
    if f.kind == ev.ARRAY and f.elem_size in (1, 2, 4, 8):
        flat = pa.array(np.ascontiguousarray(values).reshape(-1), typ.value_type)
        return pa.FixedSizeListArray.from_arrays(flat, f.count)
    if f.kind == ev.SCALAR and values.dtype != object:
        return pa.array(values, typ)
    if f.kind == ev.SCALAR:
        return pa.array([None if v is None else bytes(v) if not isinstance(v, int) else
                         v.to_bytes(max(f.size, 1), "little", signed=f.signed)
                         for v in values.tolist()], typ)
    return pa.array(values.tolist(), typ)


_BASE_NAMES = ("ts", "cpu", "pid", "comm", "event")


def column_name(field_name: str) -> str:
    """An event field named like a base column ("cpu" of workqueue events) gets a prefix."""
    return f"field_{field_name}" if field_name in _BASE_NAMES else field_name


def event_schema(fmt: EventFormat) -> Any:
    """The arrow schema of :meth:`Trace.event_table` for ``fmt``."""
    import pyarrow as pa
    base = base_schema()
    fields = [base.field(n) for n in ("ts", "cpu", "pid", "comm")]
    fields += [pa.field(column_name(f.name), _arrow_type(f)) for f in fmt.event_fields]
    return pa.schema(fields, metadata={b"event": fmt.full_name.encode()})


def sorted_table(parts: List[Dict[str, Any]], schema: Any) -> Any:
    """Concatenate per-CPU chunks and order them like trace-cmd: by ts, then CPU."""
    import pyarrow as pa
    if not parts:
        return schema.empty_table()
    tables = [pa.table(p, schema=schema) for p in parts]
    t = pa.concat_tables(tables).unify_dictionaries() if len(tables) > 1 else tables[0]
    if len(tables) > 1:
        ts = np.concatenate([p["ts"].to_numpy() for p in parts])
        cpu = np.concatenate([p["cpu"].to_numpy() for p in parts])
        t = t.take(pa.array(np.lexsort((cpu, ts))))
    return t
