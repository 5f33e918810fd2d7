#pragma once
// Seeded, shuffled mini-batches, and gathering a batch's rows into reused buffers.
//
// Each epoch's order is a pure function of (seed, epoch, number of samples): the
// identity permuted by Fisher-Yates with an Rng seeded from the seed and the epoch. A run
// resumed at epoch e therefore sees exactly the batches an uninterrupted run would, and a
// checkpoint needs to store only the epoch and the position in it.

#include <lowrank/core/error.hpp>
#include <lowrank/core/rng.hpp>
#include <lowrank/core/types.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

namespace lowrank {

struct BatcherOptions {
    Index batch_size = 128;
    /// Permute the samples each epoch; without it every epoch is 0, 1, 2, ...
    bool shuffle = true;
    /// Drop the last batch of an epoch if it has fewer than batch_size samples.
    bool drop_last = false;
    std::uint64_t seed = 0;
};

class Batcher;

/// An input iterator over one epoch's batches; each batch is a span of sample indices,
/// valid until the batcher starts another epoch.
class BatchIterator {
public:
    using iterator_category = std::input_iterator_tag;
    using value_type = std::span<const Index>;
    using difference_type = std::ptrdiff_t;
    using pointer = void;
    using reference = std::span<const Index>;

    BatchIterator() = default;
    BatchIterator(const Batcher* batcher, Index batch) : batcher_(batcher), batch_(batch) {}

    std::span<const Index> operator*() const;
    BatchIterator& operator++() {
        ++batch_;
        return *this;
    }
    BatchIterator operator++(int) {
        BatchIterator old = *this;
        ++batch_;
        return old;
    }
    bool operator==(const BatchIterator& other) const { return batch_ == other.batch_; }

    /// The position of this batch in the epoch (0-based).
    Index index() const { return batch_; }

private:
    const Batcher* batcher_ = nullptr;
    Index batch_ = 0;
};

/// Hands out the sample indices of an epoch in batches:
///
///     Batcher batcher(data.size(), {.batch_size = 128, .seed = 1});
///     for (int epoch = 0; epoch < epochs; ++epoch)
///         for (std::span<const Index> idx : batcher.epoch(epoch)) { ... }
///
/// or, step by step, `set_epoch(e)` then `next()` until it returns an empty span.
class Batcher {
public:
    explicit Batcher(Index num_samples, const BatcherOptions& options = {}) : options_(options), n_(num_samples) {
        check(num_samples >= 0, "Batcher", "expected num_samples >= 0, got ", num_samples);
        check(options.batch_size >= 1, "Batcher", "expected batch_size >= 1, got ", options.batch_size);
        order_.resize(static_cast<std::size_t>(n_));
        set_epoch(0);
    }

    /// Makes `epoch`'s order current and rewinds to its first batch.
    void set_epoch(std::int64_t epoch) {
        check(epoch >= 0, "Batcher::set_epoch", "expected epoch >= 0, got ", epoch);
        epoch_ = epoch;
        cursor_ = 0;
        std::iota(order_.begin(), order_.end(), Index{0});
        if (!options_.shuffle) return;
        // Rng expands its seed with splitmix64, so neighbouring (seed, epoch) pairs give
        // unrelated streams.
        Rng rng(options_.seed ^ (0x9e3779b97f4a7c15ULL * static_cast<std::uint64_t>(epoch + 1)));
        for (std::size_t i = order_.size(); i > 1; --i) {
            const auto j = static_cast<std::size_t>(rng.below(i));
            std::swap(order_[i - 1], order_[j]);
        }
    }

    /// set_epoch(epoch), then a range over its batches.
    struct EpochRange {
        BatchIterator first, last;
        BatchIterator begin() const { return first; }
        BatchIterator end() const { return last; }
    };
    EpochRange epoch(std::int64_t epoch) {
        set_epoch(epoch);
        return {BatchIterator(this, 0), BatchIterator(this, batches_per_epoch())};
    }

    /// The next batch of the current epoch, or an empty span when the epoch is done.
    std::span<const Index> next() {
        if (cursor_ >= batches_per_epoch()) return {};
        return batch(cursor_++);
    }
    bool done() const { return cursor_ >= batches_per_epoch(); }

    /// Batch b (0-based) of the current epoch.
    std::span<const Index> batch(Index b) const {
        check(b >= 0 && b < batches_per_epoch(), "Batcher::batch", "expected a batch index in [0, ",
              batches_per_epoch(), "), got ", b);
        const Index begin = b * options_.batch_size;
        const Index size = std::min(options_.batch_size, n_ - begin);
        return {order_.data() + begin, static_cast<std::size_t>(size)};
    }

    Index batches_per_epoch() const {
        return options_.drop_last ? n_ / options_.batch_size
                                  : (n_ + options_.batch_size - 1) / options_.batch_size;
    }
    /// Samples served per epoch (fewer than num_samples() with drop_last).
    Index samples_per_epoch() const {
        return options_.drop_last ? batches_per_epoch() * options_.batch_size : n_;
    }
    Index num_samples() const { return n_; }
    Index batch_size() const { return options_.batch_size; }
    std::int64_t current_epoch() const { return epoch_; }
    /// Batches handed out by next() in the current epoch.
    Index position() const { return cursor_; }
    /// Moves to batch b of the current epoch (resuming from a checkpoint).
    void seek(Index b) {
        check(b >= 0 && b <= batches_per_epoch(), "Batcher::seek", "expected a batch index in [0, ",
              batches_per_epoch(), "], got ", b);
        cursor_ = b;
    }
    /// The current epoch's order of all samples.
    std::span<const Index> order() const { return order_; }
    const BatcherOptions& options() const { return options_; }

private:
    BatcherOptions options_;
    Index n_ = 0;
    std::vector<Index> order_;
    std::int64_t epoch_ = 0;
    Index cursor_ = 0;
};

inline std::span<const Index> BatchIterator::operator*() const { return batcher_->batch(batch_); }

/// dst = src's rows at `indices`, in order. dst is resized only if its shape differs, so a
/// buffer reused across batches of the same size is never reallocated.
template <class T>
void gather_rows(const ConstMatrixRef<T>& src, std::span<const Index> indices, Matrix<T>& dst) {
    const auto rows = static_cast<Index>(indices.size());
    if (dst.rows() != rows || dst.cols() != src.cols()) dst.resize(rows, src.cols());
    for (Index i = 0; i < rows; ++i) {
        const Index r = indices[static_cast<std::size_t>(i)];
        check(r >= 0 && r < src.rows(), "gather_rows", "index ", i, " must be in [0, ", src.rows(), "), got ", r);
        dst.row(i) = src.row(r);
    }
}

template <class T>
void gather_rows(const Matrix<T>& src, std::span<const Index> indices, Matrix<T>& dst) {
    gather_rows<T>(ConstMatrixRef<T>(src), indices, dst);
}

/// dst = src's entries at `indices` (labels). dst keeps its capacity, so a vector reused
/// across batches allocates only the first time.
template <class L>
void gather_rows(const std::vector<L>& src, std::span<const Index> indices, std::vector<L>& dst) {
    dst.resize(indices.size());
    for (std::size_t i = 0; i < indices.size(); ++i) {
        const Index r = indices[i];
        check(r >= 0 && r < static_cast<Index>(src.size()), "gather_rows", "index ", i, " must be in [0, ",
              src.size(), "), got ", r);
        dst[i] = src[static_cast<std::size_t>(r)];
    }
}

}  // namespace lowrank
