// pybind11 module `server._native`: Python bindings for the native codecs, batch packing,
// image preprocessing and the frontends' request arena. Kernels live in the headers (no Python there); this file only
// converts arguments, holds references while the GIL is released, and raises.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pthread.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "arena.hpp"
#include "bytes_codec.hpp"
#include "packing.hpp"
#include "preprocess.hpp"
#include "task_pool.hpp"
#include "wire_codec.hpp"

namespace py = pybind11;

namespace {

// Buffers at least this large are scanned / filled with the GIL released. Below it
// the release/re-acquire round trip costs more than the work it would let overlap.
constexpr std::size_t kReleaseGilBytes = 64 * 1024;

// Owns a Py_buffer export for the lifetime of the object.
class BufferExport {
public:
    explicit BufferExport(PyObject* obj) {
        if (PyObject_GetBuffer(obj, &view_, PyBUF_FULL_RO) != 0) {
            throw py::error_already_set();
        }
    }
    ~BufferExport() { PyBuffer_Release(&view_); }
    BufferExport(const BufferExport&) = delete;
    BufferExport& operator=(const BufferExport&) = delete;

    const Py_buffer& view() const noexcept { return view_; }

private:
    Py_buffer view_{};
};

// Bytes exported by bytearray elements; kept exported (so they cannot be resized or
// freed) while the GIL is released. A deque never moves its elements.
struct HeldExports {
    std::deque<Py_buffer> views;
    HeldExports() = default;
    HeldExports(const HeldExports&) = delete;
    HeldExports& operator=(const HeldExports&) = delete;
    ~HeldExports() {
        for (Py_buffer& v : views) {
            PyBuffer_Release(&v);
        }
    }
};

std::string type_name(PyObject* obj) {
    return py::str(py::handle(reinterpret_cast<PyObject*>(Py_TYPE(obj))).attr("__name__"));
}

Py_ssize_t parse_count(PyObject* obj) {
    py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj));
    if (!index) {
        throw py::error_already_set();
    }
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (value == -1 && PyErr_Occurred() != nullptr) {
        throw py::error_already_set();
    }
    if (overflow < 0 || (overflow == 0 && value < 0)) {
        throw py::value_error("count must be non-negative, got " +
                              std::string(py::str(index)));
    }
    if (overflow > 0 || value > static_cast<long long>(PY_SSIZE_T_MAX)) {
        throw py::value_error("count " + std::string(py::str(index)) + " is too large");
    }
    return static_cast<Py_ssize_t>(value);
}

py::list decode_bytes(const py::object& buffer, const py::object& count_obj) {
    const Py_ssize_t count = parse_count(count_obj.ptr());
    BufferExport exported(buffer.ptr());
    const Py_buffer& view = exported.view();

    if (view.format != nullptr && std::strcmp(view.format, "O") == 0) {
        // e.g. a numpy object array: its "bytes" are PyObject pointers.
        throw py::type_error("buffer holds Python objects (format 'O'), not raw bytes");
    }

    const std::uint8_t* data = static_cast<const std::uint8_t*>(view.buf);
    const auto size = static_cast<std::size_t>(view.len);
    std::string contiguous;  // copy of a strided / indirect buffer
    if (PyBuffer_IsContiguous(&view, 'C') == 0) {
        contiguous.resize(size);
        if (PyBuffer_ToContiguous(contiguous.data(), &view, view.len, 'C') != 0) {
            throw py::error_already_set();
        }
        data = reinterpret_cast<const std::uint8_t*>(contiguous.data());
    }

    std::vector<peregrine::ElementSpan> spans;
    peregrine::ScanResult scan;
    if (size >= kReleaseGilBytes) {
        // The export pins the memory (a bytearray cannot be resized while exported);
        // a concurrent writer could change the bytes, but the spans recorded here are
        // bounds-checked against `size`, so building the result stays in bounds.
        py::gil_scoped_release release;
        scan = peregrine::scan_bytes(data, size, static_cast<std::size_t>(count), spans);
    } else {
        scan = peregrine::scan_bytes(data, size, static_cast<std::size_t>(count), spans);
    }
    if (!scan.ok()) {
        throw py::value_error(scan.message());
    }

    PyObject* raw_list = PyList_New(count);
    if (raw_list == nullptr) {
        throw py::error_already_set();
    }
    py::list result = py::reinterpret_steal<py::list>(raw_list);
    for (Py_ssize_t i = 0; i < count; ++i) {
        const peregrine::ElementSpan& span = spans[static_cast<std::size_t>(i)];
        PyObject* item = PyBytes_FromStringAndSize(
            reinterpret_cast<const char*>(data + span.offset),
            static_cast<Py_ssize_t>(span.length));
        if (item == nullptr) {
            throw py::error_already_set();
        }
        PyList_SET_ITEM(raw_list, i, item);  // steals the reference
    }
    return result;
}

py::bytes encode_bytes(const py::object& items) {
    PyObject* obj = items.ptr();
    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj) ||
        PyMemoryView_Check(obj)) {
        throw py::type_error("items must be a sequence of bytes, bytearray or str elements, not " +
                             type_name(obj));
    }
    py::object seq = py::reinterpret_steal<py::object>(
        PySequence_Fast(obj, "items must be a sequence of bytes, bytearray or str elements"));
    if (!seq) {
        throw py::error_already_set();
    }
    if (seq.ptr() == obj && PyList_Check(obj)) {
        // Snapshot the caller's list: while the GIL is released another thread could
        // replace an element and free the bytes we are copying from.
        seq = py::reinterpret_steal<py::object>(PyList_AsTuple(obj));
        if (!seq) {
            throw py::error_already_set();
        }
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** elems = PySequence_Fast_ITEMS(seq.ptr());

    std::vector<peregrine::ByteView> views(static_cast<std::size_t>(n));
    std::vector<py::object> encoded;  // UTF-8 encodings of non-ASCII str elements
    HeldExports exports;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* e = elems[i];
        peregrine::ByteView& v = views[static_cast<std::size_t>(i)];
        if (PyBytes_Check(e)) {
            v.data = reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(e));
            v.size = static_cast<std::size_t>(PyBytes_GET_SIZE(e));
        } else if (PyUnicode_Check(e)) {
            if (PyUnicode_IS_ASCII(e)) {
                // The UTF-8 form of an ASCII str is its own storage: no copy, no cache.
                Py_ssize_t len = 0;
                const char* utf8 = PyUnicode_AsUTF8AndSize(e, &len);
                if (utf8 == nullptr) {
                    throw py::error_already_set();
                }
                v.data = reinterpret_cast<const std::uint8_t*>(utf8);
                v.size = static_cast<std::size_t>(len);
            } else {
                py::object b = py::reinterpret_steal<py::object>(PyUnicode_AsUTF8String(e));
                if (!b) {
                    throw py::error_already_set();
                }
                v.data = reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(b.ptr()));
                v.size = static_cast<std::size_t>(PyBytes_GET_SIZE(b.ptr()));
                encoded.push_back(std::move(b));
            }
        } else if (PyByteArray_Check(e)) {
            Py_buffer& held = exports.views.emplace_back();
            if (PyObject_GetBuffer(e, &held, PyBUF_SIMPLE) != 0) {
                exports.views.pop_back();
                throw py::error_already_set();
            }
            v.data = static_cast<const std::uint8_t*>(held.buf);
            v.size = static_cast<std::size_t>(held.len);
        } else {
            throw py::type_error("element " + std::to_string(i) + " has type " + type_name(e) +
                                 "; expected bytes, bytearray or str");
        }
    }

    const peregrine::EncodeResult sized = peregrine::encoded_size(views.data(), views.size());
    if (!sized.ok()) {
        throw py::value_error(sized.message());
    }
    if (sized.total > static_cast<std::size_t>(PY_SSIZE_T_MAX)) {
        throw py::value_error("encoded size " + std::to_string(sized.total) + " is too large");
    }
    PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(sized.total));
    if (raw == nullptr) {
        throw py::error_already_set();
    }
    py::bytes out = py::reinterpret_steal<py::bytes>(raw);
    auto* dst = reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(raw));

    peregrine::EncodeResult written;
    if (sized.total >= kReleaseGilBytes) {
        // Safe without the GIL: every source is a bytes/str kept alive by `seq` or
        // `encoded` (both immutable) or a bytearray pinned by an export, and `out`
        // is not yet visible to any other thread.
        py::gil_scoped_release release;
        written = peregrine::encode_into(views.data(), views.size(), dst, sized.total);
    } else {
        written = peregrine::encode_into(views.data(), views.size(), dst, sized.total);
    }
    if (!written.ok() || written.total != sized.total) {
        throw std::runtime_error("internal error in encode_bytes: " + written.message());
    }
    return out;
}

