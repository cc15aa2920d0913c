"""Validation kernels: flattened attribute lists checked against compiled registry tables.

The Python layer (``knhk.validation.validator``) maps each batch's key
dictionary to registry key ids and hands over the list offsets and the child
arrays of the attribute struct; one pass here classifies every attribute
(unknown, type mismatch, deprecated, not stable, enum variant, template,
invalid value) and checks every row's matched group for the attributes its
requirement levels ask for. String enum membership needs the batch's string
dictionary mapped to registry value ids, so the pass records those entries
and :func:`check_enum_strings` finishes them once Python has mapped the few
dictionary entries involved.

Outputs are per-entry finding bits (uint8), per-row bits (uint32), per-row
highest level and violation count, per-code counts, and the missing
requirements as (row, key id, code) triples. The plain NumPy reference that
the tests hold this kernel equal to is ``tests/validation/_reference.py``.
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memset

import numpy as np

from knhk._core._types cimport (
    ATTR_EMPTY, ATTR_STRING, ATTR_BOOL, ATTR_INT, ATTR_DOUBLE, ATTR_ARRAY,
    ATTR_BYTES,
)

# Finding codes (bit positions; mirrors knhk.validation.compiled C_*).
cdef enum:
    C_MISSING_ATTRIBUTE = 0
    C_TYPE_MISMATCH = 1
    C_DEPRECATED = 2
    C_NOT_STABLE = 3
    C_UNDEFINED_ENUM = 4
    C_TEMPLATE = 5
    C_INVALID_VALUE = 6
    N_CODE_SLOTS = 32

# Declared types (mirrors knhk.validation.compiled T_*).
cdef enum:
    T_STRING = 1
    T_INT = 2
    T_DOUBLE = 3
    T_BOOLEAN = 4
    T_STRINGS = 5
    T_INTS = 6
    T_DOUBLES = 7
    T_BOOLEANS = 8
    T_ANY = 9
    T_ENUM = 10

# Per-key flags (mirrors knhk.validation.compiled F_*).
cdef enum:
    F_DEPRECATED = 1
    F_NOT_STABLE = 2
    F_TEMPLATE = 4
    F_ENUM_STR = 8
    F_ENUM_INT = 16

# Element classes of an array value.
cdef enum:
    E_STRING = 1
    E_BOOL = 2
    E_INT = 4
    E_DOUBLE = 8
    E_OTHER = 16

# Key id of the validator's own annotation keys (mirrors compiled.KEY_IGNORED).
cdef enum:
    KEY_IGNORED = -2


cdef class RegistryTables:
    """The compiled registry's per-key and per-group tables, as the kernels read them.

    ``code_level`` gives each finding code's level (3 violation, 2 improvement,
    1 information); ``enabled`` masks the codes to report. Requirement entries
    of disabled codes must already be left out of ``rq_*``.
    """

    cdef readonly Py_ssize_t num_keys
    cdef readonly Py_ssize_t num_groups
    cdef readonly uint32_t enabled
    cdef const int8_t[::1] decl
    cdef const uint8_t[::1] flags
    cdef const int32_t[::1] es_off
    cdef const int32_t[::1] es_vals
    cdef const int32_t[::1] ei_off
    cdef const int64_t[::1] ei_vals
    cdef const int32_t[::1] rq_off
    cdef const int32_t[::1] rq_kid
    cdef const int8_t[::1] rq_code
    cdef const uint32_t[::1] g_sig
    cdef uint8_t[::1] sbits
    cdef int8_t level_of[N_CODE_SLOTS]
    cdef int8_t lvl8[256]
    cdef int8_t viol8[256]
    cdef uint8_t action[16 * 8]

    def __init__(self, const int8_t[::1] decl, const uint8_t[::1] flags,
                 const int32_t[::1] es_off, const int32_t[::1] es_vals,
                 const int32_t[::1] ei_off, const int64_t[::1] ei_vals,
                 const int32_t[::1] rq_off, const int32_t[::1] rq_kid,
                 const int8_t[::1] rq_code, const uint32_t[::1] g_sig,
                 const int8_t[::1] code_level, uint32_t enabled):
        cdef int i, b, lv, nv, d, tag
        cdef uint8_t f, e
        if flags.shape[0] != decl.shape[0] or es_off.shape[0] != decl.shape[0] + 1 \
                or ei_off.shape[0] != decl.shape[0] + 1:
            raise ValueError("per-key tables must have one entry per key (offsets one more)")
        if rq_kid.shape[0] != rq_code.shape[0] or rq_off.shape[0] < 1:
            raise ValueError("requirement tables are inconsistent")
        if code_level.shape[0] > N_CODE_SLOTS:
            raise ValueError("too many finding codes")
        if g_sig.shape[0] != rq_off.shape[0] - 1:
            raise ValueError("g_sig must have one entry per group")
        self.num_keys = decl.shape[0]
        self.num_groups = rq_off.shape[0] - 1
        self.decl = decl
        self.flags = flags
        self.es_off = es_off
        self.es_vals = es_vals
        self.ei_off = ei_off
        self.ei_vals = ei_vals
        self.rq_off = rq_off
        self.rq_kid = rq_kid
        self.rq_code = rq_code
        self.g_sig = g_sig
        self.enabled = enabled
        # Per key: the findings its mere presence gives (template, deprecated, not stable).
        self.sbits = bytearray(max(decl.shape[0], 1))
        for i in range(decl.shape[0]):
            f = flags[i]
            e = 0
            if f & F_TEMPLATE:
                e |= 1 << C_TEMPLATE
            if f & F_DEPRECATED:
                e |= 1 << C_DEPRECATED
            if f & F_NOT_STABLE:
                e |= 1 << C_NOT_STABLE
            self.sbits[i] = e & enabled
        # Per (declared type, value tag): what to do.
        for d in range(16):
            for tag in range(8):
                self.action[d * 8 + tag] = _action(d, tag)
        for i in range(N_CODE_SLOTS):
            self.level_of[i] = code_level[i] if i < code_level.shape[0] else 0
        for b in range(256):
            lv = 0
            nv = 0
            for i in range(8):
                if b & (1 << i):
                    if self.level_of[i] > lv:
                        lv = self.level_of[i]
                    if self.level_of[i] == 3:
                        nv += 1
            self.lvl8[b] = lv
            self.viol8[b] = nv


cdef inline int _varint(const uint8_t* p, Py_ssize_t n, Py_ssize_t* pos,
                        uint64_t* out) noexcept nogil:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef uint8_t b
    while pos[0] < n and shift < 64:
        b = p[pos[0]]
        pos[0] += 1
        result |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            out[0] = result
            return 0
        shift += 7
    return -1


cdef inline int _skip(const uint8_t* p, Py_ssize_t n, Py_ssize_t* pos,
                      int wire) noexcept nogil:
    cdef uint64_t v
    if wire == 0:
        return _varint(p, n, pos, &v)
    if wire == 1:
        pos[0] += 8
    elif wire == 5:
        pos[0] += 4
    elif wire == 2:
        if _varint(p, n, pos, &v) < 0:
            return -1
        pos[0] += <Py_ssize_t>v
    else:
        return -1
    return 0 if pos[0] <= n else -1


cdef inline int _array_class(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Element classes of an OTLP AnyValue holding an ArrayValue; -1 if malformed.

    AnyValue field 5 is the ArrayValue, whose field 1 repeats AnyValue; an
    element's first field number is its type (1 string ... 7 bytes).
    """
    cdef Py_ssize_t pos = 0, end, epos, eend
    cdef uint64_t key, ln, ekey
    cdef int cls = 0, seen = 0, no
    while pos < n:
        if _varint(p, n, &pos, &key) < 0:
            return -1
        if key != ((5 << 3) | 2):
            if _skip(p, n, &pos, <int>(key & 7)) < 0:
                return -1
            continue
        if _varint(p, n, &pos, &ln) < 0 or ln > <uint64_t>(n - pos):
            return -1
        end = pos + <Py_ssize_t>ln
        seen = 1
        while pos < end:
            if _varint(p, end, &pos, &key) < 0:
                return -1
            if key != ((1 << 3) | 2):
                if _skip(p, end, &pos, <int>(key & 7)) < 0:
                    return -1
                continue
            if _varint(p, end, &pos, &ln) < 0 or ln > <uint64_t>(end - pos):
                return -1
            eend = pos + <Py_ssize_t>ln
            epos = pos
            if epos < eend:      # an empty AnyValue is a null element: no type
                if _varint(p, eend, &epos, &ekey) < 0:
                    return -1
                no = <int>(ekey >> 3)
                if no == 1:
                    cls |= E_STRING
                elif no == 2:
                    cls |= E_BOOL
                elif no == 3:
                    cls |= E_INT
                elif no == 4:
                    cls |= E_DOUBLE
                else:
                    cls |= E_OTHER
            pos = eend
        pos = end
    return cls if seen else -1


