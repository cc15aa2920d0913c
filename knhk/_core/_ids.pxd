# Trace and span ids in kernels: big-endian loads and the id hash, shared by the
# sampling and tracing kernels.
from knhk._core._types cimport uint8_t, uint64_t


cdef inline uint64_t be64(const uint8_t* p) noexcept nogil:
    # Big-endian load; compilers turn the shifts into one bswap.
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40)
            | (<uint64_t>p[3] << 32) | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16)
            | (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef inline uint64_t id_hash(uint64_t hi, uint64_t lo) noexcept nogil:
    # splitmix64 finalizer (Steele, Lea, Flood 2014) over both halves, so that
    # sequential test ids spread as well as random ones.
    cdef uint64_t z = lo ^ (hi * <uint64_t>0x9E3779B97F4A7C15ULL)
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return z ^ (z >> 31)