// ---------------------------------------------------------------------------
// numpy helpers (through pybind11's runtime-loaded numpy API: no numpy headers needed)
// ---------------------------------------------------------------------------

using py::detail::npy_api;

bool is_ndarray(PyObject* obj) { return npy_api::get().PyArray_Check_(obj); }

py::detail::PyArray_Proxy* proxy(PyObject* obj) { return py::detail::array_proxy(obj); }

bool same_dtype(PyObject* a_descr, PyObject* b_descr) {
    return a_descr == b_descr || npy_api::get().PyArray_EquivTypes_(a_descr, b_descr);
}

bool is_c_contiguous(PyObject* arr) {
    return (proxy(arr)->flags & npy_api::NPY_ARRAY_C_CONTIGUOUS_) != 0;
}

std::size_t dtype_itemsize(PyObject* descr) {
    return static_cast<std::size_t>(py::reinterpret_borrow<py::dtype>(descr).itemsize());
}

std::string shape_text(PyObject* arr) {
    const auto* p = proxy(arr);
    std::string text = "[";
    for (int k = 0; k < p->nd; ++k) {
        text += (k ? ", " : "") + std::to_string(p->dimensions[k]);
    }
    return text + "]";
}

// `obj` as a C-contiguous, aligned array of dtype `descr`: the object itself when it already
// is one, else a converted copy (numpy's safe casting: TypeError for a lossy conversion).
py::object as_c_array(PyObject* obj, PyObject* descr) {
    if (is_ndarray(obj) && same_dtype(proxy(obj)->descr, descr) && is_c_contiguous(obj) &&
        (proxy(obj)->flags & npy_api::NPY_ARRAY_ALIGNED_) != 0) {
        return py::reinterpret_borrow<py::object>(obj);
    }
    Py_INCREF(descr);  // PyArray_FromAny steals the descriptor reference
    PyObject* converted = npy_api::get().PyArray_FromAny_(
        obj, descr, 0, 0,
        npy_api::NPY_ARRAY_C_CONTIGUOUS_ | npy_api::NPY_ARRAY_ALIGNED_ |
            npy_api::NPY_ARRAY_ENSUREARRAY_,
        nullptr);
    if (converted == nullptr) {
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(converted);
}

// The destination of a packing call: a writeable, aligned, C-contiguous numpy array.
struct OutArray {
    PyObject* obj = nullptr;
    std::uint8_t* data = nullptr;
    std::size_t nbytes = 0;
    std::size_t itemsize = 0;
    int ndim = 0;
    const Py_ssize_t* shape = nullptr;
};

OutArray check_out(const py::object& out, const char* what) {
    PyObject* obj = out.ptr();
    if (!is_ndarray(obj)) {
        throw py::type_error(std::string(what) + " must be a numpy array, not " + type_name(obj));
    }
    const auto* p = proxy(obj);
    const int need = npy_api::NPY_ARRAY_C_CONTIGUOUS_ | npy_api::NPY_ARRAY_ALIGNED_ |
                     npy_api::NPY_ARRAY_WRITEABLE_;
    if ((p->flags & need) != need) {
        throw py::value_error(std::string(what) +
                              " must be a writeable, aligned, C-contiguous array");
    }
    if (py::reinterpret_borrow<py::dtype>(p->descr).kind() == 'O') {
        throw py::type_error(std::string(what) + " holds Python objects; pack BYTES in Python");
    }
    OutArray o;
    o.obj = obj;
    o.data = reinterpret_cast<std::uint8_t*>(p->data);
    o.itemsize = dtype_itemsize(p->descr);
    o.ndim = p->nd;
    o.shape = p->dimensions;
    std::size_t n = o.itemsize;
    for (int k = 0; k < p->nd; ++k) {
        n *= static_cast<std::size_t>(p->dimensions[k]);  // numpy guarantees it fits
    }
    o.nbytes = n;
    return o;
}

// A sequence argument snapshotted into a tuple (or the caller's tuple): while the GIL is
// released no other thread can drop an element we copy from.
py::object snapshot(const py::object& seq, const char* what) {
    PyObject* obj = seq.ptr();
    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj) || is_ndarray(obj)) {
        throw py::type_error(std::string(what) + " must be a list or tuple, not " +
                             type_name(obj));
    }
    py::object fast = py::reinterpret_steal<py::object>(
        PySequence_Fast(obj, (std::string(what) + " must be a sequence").c_str()));
    if (!fast) {
        throw py::error_already_set();
    }
    if (PyList_Check(fast.ptr())) {
        fast = py::reinterpret_steal<py::object>(PyList_AsTuple(fast.ptr()));
        if (!fast) {
            throw py::error_already_set();
        }
    }
    return fast;
}

// ---------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------