# What a (declared type, value tag) pair needs; precomputed per RegistryTables.
cdef enum:
    A_OK = 0
    A_MISMATCH = 1
    A_ARRAY = 2
    A_ENUM_STR = 3
    A_ENUM_INT = 4


cdef uint8_t _action(int decl, int tag) noexcept:
    if tag == ATTR_EMPTY or decl == T_ANY:
        return A_OK
    if decl == T_ENUM:
        if tag == ATTR_STRING:
            return A_ENUM_STR
        if tag == ATTR_INT:
            return A_ENUM_INT
        return A_MISMATCH
    if decl >= T_STRINGS and decl <= T_BOOLEANS:
        return A_ARRAY if tag == ATTR_ARRAY else A_MISMATCH
    if decl < T_STRING or decl > T_ENUM:
        return A_MISMATCH
    return A_OK if _type_status(decl, tag, NULL, 0) == 0 else A_MISMATCH


cdef inline int _type_status(int decl, int tag, const uint8_t* any_p,
                             Py_ssize_t any_n) noexcept nogil:
    """0 if a value with type ``tag`` fits ``decl``, 1 if not, 2 if it is malformed."""
    cdef int cls
    if tag < ATTR_EMPTY or tag > ATTR_BYTES:
        return 2
    if tag == ATTR_EMPTY or decl == T_ANY:
        return 0
    if decl == T_STRING:
        return 0 if tag == ATTR_STRING else 1
    if decl == T_INT:
        return 0 if tag == ATTR_INT else 1
    if decl == T_DOUBLE:     # an int is accepted where a double is declared
        return 0 if tag == ATTR_DOUBLE or tag == ATTR_INT else 1
    if decl == T_BOOLEAN:
        return 0 if tag == ATTR_BOOL else 1
    if decl == T_ENUM:       # enum values are strings or ints (Weaver's type advisor)
        return 0 if tag == ATTR_STRING or tag == ATTR_INT else 1
    if tag != ATTR_ARRAY:
        return 1
    cls = _array_class(any_p, any_n)
    if cls < 0:
        return 2
    if decl == T_STRINGS:
        return 0 if (cls & ~E_STRING) == 0 else 1
    if decl == T_INTS:
        return 0 if (cls & ~E_INT) == 0 else 1
    if decl == T_DOUBLES:
        return 0 if (cls & ~(E_INT | E_DOUBLE)) == 0 else 1
    if decl == T_BOOLEANS:
        return 0 if (cls & ~E_BOOL) == 0 else 1
    return 1


