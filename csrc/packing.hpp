// Batch packing and unpacking: gather per-request tensors into one batch buffer, pad ragged
// dimensions, and scatter batch outputs back into per-request byte ranges.
//
// Header-only and free of Python, like bytes_codec.hpp: every routine works on raw byte
// ranges whose sizes the caller has already checked, so it can run with the GIL released
// and be driven standalone (ASan/UBSan). Sizes are validated by the `plan_*` helpers
// without any arithmetic that could overflow: products go through checked_mul and sums
// through checked_add, and every copy is "length <= remaining".
//
// Tensors are C-contiguous. "Rows" are slices along the first (batch) dimension.

#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace peregrine {

// ---------------------------------------------------------------------------
// Checked size arithmetic
// ---------------------------------------------------------------------------

inline bool checked_mul(std::size_t a, std::size_t b, std::size_t& out) noexcept {
    if (a != 0 && b > std::numeric_limits<std::size_t>::max() / a) {
        return false;
    }
    out = a * b;
    return true;
}

inline bool checked_add(std::size_t a, std::size_t b, std::size_t& out) noexcept {
    if (b > std::numeric_limits<std::size_t>::max() - a) {
        return false;
    }
    out = a + b;
    return true;
}

// Product of `n` dimensions times `itemsize`; false on overflow.
inline bool checked_volume(const std::size_t* dims, std::size_t n, std::size_t itemsize,
                           std::size_t& out) noexcept {
    std::size_t v = itemsize;
    for (std::size_t i = 0; i < n; ++i) {
        if (!checked_mul(v, dims[i], v)) {
            return false;
        }
    }
    out = v;
    return true;
}

// ---------------------------------------------------------------------------
// Dense gather: one memcpy per request
// ---------------------------------------------------------------------------

// One request's contribution: `size` bytes at `data` (`data` may be null when size is 0).
struct ConstSpan {
    const std::uint8_t* data = nullptr;
    std::size_t size = 0;
};

// Copies the spans back to back into `dst` (capacity `dst_size`). Returns the number of
// bytes written, or SIZE_MAX (writing nothing past the first span that does not fit) when
// they do not fit. The spans must not overlap `dst`.
inline std::size_t gather(const ConstSpan* src, std::size_t n, std::uint8_t* dst,
                          std::size_t dst_size) noexcept {
    std::size_t pos = 0;  // invariant: pos <= dst_size
    for (std::size_t i = 0; i < n; ++i) {
        const std::size_t len = src[i].size;
        if (len > dst_size - pos) {
            return std::numeric_limits<std::size_t>::max();
        }
        if (len != 0) {
            std::memcpy(dst + pos, src[i].data, len);
            pos += len;
        }
    }
    return pos;
}

// ---------------------------------------------------------------------------
// Scatter: one batch tensor -> per-request byte ranges
// ---------------------------------------------------------------------------

struct MutSpan {
    std::uint8_t* data = nullptr;
    std::size_t size = 0;
};

// Copies consecutive ranges of `src` (size `src_size`) into the `n` destinations, in order:
// destination i receives the `dst[i].size` bytes that follow destination i-1's. Returns
// false (having copied only the ranges that fit) when the destinations need more than
// `src_size` bytes.
inline bool scatter(const std::uint8_t* src, std::size_t src_size, const MutSpan* dst,
                    std::size_t n) noexcept {
    std::size_t pos = 0;  // invariant: pos <= src_size
    for (std::size_t i = 0; i < n; ++i) {
        const std::size_t len = dst[i].size;
        if (len > src_size - pos) {
            return false;
        }
        if (len != 0) {
            std::memcpy(dst[i].data, src + pos, len);
            pos += len;
        }
    }
    return true;
}

// ---------------------------------------------------------------------------
// Ragged gather: pad every dimension after the first up to the batch's
// ---------------------------------------------------------------------------

// Fills `count` elements of `itemsize` bytes at `dst` with the element `pad`.
inline void fill_elements(std::uint8_t* dst, std::size_t count, const std::uint8_t* pad,
                          std::size_t itemsize) noexcept {
    if (count == 0 || itemsize == 0) {
        return;
    }
    bool zero = true;
    for (std::size_t i = 0; i < itemsize; ++i) {
        zero = zero && pad[i] == 0;
    }
    const std::size_t total = count * itemsize;  // fits: it lies inside the checked buffer
    if (zero) {
        std::memset(dst, 0, total);
        return;
    }
    std::memcpy(dst, pad, itemsize);
    std::size_t done = itemsize;
    while (done < total) {  // doubling copies from the already-filled prefix
        const std::size_t chunk = done <= total - done ? done : total - done;
        std::memcpy(dst + done, dst, chunk);
        done += chunk;
    }
}

