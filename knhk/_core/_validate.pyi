# Stubs for knhk._core._validate (C types in comments).
import numpy as np

class RegistryTables:
    num_keys: int  # Py_ssize_t
    num_groups: int  # Py_ssize_t
    enabled: int  # uint32_t: bit per finding code
    def __init__(
        self,
        decl: np.ndarray,  # const int8_t[::1], per key: declared type code
        flags: np.ndarray,  # const uint8_t[::1], per key: F_* bits
        es_off: np.ndarray,  # const int32_t[::1], num_keys + 1
        es_vals: np.ndarray,  # const int32_t[::1], sorted enum value ids per key
        ei_off: np.ndarray,  # const int32_t[::1], num_keys + 1
        ei_vals: np.ndarray,  # const int64_t[::1], sorted int enum values per key
        rq_off: np.ndarray,  # const int32_t[::1], num_groups + 1
        rq_kid: np.ndarray,  # const int32_t[::1]
        rq_code: np.ndarray,  # const int8_t[::1]
        g_sig: np.ndarray,  # const uint32_t[::1], per group: signal finding bits
        code_level: np.ndarray,  # const int8_t[::1], per finding code: 1..3
        enabled: int,  # uint32_t
    ) -> None: ...

def check_attributes(
    t: RegistryTables,
    offsets: np.ndarray,  # const int32_t[::1], n_rows + 1
    key_idx: np.ndarray,  # const int32_t[::1], per entry: index into the key dictionary
    key_map: np.ndarray,  # const int32_t[::1], per dictionary entry: key id (-1, -2)
    tags: np.ndarray,  # const int8_t[::1]
    str_idx: np.ndarray,  # const int32_t[::1]
    str_valid: np.ndarray,  # const uint8_t[::1], Arrow validity bitmap or empty
    str_voff: int,  # Py_ssize_t, bit offset into str_valid
    str_vid: np.ndarray,  # const int32_t[::1], per string dictionary entry: value id, or empty
    ints: np.ndarray,  # const int64_t[::1]
    int_valid: np.ndarray,  # const uint8_t[::1]
    int_voff: int,  # Py_ssize_t
    any_off: np.ndarray,  # const int32_t[::1], entries + 1
    any_data: np.ndarray,  # const uint8_t[::1]
    row_group: np.ndarray,  # const int32_t[::1], per row: group id or -1
    row_key: np.ndarray,  # const int32_t[::1], per row: a grouping index, or empty
    entry_bits: np.ndarray,  # uint8_t[::1] out, per entry
    row_bits: np.ndarray,  # uint32_t[::1] out, per row
    row_level: np.ndarray,  # int8_t[::1] out, per row
    row_viol: np.ndarray,  # int32_t[::1] out, per row
    counts: np.ndarray,  # int64_t[::1] in/out, per finding code
    key_viol: np.ndarray,  # int64_t[::1] in/out, violations per row_key value
    enum_pos: np.ndarray,  # int32_t[::1] out, capacity = entries
    enum_row: np.ndarray,  # int32_t[::1] out, capacity = entries
    str_used: np.ndarray,  # uint8_t[::1] out, per string dictionary entry
    miss_row: np.ndarray,  # int32_t[::1] out, capacity = requirement slots
    miss_kid: np.ndarray,  # int32_t[::1] out
    miss_code: np.ndarray,  # int8_t[::1] out
    stamp: np.ndarray,  # int32_t[::1] scratch, num_keys + 1 (else allocated), filled with -1
) -> tuple[int, int, int]: ...  # (n_enum, n_missing, n_invalid_rows)

def check_enum_strings(
    t: RegistryTables,
    n_enum: int,  # Py_ssize_t
    enum_pos: np.ndarray,  # const int32_t[::1]
    enum_row: np.ndarray,  # const int32_t[::1]
    key_idx: np.ndarray,  # const int32_t[::1]
    key_map: np.ndarray,  # const int32_t[::1]
    str_idx: np.ndarray,  # const int32_t[::1]
    str_vid: np.ndarray,  # const int32_t[::1], per string dictionary entry: value id or -1
    entry_bits: np.ndarray,  # uint8_t[::1] in/out
    row_bits: np.ndarray,  # uint32_t[::1] in/out
    row_level: np.ndarray,  # int8_t[::1] in/out
    row_viol: np.ndarray,  # int32_t[::1] in/out
    counts: np.ndarray,  # int64_t[::1] in/out
) -> int: ...  # values that are not members