cdef inline bint _has32(const int32_t* vals, Py_ssize_t lo, Py_ssize_t hi,
                        int32_t x) noexcept nogil:
    # Branchless binary search (the last element <= x): enum members arrive in no
    # predictable order, so a branchy search mispredicts at every step.
    cdef const int32_t* base = vals + lo
    cdef Py_ssize_t n = hi - lo, half
    if n <= 0:
        return False
    while n > 1:
        half = n >> 1
        base = base + half if base[half] <= x else base
        n -= half
    return base[0] == x


cdef inline bint _has64(const int64_t* vals, Py_ssize_t lo, Py_ssize_t hi,
                        int64_t x) noexcept nogil:
    cdef const int64_t* base = vals + lo
    cdef Py_ssize_t n = hi - lo, half
    if n <= 0:
        return False
    while n > 1:
        half = n >> 1
        base = base + half if base[half] <= x else base
        n -= half
    return base[0] == x


cdef inline bint _bit(const uint8_t* bitmap, Py_ssize_t i) noexcept nogil:
    return (bitmap[i >> 3] >> (i & 7)) & 1


# What an entry needs beyond its (key, tag) bits; precomputed per batch in ``kact``.
cdef enum:
    K_DONE = 0
    K_IGNORE = 1
    K_ARRAY = 2
    K_ENUM_STR = 3
    K_ENUM_INT = 4