// Copies the C-contiguous array `src` of shape `src_shape` (ndim >= 1) into the
// C-contiguous array `dst` of shape `dst_shape`, anchored at index 0 of every dimension,
// and fills every other element of `dst` with `pad`. Requires
// src_shape[k] <= dst_shape[k] for every k (checked by plan_padded).
inline void pad_copy(const std::uint8_t* src, const std::size_t* src_shape, std::uint8_t* dst,
                     const std::size_t* dst_shape, std::size_t ndim, std::size_t itemsize,
                     const std::uint8_t* pad) noexcept {
    if (ndim == 1) {
        const std::size_t n = src_shape[0] * itemsize;
        if (n != 0) {
            std::memcpy(dst, src, n);
        }
        fill_elements(dst + n, dst_shape[0] - src_shape[0], pad, itemsize);
        return;
    }
    std::size_t src_row = itemsize;
    std::size_t dst_row = itemsize;
    for (std::size_t k = 1; k < ndim; ++k) {
        src_row *= src_shape[k];
        dst_row *= dst_shape[k];
    }
    if (src_row == dst_row) {
        // Every inner dimension already has the batch's extent: one copy for all rows.
        const std::size_t n = src_shape[0] * src_row;
        if (n != 0) {
            std::memcpy(dst, src, n);
        }
    } else {
        for (std::size_t i = 0; i < src_shape[0]; ++i) {
            pad_copy(src + i * src_row, src_shape + 1, dst + i * dst_row, dst_shape + 1,
                     ndim - 1, itemsize, pad);
        }
    }
    const std::size_t tail_rows = dst_shape[0] - src_shape[0];
    if (tail_rows != 0) {
        fill_elements(dst + src_shape[0] * dst_row, tail_rows * (dst_row / itemsize), pad,
                      itemsize);
    }
}

// One request of a ragged batch: its C-contiguous data and its shape (ndim entries).
struct RaggedSource {
    const std::uint8_t* data = nullptr;
    const std::size_t* shape = nullptr;
};

enum class PadError {
    kOk = 0,
    kRankMismatch,   // reported by the caller; kept here so messages live in one place
    kTooLarge,       // a request's extent exceeds the batch's in some dimension
    kRowsMismatch,   // the requests' rows do not add up to the batch's
    kOverflow,       // a size does not fit in size_t
};

struct PadResult {
    PadError error = PadError::kOk;
    std::size_t request = 0;
    std::size_t dim = 0;
    std::size_t got = 0;
    std::size_t limit = 0;

    bool ok() const noexcept { return error == PadError::kOk; }

    std::string message() const {
        using std::to_string;
        switch (error) {
            case PadError::kOk:
                return "ok";
            case PadError::kRankMismatch:
                return "request " + to_string(request) + " has " + to_string(got) +
                       " dimensions; the batch has " + to_string(limit);
            case PadError::kTooLarge:
                return "request " + to_string(request) + " has extent " + to_string(got) +
                       " in dimension " + to_string(dim) + ", more than the batch's " +
                       to_string(limit);
            case PadError::kRowsMismatch:
                return "the requests hold " + to_string(got) + " rows; the batch has " +
                       to_string(limit);
            case PadError::kOverflow:
                return "request " + to_string(request) + ": size overflows";
        }
        return "unknown error";
    }
};

// Checks that `n` sources of rank `ndim` fit the batch shape `batch_shape` (rows = the sum
// of the sources' first dimensions) and that the batch size is representable. Writes the
// batch's byte size to `batch_bytes`.
inline PadResult plan_padded(const RaggedSource* src, std::size_t n, const std::size_t* batch_shape,
                             std::size_t ndim, std::size_t itemsize,
                             std::size_t& batch_bytes) noexcept {
    PadResult r;
    std::size_t rows = 0;
    for (std::size_t i = 0; i < n; ++i) {
        for (std::size_t k = 1; k < ndim; ++k) {
            if (src[i].shape[k] > batch_shape[k]) {
                r.error = PadError::kTooLarge;
                r.request = i;
                r.dim = k;
                r.got = src[i].shape[k];
                r.limit = batch_shape[k];
                return r;
            }
        }
        std::size_t bytes = 0;
        if (!checked_add(rows, src[i].shape[0], rows) ||
            !checked_volume(src[i].shape, ndim, itemsize, bytes)) {
            r.error = PadError::kOverflow;
            r.request = i;
            return r;
        }
    }
    if (rows != batch_shape[0]) {
        r.error = PadError::kRowsMismatch;
        r.got = rows;
        r.limit = batch_shape[0];
        return r;
    }
    if (!checked_volume(batch_shape, ndim, itemsize, batch_bytes)) {
        r.error = PadError::kOverflow;
        r.request = n;
    }
    return r;
}

// Writes the padded batch. `dst` must hold the `batch_bytes` that plan_padded computed for
// the same arguments (which must have succeeded).
inline void gather_padded(const RaggedSource* src, std::size_t n, const std::size_t* batch_shape,
                          std::size_t ndim, std::size_t itemsize, const std::uint8_t* pad,
                          std::uint8_t* dst) noexcept {
    std::size_t row_bytes = itemsize;
    for (std::size_t k = 1; k < ndim; ++k) {
        row_bytes *= batch_shape[k];
    }
    std::size_t offset = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const std::size_t rows = src[i].shape[0];
        std::size_t src_row = itemsize;
        for (std::size_t k = 1; k < ndim; ++k) {
            src_row *= src[i].shape[k];
        }
        if (src_row == row_bytes) {
            // This request already has the batch's extent in every inner dimension.
            if (rows != 0) {
                std::memcpy(dst + offset, src[i].data, rows * row_bytes);
            }
        } else {
            for (std::size_t r = 0; r < rows; ++r) {
                pad_copy(src[i].data + r * src_row, src[i].shape + 1, dst + offset + r * row_bytes,
                         batch_shape + 1, ndim - 1, itemsize, pad);
            }
        }
        offset += rows * row_bytes;
    }
}

}  // namespace peregrine
