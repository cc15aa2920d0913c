# Stubs for knhk._core._sampling (C types in comments).
import numpy as np

#: dtype of one tail-sampling slot: the packed C struct trace_slot_t
#: (hi, lo: uint64_t; tid: int64_t; first_seen, last_seen: double;
#: span_count, min_start, max_end: int64_t; pred: uint64_t;
#: status_bits, root_seen, state: uint8_t).
TRACE_SLOT_DTYPE: np.dtype
SLOT_FREE: int  # slot state 0
SLOT_PENDING: int  # slot state 1

def ratio_mask(
    trace_ids: np.ndarray,  # const uint8_t[:, ::1], shape (n, 16)
    bound: int,  # uint64_t
    keep_all: bool,  # bint
    rule: int,  # int: 0 traceidratio, 1 consistent
) -> tuple[np.ndarray, int]: ...  # (bool[n], Py_ssize_t kept)
def priority_mask(
    trace_ids: np.ndarray,  # const uint8_t[:, ::1]
    status: np.ndarray,  # const int8_t[::1]
    start: np.ndarray,  # const int64_t[::1]
    end: np.ndarray,  # const int64_t[::1]
    slow_ns: int,  # int64_t
    bounds: np.ndarray,  # const uint64_t[::1], length 3 (base, slow, error)
    keep_all: np.ndarray,  # const uint8_t[::1], length 3
    rule: int,  # int
    classes: np.ndarray,  # uint8_t[::1], length n or 0
) -> tuple[np.ndarray, np.ndarray]: ...  # (bool[n], int64[6] counts)
def tail_ingest(
    trace_ids: np.ndarray,  # const uint8_t[:, ::1]
    is_root: np.ndarray,  # const uint8_t[::1]
    start: np.ndarray,  # const int64_t[::1]
    end: np.ndarray,  # const int64_t[::1]
    status: np.ndarray,  # const int8_t[::1]
    pred: np.ndarray,  # const uint64_t[::1], length n or 0
    now: float,  # double
    row0: int,  # Py_ssize_t
    ht_keys: np.ndarray,  # uint64_t[::1], 2 * capacity
    ht_vals: np.ndarray,  # int32_t[::1], capacity (a power of two)
    slots: np.ndarray,  # trace_slot_t[::1]
    free_stack: np.ndarray,  # int32_t[::1]
    counters: np.ndarray,  # int64_t[::1]: free_top, next_tid, new traces, cache hits
    dc_keys: np.ndarray,  # const uint64_t[::1]
    dc_vals: np.ndarray,  # const int32_t[::1]
    dc_info: np.ndarray,  # const int32_t[::1]
    tid_info: np.ndarray,  # int32_t[::1], a power of two
    tags: np.ndarray,  # int64_t[::1], length n (out)
) -> int: ...  # Py_ssize_t: the row it stopped at
def tail_retire(
    slot_ids: np.ndarray,  # const int32_t[::1]
    infos: np.ndarray,  # const int32_t[::1]
    keep: np.ndarray,  # const uint8_t[::1]
    ht_keys: np.ndarray,  # uint64_t[::1]
    ht_vals: np.ndarray,  # int32_t[::1]
    slots: np.ndarray,  # trace_slot_t[::1]
    free_stack: np.ndarray,  # int32_t[::1]
    counters: np.ndarray,  # int64_t[::1]
    dc_keys: np.ndarray,  # uint64_t[::1]
    dc_vals: np.ndarray,  # int32_t[::1]
    dc_pos_keys: np.ndarray,  # uint64_t[::1], 2 * positions
    dc_info: np.ndarray,  # int32_t[::1], positions
    ring_base: np.ndarray,  # const int64_t[::1], 2
    ring_size: np.ndarray,  # const int64_t[::1], 2
    ring_head: np.ndarray,  # int64_t[::1], 2
    tid_info: np.ndarray,  # int32_t[::1]
) -> None: ...
def table_lookup(
    keys: np.ndarray,  # const uint64_t[::1]
    vals: np.ndarray,  # const int32_t[::1]
    trace_ids: np.ndarray,  # const uint8_t[:, ::1]
) -> np.ndarray: ...  # int32[n], -1 where absent
def greedy_admit(
    counts: np.ndarray,  # const int64_t[::1]
    eligible: np.ndarray,  # const uint8_t[::1]
    budget: float,  # double
) -> tuple[np.ndarray, float]: ...  # (bool[n], double used)
def composite_admit(
    sub_sampled: np.ndarray,  # const uint8_t[:, ::1], (n, k)
    counts: np.ndarray,  # const int64_t[::1]
    eligible: np.ndarray,  # const uint8_t[::1]
    allocated: np.ndarray,  # const int64_t[::1], k
    used: np.ndarray,  # int64_t[::1], k + 1 (last: total)
    max_total: int,  # int64_t
) -> tuple[np.ndarray, np.ndarray]: ...  # (bool[n], int16[n] chosen)
