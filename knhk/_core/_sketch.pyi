# Stubs for knhk._core._sketch (C types in comments).
import numpy as np

def bucket_range(
    values: np.ndarray,  # const double[::1]
    inv_log_gamma: float,  # double
    min_value: float,  # double
) -> tuple[int, int, int]: ...  # (int64_t lo, int64_t hi, int64_t n_zero)
def bucket_add(
    values: np.ndarray,  # const double[::1]
    inv_log_gamma: float,  # double
    min_value: float,  # double
    offset: int,  # int64_t: bucket index of counts[0]
    counts: np.ndarray,  # int64_t[::1] (in/out)
) -> int: ...  # int64_t: values counted in the zero bucket
def rank_bucket(
    counts: np.ndarray,  # const int64_t[::1]
    zero_count: int,  # int64_t
    ranks: np.ndarray,  # const double[::1]
) -> np.ndarray: ...  # int64[n]: position in counts, -1 for the zero bucket
