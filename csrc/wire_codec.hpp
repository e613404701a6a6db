// Protobuf wire codec for the two hot messages of GRPCInferenceService
// (proto/grpc_service.proto): ModelInferRequest is parsed into spans of the
// input buffer, ModelInferResponse (optionally wrapped in a
// ModelStreamInferResponse) is written from plain views.
//
// Header-only and free of Python. The parser follows what the protobuf runtime
// (upb, the Python runtime's decoder) accepts and rejects, so that either can
// be the oracle of the other:
//   - varints have at most 10 bytes (bits past 64 are dropped); a tag at most
//     5 bytes and no more than 32 bits; field number 0 is malformed, except
//     inside an unknown group, whose contents upb only checks for wire types
//     and the matching end;
//   - a length is below INT32_MAX and at most the bytes that remain;
//   - wire types 6 and 7 are malformed; an end-group tag is valid only as the
//     match of an open group (same field number);
//   - a known field number met with another wire type is an unknown field
//     (repeated scalars accept both the packed and the unpacked form);
//   - unknown fields are skipped, unknown groups parsed for well-formedness;
//   - submessages and groups nest at most kMaxDepth deep;
//   - every string field (also map keys) must be valid UTF-8;
//   - last value wins for singular fields and oneofs, a submessage met twice
//     is merged, a map entry missing its key or value takes the default, and
//     a map entry holding an unknown field is dropped (upb's behaviour).
// Every bound is checked as "length <= remaining", so no arithmetic overflows
// and nothing is read past the buffer.

#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace peregrine {
namespace wire {

inline constexpr int kMaxDepth = 100;  // upb's default recursion limit

enum WireType : std::uint32_t {
    kVarint = 0,
    kFixed64 = 1,
    kLengthDelimited = 2,
    kStartGroup = 3,
    kEndGroup = 4,
    kFixed32 = 5,
};

// `size` bytes at `offset` of the parsed buffer.
struct Span {
    std::size_t offset = 0;
    std::size_t size = 0;
};

// The oneof of InferParameter, by field number; kNone when no member is set.
enum class ParamKind : std::uint8_t {
    kNone = 0,
    kBool = 1,
    kInt64 = 2,
    kString = 3,
    kDouble = 4,
    kUint64 = 5,
};

// One map<string, InferParameter> entry. `bits` holds the varint (bool, int64,
// uint64) or the IEEE-754 bits (double); `text` the string.
struct Param {
    Span key;
    ParamKind kind = ParamKind::kNone;
    std::uint64_t bits = 0;
    Span text;
};

struct InputTensor {
    Span name;
    Span datatype;
    std::vector<std::int64_t> shape;
    std::vector<Param> params;  // in wire order; a later duplicate key replaces
    // Every occurrence of the InferTensorContents field: the protobuf runtime
    // merges them, which is what parsing their concatenation gives.
    std::vector<Span> contents;
};

struct RequestedOutput {
    Span name;
    std::vector<Param> params;
};

struct InferRequest {
    Span model_name;
    Span model_version;
    Span id;
    std::vector<Param> params;
    std::vector<InputTensor> inputs;
    std::vector<RequestedOutput> outputs;
    std::vector<Span> raw_input_contents;
};

// Entries one request may hold in all: inputs, requested outputs, raw contents,
// parameter map entries, shape dims and typed-contents fields. Each costs the
// parse a few tens of bytes for a few bytes of message, so without a bound a
// message of tiny entries would cost many times its size.
inline constexpr std::size_t kMaxRequestEntries = 65536;

struct ParseError {
    bool failed = false;
    // The request holds more than kMaxRequestEntries entries (not malformed).
    bool too_many_entries = false;
    std::size_t offset = 0;  // where in the buffer the problem is
    std::string message;
    std::size_t entries = 0;  // counted so far
};

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

// Strict UTF-8, as protobuf and Python decode it: no overlong forms, no
// surrogates, nothing above U+10FFFF.
inline bool valid_utf8(const std::uint8_t* p, std::size_t n) noexcept {
    std::size_t i = 0;
    while (i < n) {
        const std::uint8_t c = p[i];
        if (c < 0x80) {
            ++i;
            continue;
        }
        std::size_t extra = 0;
        std::uint8_t lo = 0x80;
        std::uint8_t hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            extra = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            extra = 2;
            if (c == 0xE0) {
                lo = 0xA0;
            } else if (c == 0xED) {
                hi = 0x9F;
            }
        } else if (c >= 0xF0 && c <= 0xF4) {
            extra = 3;
            if (c == 0xF0) {
                lo = 0x90;
            } else if (c == 0xF4) {
                hi = 0x8F;
            }
        } else {
            return false;
        }
        if (n - i - 1 < extra) {
            return false;
        }
        if (p[i + 1] < lo || p[i + 1] > hi) {
            return false;
        }
        for (std::size_t k = 2; k <= extra; ++k) {
            if ((p[i + k] & 0xC0) != 0x80) {
                return false;
            }
        }
        i += extra + 1;
    }
    return true;
}