# A per-batch (key, string) membership table is built when it costs at most this
# many cells per entry of the batch (the table is filled once, read per entry).
cdef enum:
    ETAB_CELLS_PER_ENTRY = 1


def check_attributes(RegistryTables t,
                     const int32_t[::1] offsets,
                     const int32_t[::1] key_idx,
                     const int32_t[::1] key_map,
                     const int8_t[::1] tags,
                     const int32_t[::1] str_idx,
                     const uint8_t[::1] str_valid,
                     Py_ssize_t str_voff,
                     const int32_t[::1] str_vid,
                     const int64_t[::1] ints,
                     const uint8_t[::1] int_valid,
                     Py_ssize_t int_voff,
                     const int32_t[::1] any_off,
                     const uint8_t[::1] any_data,
                     const int32_t[::1] row_group,
                     const int32_t[::1] row_key,
                     uint8_t[::1] entry_bits,
                     uint32_t[::1] row_bits,
                     int8_t[::1] row_level,
                     int32_t[::1] row_viol,
                     int64_t[::1] counts,
                     int64_t[::1] key_viol,
                     int32_t[::1] enum_pos,
                     int32_t[::1] enum_row,
                     uint8_t[::1] str_used,
                     int32_t[::1] miss_row,
                     int32_t[::1] miss_kid,
                     int8_t[::1] miss_code,
                     int32_t[::1] stamp):
    """One pass over the attribute lists of ``len(offsets) - 1`` rows.

    ``str_valid`` / ``int_valid`` are the Arrow validity bitmaps of the string
    and int children (empty when the child has no nulls; ``*_voff`` is the bit
    offset). An entry whose key or string index falls outside its dictionary,
    whose ``any`` bytes are out of range or malformed, or whose value is null
    where its type tag says there is one, is reported as an invalid value; the
    other entries and rows are checked as usual. ``str_vid`` maps the string
    dictionary to enum value ids when Python could afford it (a small
    dictionary); empty, string-enum entries are recorded in ``enum_pos`` /
    ``enum_row`` (and their strings in ``str_used``) for
    :func:`check_enum_strings`. A row matched to a group gets
    the group's requirement findings and its signal findings (``g_sig``).
    ``row_key`` (empty for none) groups rows -- by span name, say -- and
    ``key_viol`` sums their violations per group. Returns
    ``(n_enum, n_missing, n_invalid_rows)``.
    """
    # An entry's findings depend only on its key, its type tag and (for enums and
    # arrays) its value. Keys are dictionary-encoded, so the (key, tag) part is
    # computed once per dictionary entry and tag ("kbits", "kact"), and for a
    # premapped string dictionary the enum membership once per (key, string)
    # ("etab"); the pass over the entries is then table lookups, and findings are
    # counted as a histogram of finding masks, so that it hardly branches.
    cdef Py_ssize_t n_rows = offsets.shape[0] - 1
    cdef Py_ssize_t n_kd = key_map.shape[0]
    cdef Py_ssize_t n_str = str_used.shape[0]
    cdef Py_ssize_t n_any = any_data.shape[0]
    cdef Py_ssize_t n_rkeys = key_viol.shape[0]
    cdef Py_ssize_t r, j, q, j0, j1, x, n_enum = 0, n_miss = 0, n_invalid = 0
    cdef int32_t kd, kid, g, k, si, rk
    cdef int tag, st, lv, c, b
    cdef bint check_str = str_valid.shape[0] > 0, check_int = int_valid.shape[0] > 0
    cdef bint keyed = row_key.shape[0] > 0
    cdef bint premapped = str_vid.shape[0] > 0 and str_vid.shape[0] == n_str
    cdef bint use_etab = False
    cdef int32_t vid
    cdef uint8_t e, act
    cdef uint32_t bits, gs, en = t.enabled, en8 = t.enabled & 0xFF
    cdef uint8_t b_invalid = (1 << C_INVALID_VALUE) & en8
    cdef uint8_t b_mismatch = (1 << C_TYPE_MISMATCH) & en8
    cdef uint8_t b_undef = (1 << C_UNDEFINED_ENUM) & en8
    cdef uint8_t b_missing = (1 << C_MISSING_ATTRIBUTE) & en8
    cdef int32_t viol
    cdef int8_t lvl, le
    cdef Py_ssize_t a0, a1
    cdef int64_t hist[4][256]     # four, so that runs of one mask do not chain increments

    # Per-batch tables, allocated with the GIL held.
    kbits_arr = bytearray(max(n_kd * 8, 1))
    # Presence stamps: key ids, plus one spare slot that unknown keys write to.
    cdef Py_ssize_t spare = t.num_keys
    if stamp.shape[0] <= spare:
        stamp_arr = np.full(spare + 1, -1, dtype=np.int32)
        stamp = stamp_arr
    kslot_arr = np.empty(max(n_kd, 1), dtype=np.int32)
    cdef int32_t[::1] kslot_view = kslot_arr
    cdef int32_t* kslot = &kslot_view[0]
    kact_arr = bytearray(max(n_kd * 8, 1))
    cdef uint8_t* kbits = <uint8_t*><char*>kbits_arr
    cdef uint8_t* kact = <uint8_t*><char*>kact_arr
    cdef uint8_t* etab = NULL
    cdef int32_t* erow = NULL   # key id in the dictionary -> its row of etab (enum keys)
    cdef int32_t[::1] erow_view
    cdef Py_ssize_t n_enum_kd = 0
    cdef Py_ssize_t n_erows = 0
    for kd in range(n_kd):
        kid = key_map[kd]
        if kid >= 0 and t.decl[kid] == T_ENUM and (t.flags[kid] & F_ENUM_STR):
            n_enum_kd += 1
    if premapped and n_enum_kd and n_enum_kd * n_str <= ETAB_CELLS_PER_ENTRY * max(
            key_idx.shape[0], 4096):
        # rows for the enum keys only: a batch with many other keys costs nothing here
        etab_arr = bytearray(n_enum_kd * n_str)
        etab = <uint8_t*><char*>etab_arr
        erow_view = np.full(n_kd, -1, np.int32)
        erow = &erow_view[0]
        use_etab = True

    cdef const uint8_t* anyp = &any_data[0] if n_any > 0 else NULL
    cdef const int32_t* offs = &offsets[0]
    cdef const int32_t* kidx = &key_idx[0] if key_idx.shape[0] > 0 else NULL
    cdef const int32_t* kmap = &key_map[0] if n_kd > 0 else NULL
    cdef const int8_t* tg = &tags[0] if tags.shape[0] > 0 else NULL
    cdef const int32_t* sidx = &str_idx[0] if str_idx.shape[0] > 0 else NULL
    cdef const int32_t* svid = &str_vid[0] if str_vid.shape[0] > 0 else NULL
    cdef const int64_t* ivals = &ints[0] if ints.shape[0] > 0 else NULL
    cdef const uint8_t* svalid = &str_valid[0] if check_str else NULL
    cdef const uint8_t* ivalid = &int_valid[0] if check_int else NULL
    cdef const int32_t* aoff = &any_off[0] if any_off.shape[0] > 0 else NULL
    cdef const int32_t* rgrp = &row_group[0] if n_rows > 0 else NULL
    cdef uint8_t* eb = &entry_bits[0] if entry_bits.shape[0] > 0 else NULL
    cdef const uint8_t* flags = &t.flags[0] if t.num_keys > 0 else NULL
    cdef const int8_t* dcl = &t.decl[0] if t.num_keys > 0 else NULL
    cdef const int32_t* es_off = &t.es_off[0]
    cdef const int32_t* es_vals = &t.es_vals[0] if t.es_vals.shape[0] > 0 else NULL
    cdef const int32_t* ei_off = &t.ei_off[0]
    cdef const int64_t* ei_vals = &t.ei_vals[0] if t.ei_vals.shape[0] > 0 else NULL
    cdef const int32_t* rq_off = &t.rq_off[0]
    cdef const int32_t* rq_kid = &t.rq_kid[0] if t.rq_kid.shape[0] > 0 else NULL
    cdef const int8_t* rq_code = &t.rq_code[0] if t.rq_code.shape[0] > 0 else NULL
    cdef const uint32_t* g_sig = &t.g_sig[0] if t.num_groups > 0 else NULL
    cdef const uint8_t* sb = &t.sbits[0]
    cdef int32_t* stp = &stamp[0]
    cdef const uint8_t* action = t.action
    cdef const int8_t* lvl8 = t.lvl8
    cdef const int8_t* viol8 = t.viol8
    with nogil:
        memset(&hist[0][0], 0, sizeof(hist))
        for kd in range(n_kd):
            kid = kmap[kd]
            kslot[kd] = kid if kid >= 0 else <int32_t>spare
            for tag in range(8):
                x = kd * 8 + tag
                if kid < 0:
                    kbits[x] = 0 if kid == KEY_IGNORED else b_missing
                    kact[x] = K_IGNORE if kid == KEY_IGNORED else K_DONE
                    continue
                e = sb[kid]
                act = action[dcl[kid] * 8 + tag]
                if act == A_MISMATCH:
                    e |= b_mismatch
                    act = K_DONE
                elif act == A_ARRAY:
                    act = K_ARRAY
                elif act == A_ENUM_STR:
                    if flags[kid] & F_ENUM_STR:
                        act = K_ENUM_STR
                    else:
                        e |= b_undef
                        act = K_DONE
                elif act == A_ENUM_INT:
                    act = K_ENUM_INT
                else:
                    act = K_DONE
                kbits[x] = e
                kact[x] = act
            if use_etab and kid >= 0 and kact[kd * 8 + ATTR_STRING] == K_ENUM_STR:
                if n_erows == n_enum_kd:  # cannot happen (same test as the count)
                    use_etab = False
                else:
                    erow[kd] = <int32_t>n_erows
                    n_erows += 1
                    for si in range(n_str):
                        vid = svid[si]
                        etab[erow[kd] * n_str + si] = 0 if vid >= 0 and _has32(
                            es_vals, es_off[kid], es_off[kid + 1], vid) else b_undef

        for r in range(n_rows):
            bits = 0
            lvl = 0
            viol = 0
            j0 = offs[r]
            j1 = offs[r + 1]
            for j in range(j0, j1):
                kd = kidx[j]
                tag = tg[j]
                if kd < 0 or kd >= n_kd:
                    e = b_invalid
                elif tag < 0 or tag > ATTR_BYTES:
                    kid = kmap[kd]
                    if kid == KEY_IGNORED:
                        eb[j] = 0
                        continue
                    if kid < 0:
                        e = b_missing
                    else:
                        stp[kid] = <int32_t>r
                        e = sb[kid] | b_invalid
                else:
                    x = kd * 8 + tag
                    e = kbits[x]
                    act = kact[x]
                    kid = kmap[kd]
                    # an unknown key stamps the spare slot: no branch on the key
                    stp[kslot[kd]] = <int32_t>r
                    if act != K_DONE:
                        if act == K_ENUM_STR:
                            si = sidx[j]
                            if si < 0 or si >= n_str or (check_str and not _bit(
                                    svalid, str_voff + j)):
                                e |= b_invalid
                            elif use_etab:
                                e |= etab[erow[kd] * n_str + si]
                            elif premapped:
                                vid = svid[si]
                                if vid < 0 or not _has32(es_vals, es_off[kid],
                                                         es_off[kid + 1], vid):
                                    e |= b_undef
                            else:
                                str_used[si] = 1
                                enum_pos[n_enum] = <int32_t>j
                                enum_row[n_enum] = <int32_t>r
                                n_enum += 1
                        elif act == K_ENUM_INT:
                            if check_int and not _bit(ivalid, int_voff + j):
                                e |= b_invalid
                            elif not (flags[kid] & F_ENUM_INT) or not _has64(
                                    ei_vals, ei_off[kid], ei_off[kid + 1], ivals[j]):
                                e |= b_undef
                        elif act == K_ARRAY:
                            a0 = aoff[j]
                            a1 = aoff[j + 1]
                            if a0 < 0 or a1 < a0 or a1 > n_any:
                                st = 2
                            else:
                                st = _type_status(dcl[kid], tag, anyp + a0, a1 - a0)
                            if st == 1:
                                e |= b_mismatch
                            elif st == 2:
                                e |= b_invalid
                        else:  # K_IGNORE
                            eb[j] = 0
                            continue
                eb[j] = e
                bits |= e
                le = lvl8[e]
                lvl = le if le > lvl else lvl
                viol += viol8[e]
                hist[j & 3][e] += 1
            g = rgrp[r]
            if g >= 0 and g < t.num_groups:
                gs = g_sig[g] & en
                if gs:
                    bits |= gs
                    for c in range(N_CODE_SLOTS):
                        if gs & ((<uint32_t>1) << c):
                            counts[c] += 1
                            lv = t.level_of[c]
                            if lv > lvl:
                                lvl = <int8_t>lv
                            if lv == 3:
                                viol += 1
                for q in range(rq_off[g], rq_off[g + 1]):
                    k = rq_kid[q]
                    if stp[k] != r:
                        c = rq_code[q]
                        if not (en & ((<uint32_t>1) << c)):
                            continue
                        miss_row[n_miss] = <int32_t>r
                        miss_kid[n_miss] = k
                        miss_code[n_miss] = <int8_t>c
                        n_miss += 1
                        bits |= (<uint32_t>1) << c
                        counts[c] += 1
                        lv = t.level_of[c]
                        if lv > lvl:
                            lvl = <int8_t>lv
                        if lv == 3:
                            viol += 1
            row_bits[r] = bits
            row_level[r] = lvl
            row_viol[r] = viol
            n_invalid += viol != 0
            if keyed:
                rk = row_key[r]
                if rk >= 0 and rk < n_rkeys:
                    key_viol[rk] += viol
        # The histogram of entry finding masks, per finding code.
        for b in range(1, 256):
            for c in range(8):
                if b & (1 << c):
                    counts[c] += hist[0][b] + hist[1][b] + hist[2][b] + hist[3][b]
    return n_enum, n_miss, n_invalid


