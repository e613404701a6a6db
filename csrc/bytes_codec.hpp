// BYTES tensor codec of the Open Inference Protocol (KServe V2).
//
// A BYTES tensor's raw content is the concatenation, in row-major order, of its
// elements, each encoded as a 4-byte unsigned little-endian length followed by
// that many bytes.
//
// Header-only and free of Python: the scanner and encoder work on raw byte
// ranges so that they can run with the GIL released and be tested standalone.
// Nothing here reads through a cast pointer (prefixes are assembled byte by
// byte) and every bound is checked as "length <= remaining", never as
// "offset + length <= size", so no arithmetic can overflow.

#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace peregrine {

inline constexpr std::size_t kLengthPrefixSize = 4;
inline constexpr std::uint64_t kMaxElementSize = std::numeric_limits<std::uint32_t>::max();

// ---------------------------------------------------------------------------
// Little-endian prefix helpers
// ---------------------------------------------------------------------------

inline std::uint32_t load_u32_le(const std::uint8_t* p) noexcept {
    return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
           (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}

inline void store_u32_le(std::uint8_t* p, std::uint32_t v) noexcept {
    p[0] = static_cast<std::uint8_t>(v & 0xFFu);
    p[1] = static_cast<std::uint8_t>((v >> 8) & 0xFFu);
    p[2] = static_cast<std::uint8_t>((v >> 16) & 0xFFu);
    p[3] = static_cast<std::uint8_t>((v >> 24) & 0xFFu);
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

enum class ScanError {
    kOk = 0,
    kTruncatedPrefix,   // fewer than 4 bytes (but more than 0) left for element's prefix
    kTruncatedElement,  // element's declared length runs past the end of the buffer
    kTrailingBytes,     // bytes left over after expected_count elements
    kCountMismatch,     // buffer ends cleanly after fewer than expected_count elements
};

// Where one element's payload lies in the scanned buffer.
struct ElementSpan {
    std::size_t offset = 0;
    std::size_t length = 0;
};

struct ScanResult {
    ScanError error = ScanError::kOk;
    std::size_t expected = 0;  // expected_count passed to the scanner
    std::size_t element = 0;   // index of the offending element (see message())
    std::size_t decoded = 0;   // complete elements found before the error
    std::size_t offset = 0;    // byte offset the error refers to
    std::size_t remaining = 0; // bytes left at `offset`
    std::uint32_t declared = 0;  // declared length (kTruncatedElement only)

    bool ok() const noexcept { return error == ScanError::kOk; }

    std::string message() const {
        using std::to_string;
        switch (error) {
            case ScanError::kOk:
                return "ok";
            case ScanError::kTruncatedPrefix:
                return "buffer ends inside the length prefix of element " + to_string(element) +
                       " (offset " + to_string(offset) + ": " + to_string(remaining) +
                       " of 4 bytes present)";
            case ScanError::kTruncatedElement:
                return "element " + to_string(element) + " declares " + to_string(declared) +
                       " bytes but only " + to_string(remaining) + " remain at offset " +
                       to_string(offset);
            case ScanError::kTrailingBytes:
                if (expected == 0) {
                    return "expected 0 elements, buffer holds trailing " + to_string(remaining) +
                           " bytes at offset " + to_string(offset);
                }
                return "expected " + to_string(expected) + " elements, buffer holds trailing " +
                       to_string(remaining) + " bytes after element " + to_string(expected - 1) +
                       " at offset " + to_string(offset);
            case ScanError::kCountMismatch:
                return "expected " + to_string(expected) + " elements, buffer holds only " +
                       to_string(decoded) + " (" + to_string(offset) + " bytes)";
        }
        return "unknown error";
    }
};

// Validates `size` bytes at `data` as exactly `expected_count` BYTES elements.
// When `out` is non-null it must have room for `expected_count` spans; span i is
// written once element i has been validated. `data` may be null when `size` is 0.
inline ScanResult scan_bytes(const std::uint8_t* data, std::size_t size,
                             std::size_t expected_count, ElementSpan* out) noexcept {
    ScanResult r;
    r.expected = expected_count;
    std::size_t pos = 0;  // invariant: pos <= size
    for (std::size_t i = 0; i < expected_count; ++i) {
        const std::size_t left = size - pos;
        if (left < kLengthPrefixSize) {
            r.error = left == 0 ? ScanError::kCountMismatch : ScanError::kTruncatedPrefix;
            r.element = i;
            r.decoded = i;
            r.offset = pos;
            r.remaining = left;
            return r;
        }
        const std::uint32_t len = load_u32_le(data + pos);
        pos += kLengthPrefixSize;
        const std::size_t avail = size - pos;
        // Compare in 64 bits so the check is also right where size_t is 32 bits wide.
        if (static_cast<std::uint64_t>(len) > static_cast<std::uint64_t>(avail)) {
            r.error = ScanError::kTruncatedElement;
            r.element = i;
            r.decoded = i;
            r.offset = pos;
            r.remaining = avail;
            r.declared = len;
            return r;
        }
        if (out != nullptr) {
            out[i].offset = pos;
            out[i].length = len;
        }
        pos += len;
    }
    r.decoded = expected_count;
    if (pos != size) {
        r.error = ScanError::kTrailingBytes;
        r.element = expected_count;
        r.offset = pos;
        r.remaining = size - pos;
    }
    return r;
}

// Convenience overload filling a vector. A buffer of `size` bytes can hold at most
// size / 4 elements, so a larger `expected_count` is diagnosed by a validation-only
// pass before anything is allocated (an absurd count never turns into a huge
// allocation).
inline ScanResult scan_bytes(const std::uint8_t* data, std::size_t size,
                             std::size_t expected_count, std::vector<ElementSpan>& out) {
    out.clear();
    if (expected_count > size / kLengthPrefixSize) {
        return scan_bytes(data, size, expected_count, static_cast<ElementSpan*>(nullptr));
    }
    out.resize(expected_count);
    ScanResult r = scan_bytes(data, size, expected_count, out.data());
    if (!r.ok()) {
        out.clear();
    }
    return r;
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

// One element to encode: `size` bytes at `data` (`data` may be null when size is 0).
struct ByteView {
    const std::uint8_t* data = nullptr;
    std::size_t size = 0;
};

enum class EncodeError {
    kOk = 0,
    kElementTooLarge,  // an element is longer than UINT32_MAX bytes
    kTotalOverflow,    // the encoded size does not fit in size_t
    kBufferTooSmall,   // output buffer smaller than the encoded size
};

struct EncodeResult {
    EncodeError error = EncodeError::kOk;
    std::size_t element = 0;  // offending element (kElementTooLarge, kTotalOverflow)
    std::size_t length = 0;   // its length
    std::size_t total = 0;    // encoded size (on success) or bytes needed so far

    bool ok() const noexcept { return error == EncodeError::kOk; }

    std::string message() const {
        using std::to_string;
        switch (error) {
            case EncodeError::kOk:
                return "ok";
            case EncodeError::kElementTooLarge:
                return "element " + to_string(element) + " is " + to_string(length) +
                       " bytes, more than the 4294967295 a BYTES length prefix can hold";
            case EncodeError::kTotalOverflow:
                return "encoded size overflows at element " + to_string(element);
            case EncodeError::kBufferTooSmall:
                return "output buffer too small: need at least " + to_string(total) + " bytes";
        }
        return "unknown error";
    }
};

// Computes the encoded size of `n` elements into result.total.
inline EncodeResult encoded_size(const ByteView* items, std::size_t n) noexcept {
    EncodeResult r;
    constexpr std::size_t kMax = std::numeric_limits<std::size_t>::max();
    std::size_t total = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const std::size_t len = items[i].size;
        if (static_cast<std::uint64_t>(len) > kMaxElementSize) {
            r.error = EncodeError::kElementTooLarge;
            r.element = i;
            r.length = len;
            r.total = total;
            return r;
        }
        if (len > kMax - kLengthPrefixSize || total > kMax - kLengthPrefixSize - len) {
            r.error = EncodeError::kTotalOverflow;
            r.element = i;
            r.length = len;
            r.total = total;
            return r;
        }
        total += kLengthPrefixSize + len;
    }
    r.total = total;
    return r;
}

// Writes the encoding of `n` elements into `out` (capacity `out_size`); result.total
// is the number of bytes written. Validates as it goes, so calling it without
// encoded_size() is safe; on error the contents of `out` are unspecified.
inline EncodeResult encode_into(const ByteView* items, std::size_t n, std::uint8_t* out,
                                std::size_t out_size) noexcept {
    EncodeResult r;
    std::size_t pos = 0;  // invariant: pos <= out_size
    for (std::size_t i = 0; i < n; ++i) {
        const std::size_t len = items[i].size;
        if (static_cast<std::uint64_t>(len) > kMaxElementSize) {
            r.error = EncodeError::kElementTooLarge;
            r.element = i;
            r.length = len;
            r.total = pos;
            return r;
        }
        const std::size_t room = out_size - pos;
        if (room < kLengthPrefixSize || len > room - kLengthPrefixSize) {
            r.error = EncodeError::kBufferTooSmall;
            r.element = i;
            r.length = len;
            // Best-effort figure for the message; saturates rather than overflowing.
            const std::size_t headroom = std::numeric_limits<std::size_t>::max() - pos;
            r.total = (headroom < kLengthPrefixSize || len > headroom - kLengthPrefixSize)
                          ? std::numeric_limits<std::size_t>::max()
                          : pos + kLengthPrefixSize + len;
            return r;
        }
        store_u32_le(out + pos, static_cast<std::uint32_t>(len));
        pos += kLengthPrefixSize;
        if (len != 0) {
            std::memcpy(out + pos, items[i].data, len);
            pos += len;
        }
    }
    r.total = pos;
    return r;
}

// Convenience: encode into a fresh vector.
inline EncodeResult encode_bytes(const ByteView* items, std::size_t n,
                                 std::vector<std::uint8_t>& out) {
    out.clear();
    EncodeResult r = encoded_size(items, n);
    if (!r.ok()) {
        return r;
    }
    out.resize(r.total);
    return encode_into(items, n, out.data(), out.size());
}

}  // namespace peregrine
