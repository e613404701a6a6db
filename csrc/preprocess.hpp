// Image preprocessing fused with packing: uint8 HWC images -> one normalised batch tensor.
//
// For every output element the kernel computes, in float32,
//
//     v   = the source pixel, or its bilinear interpolation when the image is resized
//     out = v * a[c] + b[c]            (a = scale / std, b = -mean / std, per channel)
//
// and stores it as float32, float16, bfloat16 (both round-to-nearest-even) or float64, in
// NCHW or NHWC order, straight into the image's slot of the batch buffer: the batch is
// written once, with no intermediate image.
//
// Geometry, per image of H x W pixels:
//   resize   none, exact (RH x RW), or shorter side S (the longer side becomes
//            floor(long * S / short), aspect kept);
//   crop     a centre window of the model's OH x OW at offset (floor((RH - OH) / 2),
//            floor((RW - OW) / 2)) of the resized image; without a crop the resized
//            image must be OH x OW already.
// Bilinear sampling uses half-pixel centres (align_corners = false, as OpenCV's INTER_LINEAR
// and ONNX Resize "half_pixel"): the source coordinate of resized pixel d is
// (d + 0.5) * (in / resized) - 0.5 computed in double, clamped below at 0; neighbours are
// clamped to the last pixel. No antialiasing filter is applied when shrinking. The numpy
// oracle (server/preprocess/reference.py) performs the same operations in the same order.
//
// Header-only and free of Python. All sizes are validated by plan_image() before any
// pointer arithmetic; the kernels themselves only index inside the validated extents.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "packing.hpp"

namespace peregrine {

inline constexpr std::size_t kMaxChannels = 4;

enum class ResizeMode { kNone = 0, kExact, kShorterSide };
enum class Layout { kNCHW = 0, kNHWC };
enum class OutType { kFloat32 = 0, kFloat16, kBFloat16, kFloat64 };

inline std::size_t out_itemsize(OutType t) noexcept {
    switch (t) {
        case OutType::kFloat32:
            return 4;
        case OutType::kFloat16:
        case OutType::kBFloat16:
            return 2;
        case OutType::kFloat64:
            return 8;
    }
    return 4;
}

// What a model declares, fixed at load.
struct ImageSpec {
    std::size_t channels = 3;
    std::size_t out_h = 0;  // the model input's spatial size
    std::size_t out_w = 0;
    ResizeMode resize = ResizeMode::kNone;
    std::size_t resize_h = 0;  // kExact
    std::size_t resize_w = 0;  // kExact
    std::size_t shorter = 0;   // kShorterSide
    bool crop = false;
    Layout layout = Layout::kNCHW;
    OutType out = OutType::kFloat32;
    float a[kMaxChannels] = {1.0f, 1.0f, 1.0f, 1.0f};
    float b[kMaxChannels] = {0.0f, 0.0f, 0.0f, 0.0f};
};

// Where one source image's pixels come from, decided per image.
struct ImageGeometry {
    std::size_t in_h = 0;
    std::size_t in_w = 0;
    std::size_t resized_h = 0;
    std::size_t resized_w = 0;
    std::size_t top = 0;   // crop offset in the resized image
    std::size_t left = 0;
    bool resampled = false;  // false: output pixels are source pixels (no interpolation)
};

enum class ImageError { kOk = 0, kEmpty, kTooSmall, kSizeMismatch, kOverflow };

struct ImageCheck {
    ImageError error = ImageError::kOk;
    ImageGeometry geometry;

    bool ok() const noexcept { return error == ImageError::kOk; }

