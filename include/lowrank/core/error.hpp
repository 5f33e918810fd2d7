#pragma once
// Error helpers: every failure at a public boundary is an exception whose message
// names the thing, the expected and the actual value.

#include <lowrank/core/types.hpp>

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace lowrank {

/// Thrown for wrong shapes, bad options and misuse of the API.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Thrown for malformed, truncated or unreadable files.
class FormatError : public Error {
public:
    using Error::Error;
};

namespace detail {

template <class... Args>
std::string concat(const Args&... args) {
    std::ostringstream out;
    (out << ... << args);
    return out.str();
}

}  // namespace detail

/// "(rows x cols)": how shapes appear in every message.
inline std::string shape_string(Index rows, Index cols) {
    return detail::concat("(", rows, " x ", cols, ")");
}

template <class Derived>
std::string shape_string(const Eigen::EigenBase<Derived>& m) {
    return shape_string(m.rows(), m.cols());
}

/// Throws Error("<what>: <message parts...>") unless cond holds.
template <class... Args>
void check(bool cond, std::string_view what, const Args&... message) {
    if (!cond) throw Error(detail::concat(what, ": ", message...));
}

/// Throws unless m has the expected shape; the message names `what`.
template <class Derived>
void check_shape(const Eigen::EigenBase<Derived>& m, Index rows, Index cols, std::string_view what) {
    if (m.rows() != rows || m.cols() != cols)
        throw Error(detail::concat(what, ": expected shape ", shape_string(rows, cols), ", got ",
                                   shape_string(m.rows(), m.cols())));
}

}  // namespace lowrank
