// The request arena between a frontend process and the engine (server/multiproc/arena.py):
// one shared mapping of a memfd per frontend. The frontend places a large request message in
// a block and sends the engine its offset and length instead of the bytes; the engine takes
// the block as a read-only slice, and the slice's destruction (when nothing views the
// message any more: its request answered, its arrays dropped) marks the block free. The
// frontend, the only allocator, reclaims freed blocks when it next places one. No Python
// here.
//
// Every block starts with a header of kHeaderBytes (its state and length), so the message
// starts 64-byte aligned. States: kFree (released by the engine, or never used), kPlaced
// (written by the frontend, not yet taken), kTaken (viewed by the engine). The state word is
// the only field both processes write; it is read and written with acquire/release atomics,
// so a block's bytes are done being read before the frontend can see it free.

#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>

namespace arena {

constexpr std::size_t kHeaderBytes = 64;
constexpr std::size_t kAlign = 64;
// Freed space more than this past the highest block in use is given back to the kernel (the
// memfd's pages punched out) once there is this much of it, so the arena's resident size
// follows what it holds.
constexpr std::size_t kTrimBytes = 16u << 20;

enum State : std::uint32_t { kFree = 0, kPlaced = 1, kTaken = 2 };

struct Header {
    std::uint32_t state;
    std::uint32_t unused;
    std::uint64_t length;
};
static_assert(sizeof(Header) <= kHeaderBytes, "a header fits its space");

inline std::uint32_t load_state(const Header* header) {
    return __atomic_load_n(&header->state, __ATOMIC_ACQUIRE);
}

inline void store_state(Header* header, std::uint32_t state) {
    __atomic_store_n(&header->state, state, __ATOMIC_RELEASE);
}

// A shared read-write mapping of a whole memfd, unmapped when the last owner goes.
class Mapping {
public:
    Mapping(int fd, std::size_t size) : size_(size) {
        if (size < kHeaderBytes + kAlign) {
            throw std::invalid_argument("an arena of " + std::to_string(size) +
                                        " bytes is too small");
        }
        void* address = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (address == MAP_FAILED) {
            throw std::system_error(errno, std::generic_category(), "mmap of the arena");
        }
        data_ = static_cast<std::uint8_t*>(address);
    }
    ~Mapping() { ::munmap(data_, size_); }
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;

    std::uint8_t* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }

private:
    std::uint8_t* data_ = nullptr;
    std::size_t size_;
};

inline Header* header_at(const Mapping& mapping, std::size_t block) {
    return reinterpret_cast<Header*>(mapping.data() + block);
}

// The frontend's side: places messages, reclaims the blocks the engine freed. One thread
// only (the frontend's event loop); place() may copy without the GIL, the bookkeeping is
// done before.
class Writer {
public:
    Writer(int fd, std::size_t size)
        : mapping_(std::make_shared<Mapping>(fd, size)),
          usable_(size / kAlign * kAlign) {
        free_.emplace(0, usable_);
    }

    std::size_t size() const noexcept { return usable_; }
    // Bytes of blocks placed and not yet seen free (headers and alignment included).
    std::size_t held() const noexcept { return held_; }

    // A block for ``length`` message bytes, marked placed: the offset of its message, or -1
    // when no free range holds it (after reclaiming what the engine freed).
    std::int64_t reserve(std::size_t length) {
        if (length == 0 || length > usable_ - kHeaderBytes) {
            return -1;
        }
        const std::size_t need = (kHeaderBytes + length + kAlign - 1) / kAlign * kAlign;
        reclaim();
        for (auto it = free_.begin(); it != free_.end(); ++it) {
            if (it->second < need) {
                continue;
            }
            const std::size_t block = it->first;
            const std::size_t rest = it->second - need;
            free_.erase(it);
            if (rest > 0) {
                free_.emplace(block + need, rest);
            }
            live_.emplace(block, need);
            held_ += need;
            if (block + need > touched_) {
                touched_ = block + need;
            }
            Header* header = header_at(*mapping_, block);
            header->length = length;
            store_state(header, kPlaced);
            return static_cast<std::int64_t>(block + kHeaderBytes);
        }
        return -1;
    }