namespace detail {

// Counts one more entry of the request; false (and the error set) past the bound.
inline bool count_entry(ParseError& error, std::size_t at) {
    if (++error.entries <= kMaxRequestEntries) {
        return true;
    }
    if (!error.failed) {
        error.failed = true;
        error.too_many_entries = true;
        error.offset = at;
        error.message = "the request holds more than " + std::to_string(kMaxRequestEntries) +
                        " entries (inputs, outputs, raw contents, parameters, shape dims); "
                        "the server takes at most " + std::to_string(kMaxRequestEntries);
    }
    return false;
}

// Reads one message (or group body) of the buffer; positions are absolute.
class Reader {
public:
    Reader(const std::uint8_t* data, std::size_t pos, std::size_t end, ParseError& error) noexcept
        : data_(data), pos_(pos), end_(end), error_(error) {}

    bool done() const noexcept { return pos_ >= end_; }
    std::size_t pos() const noexcept { return pos_; }

    bool fail(std::size_t at, std::string message) {
        if (!error_.failed) {
            error_.failed = true;
            error_.offset = at;
            error_.message = std::move(message);
        }
        return false;
    }

    bool varint(std::uint64_t& out, const char* what) {
        const std::size_t start = pos_;
        std::uint64_t value = 0;
        for (int i = 0; i < 10; ++i) {
            if (pos_ >= end_) {
                return fail(start, std::string("truncated varint (") + what + ")");
            }
            const std::uint8_t b = data_[pos_++];
            if (i < 9) {
                value |= static_cast<std::uint64_t>(b & 0x7F) << (7 * i);
            } else {
                value |= static_cast<std::uint64_t>(b & 0x01) << 63;
            }
            if ((b & 0x80) == 0) {
                out = value;
                return true;
            }
        }
        return fail(start, std::string("varint longer than 10 bytes (") + what + ")");
    }

    // A tag: at most 5 bytes and 32 bits, a field number above 0 (any inside an unknown
    // group: `in_group`), a wire type below 6.
    bool tag(std::uint32_t& field, std::uint32_t& wire_type, bool in_group = false) {
        const std::size_t start = pos_;
        std::uint64_t value = 0;
        if (!varint(value, "tag")) {
            return false;
        }
        if (pos_ - start > 5 || value > std::numeric_limits<std::uint32_t>::max()) {
            return fail(start, "tag does not fit in 32 bits");
        }
        field = static_cast<std::uint32_t>(value >> 3);
        wire_type = static_cast<std::uint32_t>(value & 7);
        if (field == 0 && !in_group) {
            return fail(start, "field number 0");
        }
        if (wire_type > kFixed32) {
            return fail(start, "invalid wire type " + std::to_string(wire_type) + " (field " +
                                   std::to_string(field) + ")");
        }
        return true;
    }