void gather(const py::object& sources, const py::object& out) {
    const OutArray dst = check_out(out, "out");
    if (dst.ndim < 1) {
        throw py::value_error("out must have a batch dimension (ndim >= 1)");
    }
    std::size_t row_bytes = dst.itemsize;
    for (int k = 1; k < dst.ndim; ++k) {
        row_bytes *= static_cast<std::size_t>(dst.shape[k]);
    }
    PyObject* descr = proxy(dst.obj)->descr;

    py::object seq = snapshot(sources, "sources");
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    std::vector<peregrine::ConstSpan> spans(static_cast<std::size_t>(n));
    std::vector<py::object> converted;  // copies of sources that were not usable as they are
    HeldExports exports;
    std::size_t total = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* src = items[i];
        peregrine::ConstSpan& span = spans[static_cast<std::size_t>(i)];
        if (is_ndarray(src)) {
            PyObject* arr = src;
            const auto* p = proxy(src);
            if (!(p->descr == descr && (p->flags & npy_api::NPY_ARRAY_C_CONTIGUOUS_) != 0)) {
                converted.push_back(as_c_array(src, descr));
                arr = converted.back().ptr();
                p = proxy(arr);
            }
            bool rows_match = p->nd == dst.ndim;
            for (int k = 1; rows_match && k < dst.ndim; ++k) {
                rows_match = p->dimensions[k] == dst.shape[k];
            }
            if (!rows_match) {
                throw py::value_error("source " + std::to_string(i) + " has shape " +
                                      shape_text(arr) + "; out rows are " +
                                      shape_text(dst.obj) + " without the first dimension");
            }
            span.data = reinterpret_cast<const std::uint8_t*>(p->data);
            span.size = static_cast<std::size_t>(p->dimensions[0]) * row_bytes;
        } else {
            // Raw bytes (the protobuf's raw_input_contents), read as whole rows of out's dtype.
            Py_buffer& held = exports.views.emplace_back();
            if (PyObject_GetBuffer(src, &held, PyBUF_SIMPLE) != 0) {
                exports.views.pop_back();
                throw py::error_already_set();
            }
            span.data = static_cast<const std::uint8_t*>(held.buf);
            span.size = static_cast<std::size_t>(held.len);
            if (row_bytes == 0 ? span.size != 0 : span.size % row_bytes != 0) {
                throw py::value_error("source " + std::to_string(i) + " holds " +
                                      std::to_string(span.size) +
                                      " bytes, not a whole number of " +
                                      std::to_string(row_bytes) + "-byte rows");
            }
        }
        if (!peregrine::checked_add(total, span.size, total)) {
            throw py::value_error("sources are too large");
        }
    }
    if (total != dst.nbytes) {
        throw py::value_error("sources hold " + std::to_string(total) + " bytes; out has " +
                              std::to_string(dst.nbytes) + " (" + shape_text(dst.obj) + ")");
    }
    std::size_t written = 0;
    if (total >= kReleaseGilBytes) {
        // Safe without the GIL: every source is kept alive by `seq` (a tuple nobody else
        // holds), `converted` or an export, and nothing else writes into `out` (the packer
        // owns the buffer until the batch is released).
        py::gil_scoped_release release;
        written = peregrine::gather(spans.data(), spans.size(), dst.data, dst.nbytes);
    } else {
        written = peregrine::gather(spans.data(), spans.size(), dst.data, dst.nbytes);
    }
    if (written != total) {
        throw std::runtime_error("internal error in gather: wrote " + std::to_string(written) +
                                 " of " + std::to_string(total) + " bytes");
    }
}

void gather_padded(const py::object& sources, const py::object& out, const py::bytes& pad) {
    const OutArray dst = check_out(out, "out");
    if (dst.ndim < 1) {
        throw py::value_error("out must have a batch dimension (ndim >= 1)");
    }
    const std::string pad_bytes = pad;
    if (pad_bytes.size() != dst.itemsize) {
        throw py::value_error("pad must be one element: " + std::to_string(dst.itemsize) +
                              " bytes, got " + std::to_string(pad_bytes.size()));
    }
    PyObject* descr = proxy(dst.obj)->descr;
    const auto ndim = static_cast<std::size_t>(dst.ndim);

    py::object seq = snapshot(sources, "sources");
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    std::vector<py::object> arrays;
    arrays.reserve(static_cast<std::size_t>(n));
    std::vector<std::size_t> shapes(static_cast<std::size_t>(n) * ndim);
    std::vector<peregrine::RaggedSource> src(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        arrays.push_back(as_c_array(items[i], descr));
        const auto* p = proxy(arrays.back().ptr());
        if (p->nd != dst.ndim) {
            peregrine::PadResult r;
            r.error = peregrine::PadError::kRankMismatch;
            r.request = static_cast<std::size_t>(i);
            r.got = static_cast<std::size_t>(p->nd);
            r.limit = ndim;
            throw py::value_error(r.message());
        }
        std::size_t* shape = shapes.data() + static_cast<std::size_t>(i) * ndim;
        for (std::size_t k = 0; k < ndim; ++k) {
            shape[k] = static_cast<std::size_t>(p->dimensions[k]);
        }
        src[static_cast<std::size_t>(i)] = {reinterpret_cast<const std::uint8_t*>(p->data), shape};
    }
    std::vector<std::size_t> batch_shape(ndim);
    for (std::size_t k = 0; k < ndim; ++k) {
        batch_shape[k] = static_cast<std::size_t>(dst.shape[k]);
    }
    std::size_t batch_bytes = 0;
    const peregrine::PadResult plan = peregrine::plan_padded(
        src.data(), src.size(), batch_shape.data(), ndim, dst.itemsize, batch_bytes);
    if (!plan.ok()) {
        throw py::value_error(plan.message());
    }
    if (batch_bytes != dst.nbytes) {
        throw std::runtime_error("internal error in gather_padded: size mismatch");
    }
    const auto* pad_data = reinterpret_cast<const std::uint8_t*>(pad_bytes.data());
    if (batch_bytes >= kReleaseGilBytes) {
        py::gil_scoped_release release;  // sources held by `arrays`, pad by `pad_bytes`
        peregrine::gather_padded(src.data(), src.size(), batch_shape.data(), ndim, dst.itemsize,
                                 pad_data, dst.data);
    } else {
        peregrine::gather_padded(src.data(), src.size(), batch_shape.data(), ndim, dst.itemsize,
                                 pad_data, dst.data);
    }
}

