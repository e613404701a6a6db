// pybind11 module `server._native`: Python bindings for the native codecs.

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bytes_codec.hpp"

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

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native (C++) codecs for the Peregrine inference server.";

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
}