def check_enum_strings(RegistryTables t, Py_ssize_t n_enum,
                       const int32_t[::1] enum_pos, const int32_t[::1] enum_row,
                       const int32_t[::1] key_idx, const int32_t[::1] key_map,
                       const int32_t[::1] str_idx, const int32_t[::1] str_vid,
                       uint8_t[::1] entry_bits, uint32_t[::1] row_bits,
                       int8_t[::1] row_level, int32_t[::1] row_viol,
                       int64_t[::1] counts):
    """Finish the string-enum entries ``check_attributes`` recorded; returns how many
    values are not members (``undefined_enum_variant``)."""
    cdef Py_ssize_t i, j, r, n_undef = 0
    cdef int32_t kid, vid
    cdef int lv
    cdef uint8_t bit = 1 << C_UNDEFINED_ENUM
    if not (t.enabled & bit):
        return 0
    lv = t.level_of[C_UNDEFINED_ENUM]
    cdef const int32_t* esv = &t.es_vals[0] if t.es_vals.shape[0] > 0 else NULL
    with nogil:
        for i in range(n_enum):
            j = enum_pos[i]
            r = enum_row[i]
            kid = key_map[key_idx[j]]
            vid = str_vid[str_idx[j]]
            if vid >= 0 and _has32(esv, t.es_off[kid], t.es_off[kid + 1], vid):
                continue
            n_undef += 1
            entry_bits[j] |= bit
            row_bits[r] |= bit
            counts[C_UNDEFINED_ENUM] += 1
            if lv > row_level[r]:
                row_level[r] = <int8_t>lv
            if lv == 3:
                row_viol[r] += 1
    return n_undef