    bool fixed(std::size_t width, std::uint64_t& out, std::uint32_t field) {
        if (end_ - pos_ < width) {
            return fail(pos_, "field " + std::to_string(field) + ": " + std::to_string(width) +
                                  "-byte value truncated (" + std::to_string(end_ - pos_) +
                                  " bytes remain)");
        }
        std::uint64_t value = 0;
        for (std::size_t k = 0; k < width; ++k) {
            value |= static_cast<std::uint64_t>(data_[pos_ + k]) << (8 * k);
        }
        pos_ += width;
        out = value;
        return true;
    }

    bool length_delimited(Span& out, std::uint32_t field) {
        const std::size_t start = pos_;
        std::uint64_t length = 0;
        if (!varint(length, "length")) {
            return false;
        }
        const std::size_t left = end_ - pos_;
        if (length >= static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max()) ||
            length > static_cast<std::uint64_t>(left)) {
            return fail(start, "field " + std::to_string(field) + ": length " +
                                   std::to_string(length) + " runs past the end (" +
                                   std::to_string(left) + " bytes remain)");
        }
        out.offset = pos_;
        out.size = static_cast<std::size_t>(length);
        pos_ += out.size;
        return true;
    }

    bool string(Span& out, std::uint32_t field, const char* what) {
        if (!length_delimited(out, field)) {
            return false;
        }
        if (!valid_utf8(data_ + out.offset, out.size)) {
            return fail(out.offset, std::string(what) + " is not valid UTF-8");
        }
        return true;
    }

    // Skips the value of an unknown field whose tag was just read at `tag_at`.
    bool skip(std::uint32_t field, std::uint32_t wire_type, int depth, std::size_t tag_at) {
        std::uint64_t scratch = 0;
        Span span;
        switch (wire_type) {
            case kVarint:
                return varint(scratch, "unknown field");
            case kFixed64:
                return fixed(8, scratch, field);
            case kLengthDelimited:
                return length_delimited(span, field);
            case kFixed32:
                return fixed(4, scratch, field);
            case kStartGroup:
                return skip_group(field, depth + 1, tag_at);
            default:  // kEndGroup: only valid as the end of an open group
                return fail(tag_at, "end-group tag (field " + std::to_string(field) +
                                        ") without a matching start");
        }
    }

    bool skip_group(std::uint32_t group_field, int depth, std::size_t start) {
        if (depth > kMaxDepth) {
            return fail(start, "nesting deeper than " + std::to_string(kMaxDepth));
        }
        while (pos_ < end_) {
            const std::size_t at = pos_;
            std::uint32_t field = 0;
            std::uint32_t wire_type = 0;
            if (!tag(field, wire_type, true)) {
                return false;
            }
            if (wire_type == kEndGroup) {
                if (field != group_field) {
                    return fail(at, "group " + std::to_string(group_field) +
                                        " closed by end-group tag of field " +
                                        std::to_string(field));
                }
                return true;
            }
            if (!skip(field, wire_type, depth, at)) {
                return false;
            }
        }
        return fail(start, "group " + std::to_string(group_field) + " is not closed");
    }

    const std::uint8_t* data() const noexcept { return data_; }

private:
    const std::uint8_t* data_;
    std::size_t pos_;
    std::size_t end_;
    ParseError& error_;
};

