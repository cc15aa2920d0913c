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
def self_times(
    parent: np.ndarray,  # const int64_t[::1]
    start: np.ndarray,  # const int64_t[::1]
    end: np.ndarray,  # const int64_t[::1]
) -> np.ndarray: ...  # int64_t[m]