    std::string message(const ImageSpec& spec) const {
        using std::to_string;
        const std::string got = to_string(geometry.in_h) + "x" + to_string(geometry.in_w);
        const std::string want = to_string(spec.out_h) + "x" + to_string(spec.out_w);
        switch (error) {
            case ImageError::kOk:
                return "ok";
            case ImageError::kEmpty:
                return "image of " + got + " pixels is empty";
            case ImageError::kTooSmall:
                return "image of " + got + " pixels (" + to_string(geometry.resized_h) + "x" +
                       to_string(geometry.resized_w) + " after resizing) is smaller than the " +
                       want + " centre crop";
            case ImageError::kSizeMismatch:
                return "image of " + got + " pixels must be " + want +
                       " (the model input's size; the model resizes or crops nothing)";
            case ImageError::kOverflow:
                return "image of " + got + " pixels is too large";
        }
        return "unknown error";
    }
};

// Decides the geometry of one H x W image and checks it can produce the model's size.
inline ImageCheck plan_image(const ImageSpec& spec, std::size_t h, std::size_t w) noexcept {
    ImageCheck r;
    ImageGeometry& g = r.geometry;
    g.in_h = h;
    g.in_w = w;
    if (h == 0 || w == 0) {
        r.error = ImageError::kEmpty;
        return r;
    }
    switch (spec.resize) {
        case ResizeMode::kNone:
            g.resized_h = h;
            g.resized_w = w;
            break;
        case ResizeMode::kExact:
            g.resized_h = spec.resize_h;
            g.resized_w = spec.resize_w;
            break;
        case ResizeMode::kShorterSide: {
            std::size_t scaled = 0;
            if (h <= w) {
                if (!checked_mul(w, spec.shorter, scaled)) {
                    r.error = ImageError::kOverflow;
                    return r;
                }
                g.resized_h = spec.shorter;
                g.resized_w = scaled / h;
            } else {
                if (!checked_mul(h, spec.shorter, scaled)) {
                    r.error = ImageError::kOverflow;
                    return r;
                }
                g.resized_w = spec.shorter;
                g.resized_h = scaled / w;
            }
            break;
        }
    }
    if (spec.crop) {
        if (g.resized_h < spec.out_h || g.resized_w < spec.out_w) {
            r.error = ImageError::kTooSmall;
            return r;
        }
        g.top = (g.resized_h - spec.out_h) / 2;
        g.left = (g.resized_w - spec.out_w) / 2;
    } else if (g.resized_h != spec.out_h || g.resized_w != spec.out_w) {
        r.error = ImageError::kSizeMismatch;
        return r;
    }
    g.resampled = g.resized_h != h || g.resized_w != w;
    // The kernels index source rows as y * w * channels: keep that representable.
    std::size_t bytes = 0;
    if (!checked_mul(h, w, bytes) || !checked_mul(bytes, spec.channels, bytes)) {
        r.error = ImageError::kOverflow;
    }
    return r;
}

// ---------------------------------------------------------------------------
// Element conversions
// ---------------------------------------------------------------------------

inline std::uint32_t float_bits(float f) noexcept {
    std::uint32_t u = 0;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(std::uint32_t u) noexcept {
    float f = 0.0f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// float32 -> IEEE binary16, round to nearest even (as numpy's astype(float16)). NaN becomes
// a quiet NaN; the kernel never produces one (the coefficients are finite, checked at load).
inline std::uint16_t float_to_half(float value) noexcept {
    std::uint32_t f = float_bits(value);
    const std::uint32_t sign = (f >> 16) & 0x8000u;
    f &= 0x7FFFFFFFu;
    std::uint32_t o = 0;
    if (f >= 0x47800000u) {  // >= 65536.0f: overflows to inf (or is inf / NaN)
        o = f > 0x7F800000u ? 0x7E00u : 0x7C00u;
    } else if (f < 0x38800000u) {  // < 2^-14: the result is subnormal or zero
        // Adding 0.5 aligns the binary16 subnormal ulp with float32's last mantissa bit, so
        // the float addition rounds (to nearest even) exactly as the conversion must.
        const float magic = bits_float(0x3F000000u);  // 0.5f
        o = float_bits(bits_float(f) + magic) - 0x3F000000u;
    } else {
        const std::uint32_t mant_odd = (f >> 13) & 1u;
        f += 0xC8000FFFu + mant_odd;  // rebias the exponent (-112 << 23) and round
        o = f >> 13;                  // a carry into the exponent rounds up to inf: correct
    }
    return static_cast<std::uint16_t>(o | sign);
}

// float32 -> bfloat16 (the top half of a float32), round to nearest even.
inline std::uint16_t float_to_bfloat16(float value) noexcept {
    const std::uint32_t f = float_bits(value);
    if ((f & 0x7FFFFFFFu) > 0x7F800000u) {
        return static_cast<std::uint16_t>((f >> 16) | 0x0040u);  // quiet NaN
    }
    const std::uint32_t rounded = f + 0x7FFFu + ((f >> 16) & 1u);
    return static_cast<std::uint16_t>(rounded >> 16);
}

template <OutType T>
struct OutElement;
template <>
struct OutElement<OutType::kFloat32> {
    using type = float;
    static float convert(float v) noexcept { return v; }
};
template <>
struct OutElement<OutType::kFloat16> {
    using type = std::uint16_t;
    static std::uint16_t convert(float v) noexcept { return float_to_half(v); }
};
template <>
struct OutElement<OutType::kBFloat16> {
    using type = std::uint16_t;
    static std::uint16_t convert(float v) noexcept { return float_to_bfloat16(v); }
};
template <>
struct OutElement<OutType::kFloat64> {
    using type = double;
    static double convert(float v) noexcept { return static_cast<double>(v); }
};

// ---------------------------------------------------------------------------
// Sampling tables
// ---------------------------------------------------------------------------

// For output index d along one axis: the two source indices and the weight of the second.
struct AxisTap {
    std::size_t i0 = 0;
    std::size_t i1 = 0;
    float f = 0.0f;
};

// Source taps for `out` output positions starting at `offset` of a `resized`-long axis
// resampled from `in` source pixels (see the header comment for the formula).
inline void axis_taps(std::size_t in, std::size_t resized, std::size_t offset, std::size_t out,
                      AxisTap* taps) noexcept {
    const double ratio = static_cast<double>(in) / static_cast<double>(resized);
    const std::size_t last = in - 1;
    for (std::size_t d = 0; d < out; ++d) {
        double src = (static_cast<double>(offset + d) + 0.5) * ratio - 0.5;
        if (src < 0.0) {
            src = 0.0;
        }
        const double fl = std::floor(src);
        std::size_t i0 = static_cast<std::size_t>(fl);
        AxisTap& t = taps[d];
        if (i0 >= last) {
            t.i0 = last;
            t.i1 = last;
            t.f = 0.0f;
        } else {
            t.i0 = i0;
            t.i1 = i0 + 1;
            t.f = static_cast<float>(src - fl);
        }
    }
}

// ---------------------------------------------------------------------------
// Kernels: one band of output rows of one image
// ---------------------------------------------------------------------------

// Output rows [y_begin, y_end) of one image without resampling (plain crop / copy).
template <OutType T, std::size_t C>
inline void rows_direct(const ImageSpec& spec, const ImageGeometry& g, const std::uint8_t* src,
                        typename OutElement<T>::type* dst, std::size_t y_begin,
                        std::size_t y_end) noexcept {
    using Out = typename OutElement<T>::type;
    const std::size_t ow = spec.out_w;
    const std::size_t plane = spec.out_h * ow;
    float a[C];
    float b[C];
    for (std::size_t c = 0; c < C; ++c) {
        a[c] = spec.a[c];
        b[c] = spec.b[c];
    }
    for (std::size_t y = y_begin; y < y_end; ++y) {
        const std::uint8_t* row = src + ((g.top + y) * g.in_w + g.left) * C;
        if (spec.layout == Layout::kNCHW) {
            // Pixel-major with one output row per channel: the C interleaved loads form one
            // group the vectoriser de-interleaves, and every store stream is sequential.
            Out* out[C];
            for (std::size_t c = 0; c < C; ++c) {
                out[c] = dst + c * plane + y * ow;
            }
            for (std::size_t x = 0; x < ow; ++x) {
                const std::uint8_t* p = row + x * C;
                for (std::size_t c = 0; c < C; ++c) {
                    out[c][x] = OutElement<T>::convert(static_cast<float>(p[c]) * a[c] + b[c]);
                }
            }
        } else {
            Out* out = dst + y * ow * C;
            for (std::size_t x = 0; x < ow; ++x) {
                for (std::size_t c = 0; c < C; ++c) {
                    out[x * C + c] =
                        OutElement<T>::convert(static_cast<float>(row[x * C + c]) * a[c] + b[c]);
                }
            }
        }
    }
}

// Output rows [y_begin, y_end) of one image with bilinear resampling. `xt` holds the
// out_w column taps and `yt` the out_h row taps, in source pixel units.
template <OutType T, std::size_t C>
inline void rows_bilinear(const ImageSpec& spec, const ImageGeometry& g,
                          const std::uint8_t* src, const AxisTap* xt, const AxisTap* yt,
                          typename OutElement<T>::type* dst, std::size_t y_begin,
                          std::size_t y_end) noexcept {
    using Out = typename OutElement<T>::type;
    const std::size_t ow = spec.out_w;
    const std::size_t plane = spec.out_h * ow;
    const std::size_t stride = g.in_w * C;
    for (std::size_t y = y_begin; y < y_end; ++y) {
        const AxisTap& ty = yt[y];
        const std::uint8_t* r0 = src + ty.i0 * stride;
        const std::uint8_t* r1 = src + ty.i1 * stride;
        const float fy = ty.f;
        for (std::size_t x = 0; x < ow; ++x) {
            const AxisTap& tx = xt[x];
            const std::size_t x0 = tx.i0 * C;
            const std::size_t x1 = tx.i1 * C;
            const float fx = tx.f;
            for (std::size_t c = 0; c < C; ++c) {
                const float p00 = static_cast<float>(r0[x0 + c]);
                const float p01 = static_cast<float>(r0[x1 + c]);
                const float p10 = static_cast<float>(r1[x0 + c]);
                const float p11 = static_cast<float>(r1[x1 + c]);
                const float top = p00 + fx * (p01 - p00);
                const float bot = p10 + fx * (p11 - p10);
                const float v = top + fy * (bot - top);
                const Out o = OutElement<T>::convert(v * spec.a[c] + spec.b[c]);
                if (spec.layout == Layout::kNCHW) {
                    dst[c * plane + y * ow + x] = o;
                } else {
                    dst[(y * ow + x) * C + c] = o;
                }
            }
        }
    }
}

// The geometry of one source size and, when resampled, its tap tables: shared by every
// image of that size (all images of one request).
struct ImagePlan {
    ImageGeometry geometry;
    std::vector<AxisTap> x_taps;
    std::vector<AxisTap> y_taps;
};

inline void prepare_taps(const ImageSpec& spec, ImagePlan& plan) {
    const ImageGeometry& g = plan.geometry;
    if (!g.resampled) {
        return;
    }
    plan.x_taps.resize(spec.out_w);
    plan.y_taps.resize(spec.out_h);
    axis_taps(g.in_w, g.resized_w, g.left, spec.out_w, plan.x_taps.data());
    axis_taps(g.in_h, g.resized_h, g.top, spec.out_h, plan.y_taps.data());
}

template <OutType T, std::size_t C>
inline void run_rows_typed(const ImageSpec& spec, const ImagePlan& plan, const std::uint8_t* src,
                           std::uint8_t* dst, std::size_t y_begin, std::size_t y_end) noexcept {
    using Out = typename OutElement<T>::type;
    // dst is the start of this image's slot in the batch buffer, which is aligned for Out
    // (the caller checks the buffer's alignment; every slot is a whole number of elements).
    Out* out = reinterpret_cast<Out*>(dst);
    if (plan.geometry.resampled) {
        rows_bilinear<T, C>(spec, plan.geometry, src, plan.x_taps.data(), plan.y_taps.data(),
                            out, y_begin, y_end);
    } else {
        rows_direct<T, C>(spec, plan.geometry, src, out, y_begin, y_end);
    }
}

template <OutType T>
inline void run_rows_channels(const ImageSpec& spec, const ImagePlan& plan,
                              const std::uint8_t* src, std::uint8_t* dst, std::size_t y_begin,
                              std::size_t y_end) noexcept {
    switch (spec.channels) {
        case 1:
            run_rows_typed<T, 1>(spec, plan, src, dst, y_begin, y_end);
            break;
        case 2:
            run_rows_typed<T, 2>(spec, plan, src, dst, y_begin, y_end);
            break;
        case 3:
            run_rows_typed<T, 3>(spec, plan, src, dst, y_begin, y_end);
            break;
        default:
            run_rows_typed<T, 4>(spec, plan, src, dst, y_begin, y_end);
            break;
    }
}

inline void run_rows_generic(const ImageSpec& spec, const ImagePlan& plan,
                             const std::uint8_t* src, std::uint8_t* dst, std::size_t y_begin,
                             std::size_t y_end) noexcept {
    switch (spec.out) {
        case OutType::kFloat32:
            run_rows_channels<OutType::kFloat32>(spec, plan, src, dst, y_begin, y_end);
            break;
        case OutType::kFloat16:
            run_rows_channels<OutType::kFloat16>(spec, plan, src, dst, y_begin, y_end);
            break;
        case OutType::kBFloat16:
            run_rows_channels<OutType::kBFloat16>(spec, plan, src, dst, y_begin, y_end);
            break;
        case OutType::kFloat64:
            run_rows_channels<OutType::kFloat64>(spec, plan, src, dst, y_begin, y_end);
            break;
    }
}

// x86-64: the same kernels compiled again for AVX2 (flatten inlines the whole call tree into
// this clone), picked at run time when the CPU has it. Only the vector width changes: AVX2
// without FMA performs the same IEEE operations in the same order, so results stay identical
// bit for bit to the baseline build and to the numpy oracle. Measured on an AMD EPYC (Zen 4)
// for the normalise + HWC->NCHW path: about 4x faster than the SSE2 baseline.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(PEREGRINE_NO_DISPATCH)
#define PEREGRINE_AVX2_DISPATCH 1
__attribute__((target("avx2"), flatten)) inline void run_rows_avx2(
    const ImageSpec& spec, const ImagePlan& plan, const std::uint8_t* src, std::uint8_t* dst,
    std::size_t y_begin, std::size_t y_end) noexcept {
    run_rows_generic(spec, plan, src, dst, y_begin, y_end);
}

inline bool cpu_has_avx2() noexcept {
    static const bool has = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") != 0;
    }();
    return has;
}
#endif

// Computes output rows [y_begin, y_end) (all channels) of the image at `src`, whose size
// `plan` was made for, into its slot `dst` of the batch buffer.
inline void run_rows(const ImageSpec& spec, const ImagePlan& plan, const std::uint8_t* src,
                     std::uint8_t* dst, std::size_t y_begin, std::size_t y_end) noexcept {
#ifdef PEREGRINE_AVX2_DISPATCH
    if (cpu_has_avx2()) {
        run_rows_avx2(spec, plan, src, dst, y_begin, y_end);
        return;
    }
#endif
    run_rows_generic(spec, plan, src, dst, y_begin, y_end);
}

// Bytes one preprocessed image occupies in the batch buffer (spec validated at load).
inline std::size_t image_out_bytes(const ImageSpec& spec) noexcept {
    return spec.channels * spec.out_h * spec.out_w * out_itemsize(spec.out);
}

}  // namespace peregrine
