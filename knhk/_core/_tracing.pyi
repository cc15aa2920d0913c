# Stubs for knhk._core._tracing (C types in comments).
import numpy as np

FLAG_ORPHAN: int  # uint8_t flag: the span's parent is absent; it is a root now
FLAG_CYCLE: int  # uint8_t flag: the span's parent link closed a cycle and was cut

def assemble(
    trace_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 16)
    span_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 8)
    parent_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 8)
    has_parent: np.ndarray,  # const uint8_t[::1], length n
) -> tuple[
    np.ndarray,  # rows: int64_t[m], kept rows grouped by trace
    np.ndarray,  # trace_offsets: int64_t[T + 1]
    np.ndarray,  # parent: int64_t[m], position or -1
    np.ndarray,  # depth: int64_t[m]
    np.ndarray,  # flags: uint8_t[m]
    np.ndarray,  # counters: int64_t[3] (duplicates, orphans, cycles)
]: ...
def critical_paths(
    parent: np.ndarray,  # const int64_t[::1], length m
    trace_offsets: np.ndarray,  # const int64_t[::1], length T + 1
    start: np.ndarray,  # const int64_t[::1]
    end: np.ndarray,  # const int64_t[::1], end >= start
    kind: np.ndarray,  # const int8_t[::1]
) -> tuple[
    np.ndarray,  # span_pos: int64_t[k]
    np.ndarray,  # section_start: int64_t[k]
    np.ndarray,  # section_end: int64_t[k]
    np.ndarray,  # root_pos: int64_t[k]
    np.ndarray,  # path_offsets: int64_t[T + 1]
]: ...
def trace_runs(
    trace_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 16)
) -> np.ndarray | None: ...  # int64_t[T + 1] trace offsets, or None when traces interleave
def regroup(
    trace_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 16)
    span_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 8)
    parent_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 8)
    parent_valid: np.ndarray,  # const uint8_t[::1], Arrow validity bitmap (empty: no nulls)
    valid_offset: int,  # Py_ssize_t, first bit of parent_valid
    start: np.ndarray,  # const int64_t[::1]
    end: np.ndarray,  # const int64_t[::1]
    kind: np.ndarray,  # const int8_t[::1]
) -> tuple[
    np.ndarray,  # trace_ids: uint8_t[n, 16], rows grouped by trace
    np.ndarray,  # span_ids: uint8_t[n, 8]
    np.ndarray,  # parent_ids: uint8_t[n, 8], zero bytes for a null parent
    np.ndarray,  # start: int64_t[n]
    np.ndarray,  # end: int64_t[n]
    np.ndarray,  # kind: int8_t[n]
    np.ndarray,  # trace_offsets: int64_t[T + 1]
]: ...
def critical_paths_ids(
    trace_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 16), grouped by trace
    span_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 8)
    parent_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 8)
    parent_valid: np.ndarray,  # const uint8_t[::1], Arrow validity bitmap (empty: no nulls)
    valid_offset: int,  # Py_ssize_t, first bit of parent_valid
    start: np.ndarray,  # const int64_t[::1]
    end: np.ndarray,  # const int64_t[::1], read as max(end, start)
    kind: np.ndarray,  # const int8_t[::1]
    trace_offsets: np.ndarray,  # const int64_t[::1], T + 1
) -> tuple[
    np.ndarray,  # trace_id: uint8_t[k, 16]
    np.ndarray,  # root_span_id: uint8_t[k, 8]
    np.ndarray,  # span_id: uint8_t[k, 8]
    np.ndarray,  # section_start: int64_t[k]
    np.ndarray,  # section_end: int64_t[k]
    np.ndarray,  # counters: int64_t[3] (duplicates, orphans, cycles)
]: ...
def self_times(
    parent: np.ndarray,  # const int64_t[::1]
    start: np.ndarray,  # const int64_t[::1]
    end: np.ndarray,  # const int64_t[::1]
) -> np.ndarray: ...  # int64_t[m]