py::list scatter(const py::object& array, const py::object& rows) {
    PyObject* obj = array.ptr();
    if (!is_ndarray(obj)) {
        throw py::type_error("array must be a numpy array, not " + type_name(obj));
    }
    PyObject* descr = proxy(obj)->descr;
    if (py::reinterpret_borrow<py::dtype>(descr).kind() == 'O') {
        throw py::type_error("array holds Python objects; encode BYTES outputs in Python");
    }
    py::object arr = as_c_array(obj, descr);
    const auto* p = proxy(arr.ptr());
    if (p->nd < 1) {
        throw py::value_error("array must have a batch dimension (ndim >= 1)");
    }
    std::size_t row_bytes = dtype_itemsize(descr);
    for (int k = 1; k < p->nd; ++k) {
        row_bytes *= static_cast<std::size_t>(p->dimensions[k]);
    }
    const auto batch_rows = static_cast<std::size_t>(p->dimensions[0]);

    py::object seq = snapshot(rows, "rows");
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    std::vector<std::size_t> counts(static_cast<std::size_t>(n));
    std::size_t total = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        const auto r = static_cast<std::size_t>(parse_count(items[i]));
        if (!peregrine::checked_add(total, r, total) || total > batch_rows) {
            throw py::value_error("rows add up to more than the array's " +
                                  std::to_string(batch_rows));
        }
        counts[static_cast<std::size_t>(i)] = r;
    }
    if (total != batch_rows) {
        throw py::value_error("rows add up to " + std::to_string(total) + "; the array has " +
                              std::to_string(batch_rows));
    }

    PyObject* raw_list = PyList_New(n);
    if (raw_list == nullptr) {
        throw py::error_already_set();
    }
    py::list result = py::reinterpret_steal<py::list>(raw_list);
    std::vector<peregrine::MutSpan> spans(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        const std::size_t len = counts[static_cast<std::size_t>(i)] * row_bytes;  // <= nbytes
        PyObject* item = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(len));
        if (item == nullptr) {
            throw py::error_already_set();
        }
        PyList_SET_ITEM(raw_list, i, item);  // steals the reference
        spans[static_cast<std::size_t>(i)] = {
            reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(item)), len};
    }
    const auto* src = reinterpret_cast<const std::uint8_t*>(p->data);
    const std::size_t nbytes = batch_rows * row_bytes;
    bool ok = false;
    if (nbytes >= kReleaseGilBytes) {
        // The new bytes objects are not visible to any other thread yet; `arr` pins the source.
        py::gil_scoped_release release;
        ok = peregrine::scatter(src, nbytes, spans.data(), spans.size());
    } else {
        ok = peregrine::scatter(src, nbytes, spans.data(), spans.size());
    }
    if (!ok) {
        throw std::runtime_error("internal error in scatter: spans exceed the array");
    }
    return result;
}

// ---------------------------------------------------------------------------
// Preprocessing
// ---------------------------------------------------------------------------

// The process-wide worker pool, created on first use. After fork() the child has none of
// the parent's threads: the atfork handler drops (and deliberately leaks) the old pool so
// the child builds its own.
peregrine::TaskPool* g_pool = nullptr;
std::mutex g_pool_mutex;

void forget_pool_in_child() { g_pool = nullptr; }

std::size_t hardware_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<std::size_t>(n);
}

peregrine::TaskPool& task_pool() {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (g_pool == nullptr) {
        static const bool registered = [] {
            pthread_atfork(nullptr, nullptr, forget_pool_in_child);
            return true;
        }();
        (void)registered;
        // Never destroyed: worker threads must not be joined during interpreter shutdown.
        g_pool = new peregrine::TaskPool(std::min<std::size_t>(hardware_threads(), 64) - 1);
    }
    return *g_pool;
}

// Output rows per task: small enough to balance a few large images over the workers,
// large enough that claiming a task costs nothing next to computing it.
constexpr std::size_t kRowsPerTask = 16;

class ImagePreprocessor {
public:
    ImagePreprocessor(std::size_t channels, std::size_t out_h, std::size_t out_w,
                      const std::string& resize, std::size_t resize_h, std::size_t resize_w,
                      std::size_t shorter, bool crop, const std::string& layout,
                      const std::string& output, const std::vector<float>& a,
                      const std::vector<float>& b, std::size_t threads)
        : threads_(threads == 0 ? 1 : threads) {
        if (channels == 0 || channels > peregrine::kMaxChannels) {
            throw py::value_error("channels must be 1.." + std::to_string(peregrine::kMaxChannels));
        }
        if (out_h == 0 || out_w == 0) {
            throw py::value_error("the output size must be positive");
        }
        if (a.size() != channels || b.size() != channels) {
            throw py::value_error("a and b need one coefficient per channel");
        }
        spec_.channels = channels;
        spec_.out_h = out_h;
        spec_.out_w = out_w;
        if (resize == "none") {
            spec_.resize = peregrine::ResizeMode::kNone;
        } else if (resize == "exact") {
            if (resize_h == 0 || resize_w == 0) {
                throw py::value_error("an exact resize needs a positive size");
            }
            spec_.resize = peregrine::ResizeMode::kExact;
            spec_.resize_h = resize_h;
            spec_.resize_w = resize_w;
        } else if (resize == "shorter") {
            if (shorter == 0) {
                throw py::value_error("a shorter-side resize needs a positive size");
            }
            spec_.resize = peregrine::ResizeMode::kShorterSide;
            spec_.shorter = shorter;
        } else {
            throw py::value_error("resize must be 'none', 'exact' or 'shorter', got '" + resize +
                                  "'");
        }
        spec_.crop = crop;
        if (layout == "NCHW") {
            spec_.layout = peregrine::Layout::kNCHW;
        } else if (layout == "NHWC") {
            spec_.layout = peregrine::Layout::kNHWC;
        } else {
            throw py::value_error("layout must be 'NCHW' or 'NHWC', got '" + layout + "'");
        }
        if (output == "FP32") {
            spec_.out = peregrine::OutType::kFloat32;
        } else if (output == "FP16") {
            spec_.out = peregrine::OutType::kFloat16;
        } else if (output == "BF16") {
            spec_.out = peregrine::OutType::kBFloat16;
        } else if (output == "FP64") {
            spec_.out = peregrine::OutType::kFloat64;
        } else {
            throw py::value_error("output must be FP32, FP16, BF16 or FP64, got '" + output + "'");
        }
        for (std::size_t c = 0; c < channels; ++c) {
            spec_.a[c] = a[c];
            spec_.b[c] = b[c];
        }
    }