    // Where a reserved block's message goes (``offset`` as reserve returned it).
    std::uint8_t* message_at(std::size_t offset) const { return mapping_->data() + offset; }

    // Takes back the blocks the engine freed (and trims the arena's tail, see kTrimBytes).
    void reclaim() {
        for (auto it = live_.begin(); it != live_.end();) {
            if (load_state(header_at(*mapping_, it->first)) != kFree) {
                ++it;
                continue;
            }
            release(it->first, it->second);
            held_ -= it->second;
            it = live_.erase(it);
        }
        // Keep kTrimBytes of touched pages above the highest block in use: blocks come and
        // go there all the time, and a page given back costs a fault when next used.
        const std::size_t top = live_.empty() ? 0 : live_.rbegin()->first + live_.rbegin()->second;
        if (touched_ > top + 2 * kTrimBytes) {
            const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
            const std::size_t from = (top + kTrimBytes + page - 1) / page * page;
            if (from < touched_ &&
                ::madvise(mapping_->data() + from, touched_ - from, MADV_REMOVE) == 0) {
                touched_ = from;
            }
        }
    }

private:
    // A block back in the free ranges, merged with its free neighbours.
    void release(std::size_t block, std::size_t size) {
        auto next = free_.lower_bound(block);
        if (next != free_.end() && block + size == next->first) {
            size += next->second;
            next = free_.erase(next);
        }
        if (next != free_.begin()) {
            auto previous = std::prev(next);
            if (previous->first + previous->second == block) {
                previous->second += size;
                return;
            }
        }
        free_.emplace_hint(next, block, size);
    }

    std::shared_ptr<Mapping> mapping_;
    std::size_t usable_;
    std::map<std::size_t, std::size_t> free_;  // offset -> size, address-ordered, merged
    std::map<std::size_t, std::size_t> live_;  // block offset -> size, placed or taken
    std::size_t held_ = 0;
    std::size_t touched_ = 0;  // the end of the highest block used since the last trim
};

// A message the engine took: it keeps the mapping alive, and frees its block when it goes.
class Slice {
public:
    Slice(std::shared_ptr<Mapping> mapping, std::size_t offset, std::size_t length)
        : mapping_(std::move(mapping)), offset_(offset), length_(length) {}
    ~Slice() {
        if (mapping_) {
            store_state(header_at(*mapping_, offset_ - kHeaderBytes), kFree);
        }
    }
    Slice(Slice&& other) noexcept
        : mapping_(std::move(other.mapping_)), offset_(other.offset_), length_(other.length_) {
        other.mapping_.reset();
    }
    Slice(const Slice&) = delete;
    Slice& operator=(const Slice&) = delete;
    Slice& operator=(Slice&&) = delete;

    const std::uint8_t* data() const { return mapping_->data() + offset_; }
    std::size_t length() const noexcept { return length_; }

private:
    std::shared_ptr<Mapping> mapping_;
    std::size_t offset_;
    std::size_t length_;
};

// The engine's side: turns (offset, length) from a frame into a Slice, after checking that
// they name a block the frontend placed and nobody took yet.
class Reader {
public:
    Reader(int fd, std::size_t size) : mapping_(std::make_shared<Mapping>(fd, size)) {}

    std::size_t size() const noexcept { return mapping_->size(); }

    Slice take(std::uint64_t offset, std::uint64_t length) {
        const std::size_t size = mapping_->size();
        if (offset < kHeaderBytes || offset % kAlign != 0 || offset > size || length == 0 ||
            length > size - offset) {
            throw std::invalid_argument("no block of the arena at offset " +
                                        std::to_string(offset) + " of " +
                                        std::to_string(length) + " bytes");
        }
        Header* header = header_at(*mapping_, offset - kHeaderBytes);
        if (load_state(header) != kPlaced || header->length != length) {
            throw std::invalid_argument("the arena's block at offset " +
                                        std::to_string(offset) +
                                        " is not a placed message of " +
                                        std::to_string(length) + " bytes");
        }
        store_state(header, kTaken);
        return Slice(mapping_, offset, length);
    }

private:
    std::shared_ptr<Mapping> mapping_;
};

}  // namespace arena