// Runs `on_field(reader, field, wire_type, tag_at)` for every field of the
// message in `span`; `on_field` returns 1 when it consumed the field, 0 to have
// it skipped as unknown, -1 on error.
template <typename OnField>
bool for_each_field(const std::uint8_t* data, Span span, int depth, ParseError& error,
                    OnField&& on_field) {
    Reader r(data, span.offset, span.offset + span.size, error);
    if (depth > kMaxDepth) {
        return r.fail(span.offset, "nesting deeper than " + std::to_string(kMaxDepth));
    }
    while (!r.done()) {
        const std::size_t at = r.pos();
        std::uint32_t field = 0;
        std::uint32_t wire_type = 0;
        if (!r.tag(field, wire_type)) {
            return false;
        }
        const int handled = on_field(r, field, wire_type, at);
        if (handled < 0) {
            return false;
        }
        if (handled == 0 && !r.skip(field, wire_type, depth, at)) {
            return false;
        }
    }
    return true;
}

inline int ok(bool good) noexcept { return good ? 1 : -1; }

// InferParameter: merged into `param` (a second occurrence of the value keeps
// the first's member unless it sets one).
inline bool parse_param_value(const std::uint8_t* data, Span span, int depth, ParseError& error,
                              Param& param) {
    return for_each_field(
        data, span, depth, error,
        [&](Reader& r, std::uint32_t field, std::uint32_t wt, std::size_t) -> int {
            std::uint64_t value = 0;
            if (field == 3 && wt == kLengthDelimited) {
                Span text;
                if (!r.string(text, field, "string_param")) {
                    return -1;
                }
                param.kind = ParamKind::kString;
                param.text = text;
                return 1;
            }
            if ((field == 1 || field == 2 || field == 5) && wt == kVarint) {
                if (!r.varint(value, "parameter")) {
                    return -1;
                }
                param.kind = static_cast<ParamKind>(field);
                param.bits = value;
                return 1;
            }
            if (field == 4 && wt == kFixed64) {
                if (!r.fixed(8, value, field)) {
                    return -1;
                }
                param.kind = ParamKind::kDouble;
                param.bits = value;
                return 1;
            }
            return 0;
        });
}

// One map<string, InferParameter> entry: key = 1, value = 2. As upb does, an
// entry holding an unknown field (a key or value of another wire type counts)
// is left out of the map (upb keeps it among the parent's unknown fields).
inline bool parse_map_entry(const std::uint8_t* data, Span span, int depth, ParseError& error,
                            std::vector<Param>& params) {
    Param entry;
    bool unknown = false;
    const bool good = for_each_field(
        data, span, depth, error,
        [&](Reader& r, std::uint32_t field, std::uint32_t wt, std::size_t) -> int {
            if (wt != kLengthDelimited || (field != 1 && field != 2)) {
                unknown = true;
                return 0;
            }
            if (field == 1) {
                return ok(r.string(entry.key, field, "parameter key"));
            }
            Span value;
            return ok(r.length_delimited(value, field) &&
                      parse_param_value(data, value, depth + 1, error, entry));
        });
    if (good && !unknown) {
        if (!count_entry(error, span.offset)) {
            return false;
        }
        params.push_back(entry);
    }
    return good;
}

// InferTensorContents, checked only: the caller parses it with the protobuf
// runtime (it is the rare path). Fields 1-5 are varints, 6 fixed32, 7
// fixed64, 8 bytes; the repeated scalars packed or not.
inline bool check_contents(const std::uint8_t* data, Span span, int depth, ParseError& error) {
    return for_each_field(
        data, span, depth, error,
        [&](Reader& r, std::uint32_t field, std::uint32_t wt, std::size_t) -> int {
            if (field < 1 || field > 8) {
                return 0;
            }
            if (field == 8 || wt != kLengthDelimited) {
                return 0;  // bytes, or an unpacked scalar: skipping checks it
            }
            Span packed;
            if (!r.length_delimited(packed, field)) {
                return -1;
            }
            const std::size_t width = field == 6 ? 4 : field == 7 ? 8 : 0;
            if (width != 0) {
                if (packed.size % width != 0) {
                    r.fail(packed.offset, "contents field " + std::to_string(field) +
                                              ": packed length " + std::to_string(packed.size) +
                                              " is not a multiple of " + std::to_string(width));
                    return -1;
                }
                return 1;
            }
            Reader values(data, packed.offset, packed.offset + packed.size, error);
            std::uint64_t scratch = 0;
            while (!values.done()) {
                if (!values.varint(scratch, "packed contents")) {
                    return -1;
                }
            }
            return 1;
        });
}

