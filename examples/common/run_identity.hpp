#pragma once
// A trainer's run identity from its command line: every option with its value (given, or
// the default), except those that cannot change the trajectory (where output goes, how
// much is printed). TrainingRun::resume refuses a checkpoint whose identity differs and
// names the option, so a new option is covered the day it is added.

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <system_error>
#include <vector>

namespace lowrank::examples {

namespace detail {
/// The options of `app` and of its option groups (nameless subcommands, such as each
/// method's group in method_cli.hpp), which CLI::App::get_options leaves out.
inline void all_options(const CLI::App& app, std::vector<const CLI::Option*>& out) {
    for (const CLI::Option* o : app.get_options()) out.push_back(o);
    for (const CLI::App* group : app.get_subcommands([](const CLI::App* s) { return s->get_name().empty(); }))
        all_options(*group, out);
}
}  // namespace detail

/// {"--option": value, ...} for every option of `app` and its option groups not in
/// `ignore` (and not --help). A value that reads as a number is stored as one, so "1e-3"
/// and "0.001" agree; a whole number as an integer, so that 64-bit seeds differing in their
/// last digits do not compare equal as doubles (an integer equals the same number saved as
/// a double by an older checkpoint).
inline nlohmann::json options_identity(const CLI::App& app, const std::set<std::string>& ignore) {
    nlohmann::json out = nlohmann::json::object();
    std::vector<const CLI::Option*> options;
    detail::all_options(app, options);
    for (const CLI::Option* o : options) {
        const std::string name = o->get_name();
        if (name == "--help" || ignore.count(name)) continue;
        std::string value;
        if (o->count() > 0) {
            for (const auto& r : o->results()) value += (value.empty() ? "" : ",") + r;
        } else {
            value = o->get_default_str();
        }
        const char* first = value.data();
        const char* last = first + value.size();
        std::int64_t i = 0;
        std::uint64_t u = 0;
        char* end = nullptr;
        const double number = std::strtod(value.c_str(), &end);
        const auto whole = [&](auto& n) {
            const auto [ptr, ec] = std::from_chars(first, last, n);
            return !value.empty() && ec == std::errc() && ptr == last;
        };
        if (whole(i))
            out[name] = i;
        else if (whole(u))
            out[name] = u;
        else if (!value.empty() && end == last)
            out[name] = number;
        else
            out[name] = value;
    }
    return out;
}

}  // namespace lowrank::examples
