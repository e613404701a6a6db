// A small pool of native worker threads for data-parallel kernels (preprocessing).
//
// Why not OpenMP: g++ -fopenmp works here, but libgomp's idle workers spin (GOMP_SPINCOUNT)
// after every parallel region, stealing cycles from onnxruntime's own threads and the gRPC
// event loop on small machines, and libgomp is not fork-safe. These workers block on a
// condition variable between jobs: an idle pool costs nothing.
//
// run(n, parallelism, fn) calls fn(i) for every i in [0, n), on the calling thread plus up
// to parallelism - 1 workers, and returns when all calls have finished. Jobs from several
// threads do not queue behind one another: a caller that finds the pool busy runs its job
// alone, on its own thread. fn must not throw.
//
// Header-only and free of Python.

#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace peregrine {

class TaskPool {
public:
    explicit TaskPool(std::size_t workers) {
        threads_.reserve(workers);
        for (std::size_t i = 0; i < workers; ++i) {
            threads_.emplace_back([this] { work(); });
        }
    }

    ~TaskPool() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stopping_ = true;
        }
        wake_.notify_all();
        for (std::thread& t : threads_) {
            t.join();
        }
    }

    TaskPool(const TaskPool&) = delete;
    TaskPool& operator=(const TaskPool&) = delete;

    std::size_t workers() const noexcept { return threads_.size(); }

    template <typename F>
    void run(std::size_t n, std::size_t parallelism, F&& fn) {
        if (n == 0) {
            return;
        }
        std::size_t helpers = parallelism > 1 ? parallelism - 1 : 0;
        if (helpers > threads_.size()) {
            helpers = threads_.size();
        }
        if (helpers > n - 1) {
            helpers = n - 1;
        }
        std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
        if (helpers == 0 || !busy.owns_lock()) {
            for (std::size_t i = 0; i < n; ++i) {
                fn(i);
            }
            return;
        }
        Job job;
        job.n = n;
        using Fn = std::remove_reference_t<F>;
        job.call = [](void* ctx, std::size_t i) { (*static_cast<Fn*>(ctx))(i); };
        job.ctx = const_cast<void*>(static_cast<const void*>(&fn));
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = &job;
            seats_ = helpers;
            ++generation_;
        }
        wake_.notify_all();
        drain(job);
        std::unique_lock<std::mutex> lock(mutex_);
        // Close the job to late workers, then wait for the ones inside it to leave: `job`
        // lives on this stack frame.
        job_ = nullptr;
        seats_ = 0;
        done_.wait(lock, [&] { return job.inside == 0; });
    }

private:
    struct Job {
        std::size_t n = 0;
        std::atomic<std::size_t> next{0};
        void (*call)(void*, std::size_t) = nullptr;
        void* ctx = nullptr;
        std::size_t inside = 0;  // workers currently in the job; guarded by mutex_
    };

    static void drain(Job& job) noexcept {
        for (;;) {
            const std::size_t i = job.next.fetch_add(1, std::memory_order_relaxed);
            if (i >= job.n) {
                return;
            }
            job.call(job.ctx, i);
        }
    }

    void work() {
        std::size_t seen = 0;
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            wake_.wait(lock, [&] { return stopping_ || (generation_ != seen && seats_ > 0); });
            if (stopping_) {
                return;
            }
            seen = generation_;
            Job* job = job_;
            --seats_;
            ++job->inside;
            lock.unlock();
            drain(*job);
            lock.lock();
            if (--job->inside == 0) {
                done_.notify_all();
            }
        }
    }

    std::mutex run_mutex_;  // one job at a time; held by the job's caller
    std::mutex mutex_;      // guards job_, seats_, generation_, stopping_, Job::inside
    std::condition_variable wake_;
    std::condition_variable done_;
    Job* job_ = nullptr;
    std::size_t seats_ = 0;  // workers still wanted by the current job
    std::size_t generation_ = 0;
    bool stopping_ = false;
    std::vector<std::thread> threads_;
};

}  // namespace peregrine