inline bool parse_input(const std::uint8_t* data, Span span, int depth, ParseError& error,
                        InputTensor& input) {
    return for_each_field(
        data, span, depth, error,
        [&](Reader& r, std::uint32_t field, std::uint32_t wt, std::size_t) -> int {
            Span sub;
            switch (field) {
                case 1:
                    return wt == kLengthDelimited ? ok(r.string(input.name, field, "input name"))
                                                  : 0;
                case 2:
                    return wt == kLengthDelimited
                               ? ok(r.string(input.datatype, field, "input datatype"))
                               : 0;
                case 3: {
                    std::uint64_t dim = 0;
                    if (wt == kVarint) {
                        if (!r.varint(dim, "shape") || !count_entry(error, r.pos())) {
                            return -1;
                        }
                        input.shape.push_back(static_cast<std::int64_t>(dim));
                        return 1;
                    }
                    if (wt != kLengthDelimited) {
                        return 0;
                    }
                    if (!r.length_delimited(sub, field)) {
                        return -1;
                    }
                    Reader dims(data, sub.offset, sub.offset + sub.size, error);
                    while (!dims.done()) {
                        if (!dims.varint(dim, "packed shape") ||
                            !count_entry(error, dims.pos())) {
                            return -1;
                        }
                        input.shape.push_back(static_cast<std::int64_t>(dim));
                    }
                    return 1;
                }
                case 4:
                    if (wt != kLengthDelimited) {
                        return 0;
                    }
                    return ok(r.length_delimited(sub, field) &&
                              parse_map_entry(data, sub, depth + 1, error, input.params));
                case 5:
                    if (wt != kLengthDelimited) {
                        return 0;
                    }
                    if (!r.length_delimited(sub, field) ||
                        !check_contents(data, sub, depth + 1, error) ||
                        !count_entry(error, sub.offset)) {
                        return -1;
                    }
                    input.contents.push_back(sub);
                    return 1;
                default:
                    return 0;
            }
        });
}

inline bool parse_output(const std::uint8_t* data, Span span, int depth, ParseError& error,
                         RequestedOutput& output) {
    return for_each_field(
        data, span, depth, error,
        [&](Reader& r, std::uint32_t field, std::uint32_t wt, std::size_t) -> int {
            if (wt != kLengthDelimited) {
                return 0;
            }
            if (field == 1) {
                return ok(r.string(output.name, field, "output name"));
            }
            if (field == 2) {
                Span sub;
                return ok(r.length_delimited(sub, field) &&
                          parse_map_entry(data, sub, depth + 1, error, output.params));
            }
            return 0;
        });
}

}  // namespace detail