    // Preprocesses every image of `images` into consecutive slots of `out`. With `batched`
    // each element is [n, H, W, C] (n images of one size) and out is [N, ...]; without, each
    // is one [H, W, C] image and out is the single image's [C, OH, OW] (or [OH, OW, C]).
    void run(const py::object& images, const py::object& out, bool batched) const {
        const OutArray dst = check_out(out, "out");
        const std::size_t item = peregrine::out_itemsize(spec_.out);
        if (dst.itemsize != item) {
            throw py::type_error("out has " + std::to_string(dst.itemsize) +
                                 "-byte elements; this preprocessor writes " +
                                 std::to_string(item) + "-byte ones");
        }
        const int lead = batched ? 1 : 0;
        const std::size_t c = spec_.channels;
        const bool nchw = spec_.layout == peregrine::Layout::kNCHW;
        const std::size_t want[3] = {nchw ? c : spec_.out_h, nchw ? spec_.out_h : spec_.out_w,
                                     nchw ? spec_.out_w : c};
        bool shape_ok = dst.ndim == lead + 3;
        for (int k = 0; shape_ok && k < 3; ++k) {
            shape_ok = static_cast<std::size_t>(dst.shape[lead + k]) == want[k];
        }
        if (!shape_ok) {
            throw py::value_error("out has shape " + shape_text(dst.obj) + "; expected " +
                                  std::string(batched ? "[N, " : "[") + std::to_string(want[0]) +
                                  ", " + std::to_string(want[1]) + ", " +
                                  std::to_string(want[2]) + "]");
        }
        const std::size_t slot = peregrine::image_out_bytes(spec_);

        py::object seq = snapshot(images, "images");
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
        PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
        if (!batched && n != 1) {
            throw py::value_error("an unbatched run takes exactly one image");
        }
        py::dtype uint8 = py::dtype::of<std::uint8_t>();
        std::vector<py::object> arrays;
        arrays.reserve(static_cast<std::size_t>(n));
        // One plan per request: its images share a size, so the tap tables too.
        std::vector<peregrine::ImagePlan> plans(static_cast<std::size_t>(n));
        struct Slot {
            const peregrine::ImagePlan* plan;
            const std::uint8_t* src;
            std::uint8_t* dst;
        };
        std::vector<Slot> slots;
        const std::size_t capacity = batched ? static_cast<std::size_t>(dst.shape[0]) : 1;
        slots.reserve(capacity);
        for (Py_ssize_t i = 0; i < n; ++i) {
            arrays.push_back(as_c_array(items[i], uint8.ptr()));
            const auto* p = proxy(arrays.back().ptr());
            if (p->nd != lead + 3 || static_cast<std::size_t>(p->dimensions[lead + 2]) != c) {
                throw py::value_error("image " + std::to_string(i) + " has shape " +
                                      shape_text(arrays.back().ptr()) + "; expected " +
                                      (batched ? "[n, H, W, " : "[H, W, ") + std::to_string(c) +
                                      "]");
            }
            const auto h = static_cast<std::size_t>(p->dimensions[lead]);
            const auto w = static_cast<std::size_t>(p->dimensions[lead + 1]);
            const peregrine::ImageCheck check = peregrine::plan_image(spec_, h, w);
            if (!check.ok()) {
                throw py::value_error("image " + std::to_string(i) + ": " + check.message(spec_));
            }
            peregrine::ImagePlan& plan = plans[static_cast<std::size_t>(i)];
            plan.geometry = check.geometry;
            peregrine::prepare_taps(spec_, plan);
            const std::size_t count = batched ? static_cast<std::size_t>(p->dimensions[0]) : 1;
            const std::size_t image_bytes = h * w * c;  // representable: checked by plan_image
            const auto* base = reinterpret_cast<const std::uint8_t*>(p->data);
            for (std::size_t k = 0; k < count; ++k) {
                if (slots.size() == capacity) {
                    throw py::value_error("images hold more than out's " +
                                          std::to_string(capacity) + " rows");
                }
                slots.push_back({&plan, base + k * image_bytes, dst.data + slots.size() * slot});
            }
        }
        if (slots.size() != capacity) {
            throw py::value_error("images hold " + std::to_string(slots.size()) +
                                  " rows; out has " + std::to_string(capacity));
        }
        const std::size_t bands = (spec_.out_h + kRowsPerTask - 1) / kRowsPerTask;
        const std::size_t tasks = slots.size() * bands;
        const peregrine::ImageSpec& spec = spec_;
        auto task = [&spec, &slots, bands](std::size_t t) {
            const Slot& s = slots[t / bands];
            const std::size_t y0 = (t % bands) * kRowsPerTask;
            const std::size_t y1 = std::min(spec.out_h, y0 + kRowsPerTask);
            peregrine::run_rows(spec, *s.plan, s.src, s.dst, y0, y1);
        };
        if (slots.size() * slot >= kReleaseGilBytes) {
            // Safe without the GIL: the images are held by `arrays`, and `out` belongs to the
            // packer until the batch is released.
            py::gil_scoped_release release;
            if (threads_ > 1) {
                task_pool().run(tasks, threads_, task);
            } else {
                for (std::size_t t = 0; t < tasks; ++t) {
                    task(t);
                }
            }
        } else {
            for (std::size_t t = 0; t < tasks; ++t) {
                task(t);
            }
        }
    }

    std::size_t threads() const noexcept { return threads_; }

private:
    peregrine::ImageSpec spec_;
    std::size_t threads_;
};


// ---------------------------------------------------------------------------
// Protobuf wire codec (csrc/wire_codec.hpp)
// ---------------------------------------------------------------------------

namespace wire = peregrine::wire;

