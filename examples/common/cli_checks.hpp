#pragma once
// Range checks for the trainers' command lines whose messages read well. CLI11's
// PositiveNumber and NonNegativeNumber print their upper bound, the largest double, in
// full: "--epochs: Value 0 not in range 0.000000 to 17976931348623157081...".

#include <CLI/CLI.hpp>

#include <cstdlib>
#include <string>

namespace lowrank::examples {

namespace detail {
inline CLI::Validator number_check(bool allow_zero) {
    return CLI::Validator(
        [allow_zero](std::string& text) -> std::string {
            char* end = nullptr;
            const double v = std::strtod(text.c_str(), &end);
            const bool ok =
                !text.empty() && end == text.c_str() + text.size() && (allow_zero ? v >= 0.0 : v > 0.0);
            return ok ? std::string()
                      : std::string("expected a number ") + (allow_zero ? ">= 0" : "> 0") + ", got " + text;
        },
        allow_zero ? "NONNEGATIVE" : "POSITIVE");
}
}  // namespace detail

/// A number > 0.
inline const CLI::Validator positive = detail::number_check(false);
/// A number >= 0.
inline const CLI::Validator non_negative = detail::number_check(true);
/// A fraction in [0, 1): a multiple that is less than the whole.
inline const CLI::Validator below_one = CLI::Validator(
    [](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        const bool ok = !text.empty() && end == text.c_str() + text.size() && v >= 0.0 && v < 1.0;
        return ok ? std::string() : std::string("expected a number in [0, 1), got ") + text;
    },
    "[0, 1)");

}  // namespace lowrank::examples