// Parses `size` bytes at `data` as a ModelInferRequest into `out` (reset
// first). On failure returns false and describes the first problem in `error`.
inline bool parse_infer_request(const std::uint8_t* data, std::size_t size, InferRequest& out,
                                ParseError& error) {
    using detail::ok;
    out = InferRequest{};
    error = ParseError{};
    return detail::for_each_field(
        data, Span{0, size}, 0, error,
        [&](detail::Reader& r, std::uint32_t field, std::uint32_t wt, std::size_t) -> int {
            if (wt != kLengthDelimited) {
                return 0;
            }
            Span sub;
            switch (field) {
                case 1:
                    return ok(r.string(out.model_name, field, "model_name"));
                case 2:
                    return ok(r.string(out.model_version, field, "model_version"));
                case 3:
                    return ok(r.string(out.id, field, "id"));
                case 4:
                    return ok(r.length_delimited(sub, field) &&
                              detail::parse_map_entry(data, sub, 1, error, out.params));
                case 5: {
                    if (!r.length_delimited(sub, field) ||
                        !detail::count_entry(error, sub.offset)) {
                        return -1;
                    }
                    InputTensor& input = out.inputs.emplace_back();
                    return ok(detail::parse_input(data, sub, 1, error, input));
                }
                case 6: {
                    if (!r.length_delimited(sub, field) ||
                        !detail::count_entry(error, sub.offset)) {
                        return -1;
                    }
                    RequestedOutput& output = out.outputs.emplace_back();
                    return ok(detail::parse_output(data, sub, 1, error, output));
                }
                case 7:
                    if (!r.length_delimited(sub, field) ||
                        !detail::count_entry(error, sub.offset)) {
                        return -1;
                    }
                    out.raw_input_contents.push_back(sub);
                    return 1;
                default:
                    return 0;
            }
        });
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

// `size` bytes at `data` (null allowed when size is 0).
struct Bytes {
    const std::uint8_t* data = nullptr;
    std::size_t size = 0;
};

// One parameter to write: `bits` as for Param, `text` for a string.
struct OutParam {
    Bytes key;
    ParamKind kind = ParamKind::kNone;
    std::uint64_t bits = 0;
    Bytes text;
};

struct OutputView {
    Bytes name;
    Bytes datatype;
    const std::int64_t* shape = nullptr;
    std::size_t rank = 0;
};

// A ModelInferResponse. With `stream`, it is wrapped as the infer_response of a
// ModelStreamInferResponse whose error_message is `error_message`.
struct ResponseView {
    Bytes model_name;
    Bytes model_version;
    Bytes id;
    std::vector<OutParam> params;  // written in this order
    std::vector<OutputView> outputs;
    std::vector<Bytes> raw_output_contents;
    bool stream = false;
    Bytes error_message;
};

namespace detail {

inline std::size_t varint_size(std::uint64_t v) noexcept {
    std::size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        ++n;
    }
    return n;
}

// Sizes of one field: tag (fields here are below 16: one byte) + payload.
inline std::size_t ld_size(std::size_t payload) noexcept {
    return 1 + varint_size(payload) + payload;
}

inline std::size_t string_field_size(const Bytes& s) noexcept {
    return s.size == 0 ? 0 : ld_size(s.size);  // proto3: an empty string is not written
}

inline std::size_t param_value_size(const OutParam& p) noexcept {
    switch (p.kind) {
        case ParamKind::kBool:
            return 2;
        case ParamKind::kInt64:
        case ParamKind::kUint64:
            return 1 + varint_size(p.bits);
        case ParamKind::kDouble:
            return 9;
        case ParamKind::kString:
            return ld_size(p.text.size);
        case ParamKind::kNone:
            return 0;
    }
    return 0;
}

inline std::size_t map_entry_size(const OutParam& p) noexcept {
    return ld_size(p.key.size) + ld_size(param_value_size(p));
}

inline std::size_t packed_shape_size(const OutputView& o) noexcept {
    std::size_t n = 0;
    for (std::size_t k = 0; k < o.rank; ++k) {
        n += varint_size(static_cast<std::uint64_t>(o.shape[k]));
    }
    return n;
}

inline std::size_t output_size(const OutputView& o) noexcept {
    const std::size_t shape = packed_shape_size(o);
    return string_field_size(o.name) + string_field_size(o.datatype) +
           (shape == 0 ? 0 : ld_size(shape));
}

class Writer {
public:
    explicit Writer(std::uint8_t* out) noexcept : p_(out) {}

    void byte(std::uint8_t b) noexcept { *p_++ = b; }
    void varint(std::uint64_t v) noexcept {
        while (v >= 0x80) {
            *p_++ = static_cast<std::uint8_t>(v | 0x80);
            v >>= 7;
        }
        *p_++ = static_cast<std::uint8_t>(v);
    }
    void raw(const Bytes& b) noexcept {
        if (b.size != 0) {
            std::memcpy(p_, b.data, b.size);
            p_ += b.size;
        }
    }
    void header(std::uint32_t field, std::size_t length) noexcept {
        byte(static_cast<std::uint8_t>((field << 3) | kLengthDelimited));
        varint(length);
    }
    void bytes_field(std::uint32_t field, const Bytes& b) noexcept {
        header(field, b.size);
        raw(b);
    }
    void string_field(std::uint32_t field, const Bytes& s) noexcept {
        if (s.size != 0) {
            bytes_field(field, s);
        }
    }
    void param_entry(std::uint32_t field, const OutParam& p) noexcept {
        const std::size_t value = param_value_size(p);
        header(field, ld_size(p.key.size) + ld_size(value));
        bytes_field(1, p.key);
        header(2, value);
        const auto member = static_cast<std::uint32_t>(p.kind);
        switch (p.kind) {
            case ParamKind::kBool:
                byte(static_cast<std::uint8_t>(member << 3));
                byte(p.bits != 0 ? 1 : 0);
                break;
            case ParamKind::kInt64:
            case ParamKind::kUint64:
                byte(static_cast<std::uint8_t>(member << 3));
                varint(p.bits);
                break;
            case ParamKind::kDouble:
                byte(static_cast<std::uint8_t>((member << 3) | kFixed64));
                for (int k = 0; k < 8; ++k) {
                    byte(static_cast<std::uint8_t>(p.bits >> (8 * k)));
                }
                break;
            case ParamKind::kString:
                bytes_field(member, p.text);
                break;
            case ParamKind::kNone:
                break;
        }
    }

    std::uint8_t* position() const noexcept { return p_; }

private:
    std::uint8_t* p_;
};

inline std::size_t infer_response_size(const ResponseView& r) noexcept {
    std::size_t n = string_field_size(r.model_name) + string_field_size(r.model_version) +
                    string_field_size(r.id);
    for (const OutParam& p : r.params) {
        n += ld_size(map_entry_size(p));
    }
    for (const OutputView& o : r.outputs) {
        n += ld_size(output_size(o));
    }
    for (const Bytes& b : r.raw_output_contents) {
        n += ld_size(b.size);
    }
    return n;
}

}  // namespace detail