py::object steal(PyObject* obj) {
    if (obj == nullptr) {
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(obj);
}

// The input as a read-only, one-dimensional byte memoryview: the object every
// zero-copy slice of the result refers to (and so keeps alive).
py::object byte_view(const py::object& data) {
    py::object view = steal(PyMemoryView_FromObject(data.ptr()));
    const Py_buffer* buffer = PyMemoryView_GET_BUFFER(view.ptr());
    if (PyBuffer_IsContiguous(buffer, 'C') == 0) {
        throw py::type_error("data must be a C-contiguous buffer");
    }
    if (buffer->ndim != 1 || buffer->itemsize != 1) {
        view = view.attr("cast")("B");
    }
    if (PyMemoryView_GET_BUFFER(view.ptr())->readonly == 0) {
        view = view.attr("toreadonly")();
    }
    return view;
}

// Copies ``data`` (a C-contiguous buffer) into a new block of ``writer``: the message's
// offset, or -1 when the arena has no room for it.
std::int64_t place_in_arena(arena::Writer& writer, const py::object& data) {
    const py::object view = byte_view(data);
    const Py_buffer* buffer = PyMemoryView_GET_BUFFER(view.ptr());
    const auto length = static_cast<std::size_t>(buffer->len);
    const std::int64_t offset = writer.reserve(length);
    if (offset < 0) {
        return offset;
    }
    std::uint8_t* target = writer.message_at(static_cast<std::size_t>(offset));
    if (length >= kReleaseGilBytes) {
        py::gil_scoped_release release;
        std::memcpy(target, buffer->buf, length);
    } else {
        std::memcpy(target, buffer->buf, length);
    }
    return offset;
}

class RequestBuilder {
public:
    RequestBuilder(const py::object& view, const std::uint8_t* data)
        : view_(view), data_(data) {}

    py::object text(wire::Span s) const {
        // Validated as UTF-8 by the parser: decoding cannot fail.
        return steal(PyUnicode_DecodeUTF8(reinterpret_cast<const char*>(data_ + s.offset),
                                          static_cast<Py_ssize_t>(s.size), nullptr));
    }

    py::object slice(wire::Span s) const {
        return steal(PySequence_GetSlice(view_.ptr(), static_cast<Py_ssize_t>(s.offset),
                                         static_cast<Py_ssize_t>(s.offset + s.size)));
    }

    // {key: (oneof field number, value)}; (0, None) for an entry with no value.
    py::object params(const std::vector<wire::Param>& entries) const {
        py::object dict = steal(PyDict_New());
        for (const wire::Param& p : entries) {
            py::object value;
            switch (p.kind) {
                case wire::ParamKind::kNone:
                    value = py::none();
                    break;
                case wire::ParamKind::kBool:
                    value = py::bool_(p.bits != 0);
                    break;
                case wire::ParamKind::kInt64:
                    value = steal(PyLong_FromLongLong(static_cast<long long>(p.bits)));
                    break;
                case wire::ParamKind::kUint64:
                    value = steal(PyLong_FromUnsignedLongLong(p.bits));
                    break;
                case wire::ParamKind::kDouble: {
                    double d = 0.0;
                    std::memcpy(&d, &p.bits, sizeof d);
                    value = steal(PyFloat_FromDouble(d));
                    break;
                }
                case wire::ParamKind::kString:
                    value = text(p.text);
                    break;
            }
            py::object entry = steal(PyTuple_New(2));
            PyTuple_SET_ITEM(entry.ptr(), 0, PyLong_FromLong(static_cast<long>(p.kind)));
            PyTuple_SET_ITEM(entry.ptr(), 1, value.release().ptr());
            if (PyTuple_GET_ITEM(entry.ptr(), 0) == nullptr) {
                throw py::error_already_set();
            }
            if (PyDict_SetItem(dict.ptr(), text(p.key).ptr(), entry.ptr()) != 0) {
                throw py::error_already_set();
            }
        }
        return dict;
    }

    py::object shape(const std::vector<std::int64_t>& dims) const {
        py::object tuple = steal(PyTuple_New(static_cast<Py_ssize_t>(dims.size())));
        for (std::size_t k = 0; k < dims.size(); ++k) {
            PyObject* dim = PyLong_FromLongLong(dims[k]);
            if (dim == nullptr) {
                throw py::error_already_set();
            }
            PyTuple_SET_ITEM(tuple.ptr(), static_cast<Py_ssize_t>(k), dim);
        }
        return tuple;
    }

    // None, a view of the one InferTensorContents, or (the field repeated, which
    // protobuf merges) the concatenation of every occurrence.
    py::object contents(const std::vector<wire::Span>& spans) const {
        if (spans.empty()) {
            return py::none();
        }
        if (spans.size() == 1) {
            return slice(spans[0]);
        }
        std::string joined;
        for (const wire::Span& s : spans) {
            joined.append(reinterpret_cast<const char*>(data_ + s.offset), s.size);
        }
        return py::bytes(joined);
    }

private:
    const py::object& view_;
    const std::uint8_t* data_;
};

py::tuple tuple_of(std::initializer_list<py::object> items) {
    py::tuple out(items.size());
    Py_ssize_t k = 0;
    for (const py::object& item : items) {
        PyTuple_SET_ITEM(out.ptr(), k++, item.inc_ref().ptr());
    }
    return out;
}

// A request past wire::kMaxRequestEntries: raised as _native.TooManyEntries (a ValueError).
struct TooManyEntries : std::runtime_error {
    using std::runtime_error::runtime_error;
};

py::tuple parse_infer_request(const py::object& data) {
    const py::object view = byte_view(data);
    const Py_buffer* buffer = PyMemoryView_GET_BUFFER(view.ptr());
    const auto* bytes = static_cast<const std::uint8_t*>(buffer->buf);

    wire::InferRequest request;
    wire::ParseError error;
    if (!wire::parse_infer_request(bytes, static_cast<std::size_t>(buffer->len), request,
                                   error)) {
        if (error.too_many_entries) {
            throw TooManyEntries(error.message);
        }
        throw py::value_error(error.message + " at offset " + std::to_string(error.offset));
    }

    const RequestBuilder b(view, bytes);
    py::list inputs(request.inputs.size());
    for (std::size_t i = 0; i < request.inputs.size(); ++i) {
        const wire::InputTensor& t = request.inputs[i];
        inputs[i] = tuple_of({b.text(t.name), b.text(t.datatype), b.shape(t.shape),
                              b.params(t.params), b.contents(t.contents)});
    }
    py::list outputs(request.outputs.size());
    for (std::size_t i = 0; i < request.outputs.size(); ++i) {
        const wire::RequestedOutput& o = request.outputs[i];
        outputs[i] = tuple_of({b.text(o.name), b.params(o.params)});
    }
    py::list raw(request.raw_input_contents.size());
    for (std::size_t i = 0; i < request.raw_input_contents.size(); ++i) {
        raw[i] = b.slice(request.raw_input_contents[i]);
    }
    return tuple_of({b.text(request.model_name), b.text(request.model_version),
                     b.text(request.id), b.params(request.params), std::move(inputs),
                     std::move(outputs), std::move(raw)});
}

wire::Bytes utf8_of(PyObject* obj, const char* what) {
    if (!PyUnicode_Check(obj)) {
        throw py::type_error(std::string(what) + " must be str, not " + type_name(obj));
    }
    Py_ssize_t size = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(obj, &size);
    if (utf8 == nullptr) {
        throw py::error_already_set();
    }
    return {reinterpret_cast<const std::uint8_t*>(utf8), static_cast<std::size_t>(size)};
}

// A response parameter as encode.encode_parameter writes it: bool, int (int64_param, or
// uint64_param above INT64_MAX), float (double_param) or str (string_param).
wire::OutParam out_param(PyObject* key, PyObject* value) {
    wire::OutParam p;
    p.key = utf8_of(key, "a parameter key");
    if (PyBool_Check(value)) {
        p.kind = wire::ParamKind::kBool;
        p.bits = value == Py_True ? 1 : 0;
    } else if (PyLong_Check(value)) {
        int overflow = 0;
        const long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (v == -1 && PyErr_Occurred() != nullptr) {
            throw py::error_already_set();
        }
        if (overflow == 0) {
            p.kind = wire::ParamKind::kInt64;
            p.bits = static_cast<std::uint64_t>(v);
        } else {
            const unsigned long long u = overflow > 0 ? PyLong_AsUnsignedLongLong(value) : 0;
            if (overflow < 0 || (u == static_cast<unsigned long long>(-1) && PyErr_Occurred())) {
                PyErr_Clear();
                throw py::value_error("parameter '" + std::string(py::str(key)) + "' value " +
                                      std::string(py::str(value)) +
                                      " is out of the int64 and uint64 ranges");
            }
            p.kind = wire::ParamKind::kUint64;
            p.bits = u;
        }
    } else if (PyFloat_Check(value)) {
        const double d = PyFloat_AS_DOUBLE(value);
        p.kind = wire::ParamKind::kDouble;
        std::memcpy(&p.bits, &d, sizeof d);
    } else if (PyUnicode_Check(value)) {
        p.kind = wire::ParamKind::kString;
        p.text = utf8_of(value, "a string parameter");
    } else {
        throw py::type_error("parameter '" + std::string(py::str(key)) + "' has type " +
                             type_name(value) + "; expected bool, int, float or str");
    }
    return p;
}

py::bytes encode_infer_response(const py::str& model_name, const py::str& model_version,
                                const py::str& id, const py::dict& parameters,
                                const py::object& outputs, bool stream,
                                const py::str& error_message) {
    wire::ResponseView r;
    r.model_name = utf8_of(model_name.ptr(), "model_name");
    r.model_version = utf8_of(model_version.ptr(), "model_version");
    r.id = utf8_of(id.ptr(), "id");
    r.stream = stream;
    r.error_message = utf8_of(error_message.ptr(), "error_message");

    // Strong references to every object whose memory is read, should the GIL be released.
    const py::object params = steal(PyDict_Items(parameters.ptr()));
    const Py_ssize_t n_params = PyList_GET_SIZE(params.ptr());
    r.params.reserve(static_cast<std::size_t>(n_params));
    for (Py_ssize_t i = 0; i < n_params; ++i) {
        PyObject* item = PyList_GET_ITEM(params.ptr(), i);
        r.params.push_back(out_param(PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1)));
    }

    const py::object seq = snapshot(outputs, "outputs");
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    std::vector<py::object> fields(static_cast<std::size_t>(n));
    std::vector<std::size_t> first_dim(static_cast<std::size_t>(n));
    std::vector<std::int64_t> dims;
    HeldExports exports;
    std::size_t raw_total = 0;
    r.outputs.resize(static_cast<std::size_t>(n));
    r.raw_output_contents.resize(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        const auto k = static_cast<std::size_t>(i);
        fields[k] = steal(PySequence_Fast(items[i], "an output must be a sequence"));
        if (PySequence_Fast_GET_SIZE(fields[k].ptr()) != 4) {
            throw py::value_error("output " + std::to_string(i) +
                                  " must be (name, datatype, shape, raw)");
        }
        PyObject** f = PySequence_Fast_ITEMS(fields[k].ptr());
        r.outputs[k].name = utf8_of(f[0], "an output name");
        r.outputs[k].datatype = utf8_of(f[1], "an output datatype");
        const py::object shape = steal(PySequence_Fast(f[2], "an output shape must be a sequence"));
        first_dim[k] = dims.size();
        r.outputs[k].rank = static_cast<std::size_t>(PySequence_Fast_GET_SIZE(shape.ptr()));
        for (std::size_t d = 0; d < r.outputs[k].rank; ++d) {
            PyObject* dim = PySequence_Fast_ITEMS(shape.ptr())[d];
            const long long v = PyLong_AsLongLong(dim);
            if (v == -1 && PyErr_Occurred() != nullptr) {
                throw py::error_already_set();
            }
            dims.push_back(v);
        }
        Py_buffer& held = exports.views.emplace_back();
        if (PyObject_GetBuffer(f[3], &held, PyBUF_SIMPLE) != 0) {
            exports.views.pop_back();
            throw py::error_already_set();
        }
        r.raw_output_contents[k] = {static_cast<const std::uint8_t*>(held.buf),
                                    static_cast<std::size_t>(held.len)};
        raw_total += static_cast<std::size_t>(held.len);
    }
    for (std::size_t k = 0; k < r.outputs.size(); ++k) {
        r.outputs[k].shape = dims.data() + first_dim[k];
    }

    const std::size_t size = wire::encoded_response_size(r);
    if (size > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max())) {
        throw py::value_error("the response would be " + std::to_string(size) +
                              " bytes, more than a protobuf message can hold");
    }
    PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size));
    if (raw == nullptr) {
        throw py::error_already_set();
    }
    py::bytes out = py::reinterpret_steal<py::bytes>(raw);
    auto* dst = reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(raw));
    if (raw_total >= kReleaseGilBytes) {
        // Every source stays valid without the GIL: the strings are owned by the arguments,
        // `params` and `fields`, the raw buffers are pinned by their exports, and `out` is
        // not yet visible to any other thread.
        py::gil_scoped_release release;
        wire::encode_response(r, dst);
    } else {
        wire::encode_response(r, dst);
    }
    return out;
}
}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native (C++) kernels of the Peregrine inference server: protobuf wire codec, BYTES codec, batch packing, image preprocessing.";

    // The docstrings below open with a hand-written, precise signature; pybind11's own
    // would only say "object" for the buffer-protocol and sequence arguments.
    py::options options;
    options.disable_function_signatures();

    m.def("decode_bytes", &decode_bytes, py::arg("buffer"), py::arg("count"),
          R"doc(decode_bytes(buffer, count) -> list[bytes]

Decode the raw content of an Open Inference Protocol BYTES tensor.

``buffer`` is any object supporting the buffer protocol (bytes, bytearray,
memoryview, numpy array, ...); it is read as a flat run of bytes in C order.
It must hold exactly ``count`` elements, each a 4-byte unsigned little-endian
length followed by that many bytes. Returns the elements as a list of ``bytes``
in order.

Raises ValueError if ``count`` is negative or the buffer is malformed: it ends
inside a length prefix, an element's length runs past its end, it holds fewer
than ``count`` elements, or bytes are left over after the last one. Raises
TypeError if ``buffer`` does not support the buffer protocol or exports Python
objects (format 'O', e.g. a numpy object array), or if ``count`` is not an
integer.)doc");

    m.def("encode_bytes", &encode_bytes, py::arg("items"),
          R"doc(encode_bytes(items) -> bytes

Encode a sequence of elements as the raw content of an Open Inference Protocol
BYTES tensor: for each element, in order, its length as a 4-byte unsigned
little-endian integer followed by its bytes.

``items`` is a sequence (list, tuple, 1-D numpy object array, ...) whose
elements are bytes, bytearray or str; a str is encoded as UTF-8.

Raises TypeError naming the index and type of the first element of any other
type (or if ``items`` is itself a str, bytes, bytearray or memoryview), and
ValueError if an element is longer than 4294967295 bytes.)doc");

    py::register_exception<TooManyEntries>(m, "TooManyEntries", PyExc_ValueError);
    m.attr("MAX_REQUEST_ENTRIES") = wire::kMaxRequestEntries;
    m.def("parse_infer_request", &parse_infer_request, py::arg("data"),
          R"doc(parse_infer_request(data) -> tuple

Parse ``data`` (a buffer holding a serialized ModelInferRequest) without protobuf
objects. Returns ``(model_name, model_version, id, parameters, inputs, outputs,
raw_input_contents)``: ``inputs`` a list of ``(name, datatype, shape, parameters,
contents)``, ``outputs`` a list of ``(name, parameters)``, ``raw_input_contents`` a
list of read-only memoryviews into ``data`` (no copy). A parameter map is a dict
``{key: (field, value)}`` with ``field`` the InferParameter oneof member's field
number (1 bool, 2 int64, 3 string, 4 double, 5 uint64; 0 and None when none is set).
``contents`` is None or the serialized InferTensorContents (a view of ``data``, or
bytes when the field occurs more than once, which protobuf merges).

Accepts and rejects exactly what the protobuf runtime does: raises ValueError naming
the problem and its offset for malformed bytes (truncations, bad varints, lengths
past the end, wire types 6 and 7, unmatched groups, nesting deeper than 100, invalid
UTF-8 in a string field), TooManyEntries (a ValueError) for a request holding more than
MAX_REQUEST_ENTRIES entries (inputs, requested outputs, raw contents, parameters, shape
dims and typed-contents fields, counted as they occur), TypeError for an object that is
not a contiguous buffer.)doc");

    m.def("encode_infer_response", &encode_infer_response, py::arg("model_name"),
          py::arg("model_version"), py::arg("id"), py::arg("parameters"), py::arg("outputs"),
          py::arg("stream") = false, py::arg("error_message") = "",
          R"doc(encode_infer_response(model_name, model_version, id, parameters, outputs, stream=False, error_message='') -> bytes

Serialize a ModelInferResponse: ``parameters`` a dict of bool, int (int64_param, or
uint64_param above 2**63 - 1), float or str values, written in the dict's order;
``outputs`` a sequence of ``(name, datatype, shape, raw)`` with ``raw`` any
contiguous buffer (bytes, numpy array), copied once, straight into the result
(with the GIL released for 64 KiB or more). With ``stream``, the response is the
infer_response of a ModelStreamInferResponse carrying ``error_message``.
The bytes are those the protobuf runtime serializes for the same message.

Raises TypeError for a value of another type, ValueError for an int outside both
the int64 and uint64 ranges.)doc");

    m.def("gather", &gather, py::arg("sources"), py::arg("out"),
          R"doc(gather(sources, out) -> None

Concatenate ``sources`` along their first dimension into ``out``, one memcpy each.

``out`` is a writeable, aligned, C-contiguous numpy array of a fixed-size dtype with a
batch dimension. Each source is a numpy array whose shape after the first dimension
equals ``out``'s (converted to ``out``'s dtype and C order only when it is not already:
numpy's safe casting, so a lossy conversion is a TypeError), or any buffer (bytes,
memoryview, ...) read as raw rows of ``out``'s dtype, e.g. a protobuf raw_input_contents
entry. The sources must fill ``out`` exactly. The copies run with the GIL released when
they move 64 KiB or more.