// The encoded size of `r`: the exact capacity encode_response() needs.
inline std::size_t encoded_response_size(const ResponseView& r) noexcept {
    const std::size_t inner = detail::infer_response_size(r);
    if (!r.stream) {
        return inner;
    }
    return detail::string_field_size(r.error_message) + detail::ld_size(inner);
}

// Writes `r` into `out`, which holds exactly encoded_response_size(r) bytes:
// the bytes the protobuf runtime serializes for the same message (fields in
// number order, proto3 defaults omitted, map entries in the order given).
inline void encode_response(const ResponseView& r, std::uint8_t* out) noexcept {
    detail::Writer w(out);
    if (r.stream) {
        w.string_field(1, r.error_message);
        w.header(2, detail::infer_response_size(r));
    }
    w.string_field(1, r.model_name);
    w.string_field(2, r.model_version);
    w.string_field(3, r.id);
    for (const OutParam& p : r.params) {
        w.param_entry(4, p);
    }
    for (const OutputView& o : r.outputs) {
        w.header(5, detail::output_size(o));
        w.string_field(1, o.name);
        w.string_field(2, o.datatype);
        const std::size_t shape = detail::packed_shape_size(o);
        if (shape != 0) {
            w.header(3, shape);
            for (std::size_t k = 0; k < o.rank; ++k) {
                w.varint(static_cast<std::uint64_t>(o.shape[k]));
            }
        }
    }
    for (const Bytes& b : r.raw_output_contents) {
        w.bytes_field(6, b);
    }
}

}  // namespace wire
}  // namespace peregrine