Raises ValueError when a source's shape or size does not fit ``out`` or the sources do
not add up to it, TypeError for an unusable ``out`` or source.)doc");

    m.def("gather_padded", &gather_padded, py::arg("sources"), py::arg("out"), py::arg("pad"),
          R"doc(gather_padded(sources, out, pad) -> None

Ragged gather: concatenate the numpy arrays ``sources`` along their first dimension into
``out``, each anchored at index 0 of every other dimension, where it may be shorter than
``out``; every element no source covers is set to ``pad`` (one element's bytes).

Raises ValueError when a source has another rank or exceeds ``out`` in some dimension,
or the sources' rows do not add up to ``out``'s first dimension.)doc");

    m.def("scatter", &scatter, py::arg("array"), py::arg("rows"),
          R"doc(scatter(array, rows) -> list[bytes]

Split ``array`` (numpy, fixed-size dtype, ndim >= 1) along its first dimension into
consecutive pieces of ``rows[i]`` rows and return each piece's C-order bytes: exactly
what ``array[a:b].tobytes()`` gives, with no intermediate array. The copies run with
the GIL released when the array holds 64 KiB or more.

Raises ValueError when ``rows`` do not add up to the array's first dimension.)doc");

    m.def("hardware_threads", &hardware_threads,
          "hardware_threads() -> int\n\nThe number of hardware threads (at least 1).");

    py::class_<ImagePreprocessor>(m, "ImagePreprocessor", R"doc(ImagePreprocessor(...)

A fixed image preprocessing pipeline (see csrc/preprocess.hpp): uint8 HWC images ->
optional bilinear resize (``resize``: 'none', 'exact' to ``resize_h`` x ``resize_w``,
or 'shorter' side to ``shorter``) -> optional centre crop to ``out_h`` x ``out_w``
-> ``x * a[c] + b[c]`` in float32 -> ``output`` (FP32, FP16, BF16 or FP64) in
``layout`` NCHW or NHWC. ``threads`` > 1 spreads large batches over native workers.)doc")
        .def(py::init<std::size_t, std::size_t, std::size_t, const std::string&, std::size_t,
                      std::size_t, std::size_t, bool, const std::string&, const std::string&,
                      const std::vector<float>&, const std::vector<float>&, std::size_t>(),
             py::arg("channels"), py::arg("out_h"), py::arg("out_w"), py::kw_only(),
             py::arg("resize") = "none", py::arg("resize_h") = 0, py::arg("resize_w") = 0,
             py::arg("shorter") = 0, py::arg("crop") = false, py::arg("layout") = "NCHW",
             py::arg("output") = "FP32", py::arg("a"), py::arg("b"), py::arg("threads") = 1)
        .def("run", &ImagePreprocessor::run, py::arg("images"), py::arg("out"),
             py::arg("batched") = true,
             R"doc(run(images, out, batched=True) -> None

Preprocess ``images`` into ``out``. With ``batched``, each image is a uint8 array
[n, H, W, C] (n images of one size; sizes may differ between elements) and ``out`` is
[N, ...] with N the total n; otherwise ``images`` holds one [H, W, C] image and ``out``
has no batch dimension. Non-uint8 or non-contiguous images are converted first.
Runs without the GIL, on up to ``threads`` threads, for outputs of 64 KiB or more.

Raises ValueError naming the image whose size cannot give the output size (too small
for the crop, or not the model's size when nothing resizes), or a shape mismatch.)doc")
        .def_property_readonly("threads", &ImagePreprocessor::threads);

    py::class_<arena::Writer>(m, "ArenaWriter", R"doc(ArenaWriter(fd, size)

A frontend's side of its request arena (see csrc/arena.hpp): maps ``size`` bytes of the
memfd ``fd`` (the descriptor may be closed afterwards) and places messages in it. One
thread only.)doc")
        .def(py::init<int, std::size_t>(), py::arg("fd"), py::arg("size"))
        .def("place", &place_in_arena, py::arg("data"),
             R"doc(place(data) -> int

Copy ``data`` (a C-contiguous buffer) into a free block, after reclaiming the blocks the
engine freed: the offset to send the engine, or -1 when no free range holds it. The copy
runs without the GIL for 64 KiB or more.)doc")
        .def("reclaim", &arena::Writer::reclaim,
             "reclaim() -> None\n\nTake back the blocks the engine freed.")
        .def_property_readonly("size", &arena::Writer::size)
        .def_property_readonly("held", &arena::Writer::held,
                               "Bytes of blocks placed and not yet seen free.");

    py::class_<arena::Slice>(m, "ArenaSlice", py::buffer_protocol(), R"doc(ArenaSlice

A message the engine took from an arena: a read-only buffer (memoryview() it) whose block
is freed when the slice and every view of it are gone.)doc")
        .def_buffer([](const arena::Slice& slice) {
            return py::buffer_info(const_cast<std::uint8_t*>(slice.data()), 1,
                                   py::format_descriptor<std::uint8_t>::format(), 1,
                                   {static_cast<py::ssize_t>(slice.length())}, {1}, true);
        })
        .def("__len__", &arena::Slice::length);

    py::class_<arena::Reader>(m, "ArenaReader", R"doc(ArenaReader(fd, size)

The engine's side of a frontend's request arena: maps ``size`` bytes of the memfd ``fd``.)doc")
        .def(py::init<int, std::size_t>(), py::arg("fd"), py::arg("size"))
        .def("take", &arena::Reader::take, py::arg("offset"), py::arg("length"),
             R"doc(take(offset, length) -> ArenaSlice

The message placed at ``offset``. Raises ValueError unless ``offset`` and ``length``
name a block the frontend placed and nobody took yet.)doc")
        .def_property_readonly("size", &arena::Reader::size);
}
