// normkit: the exception every op throws on bad input, before writing any output.
#pragma once

#include <stdexcept>
#include <string>

namespace normkit {

// Bad arguments: a shape, layout, hyper-parameter or aliasing that the op cannot accept.
// what() reads "normkit::<Op>::<call>: argument '<name>': expected <...>, got <...>".
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

[[noreturn]] inline void fail(const std::string& where, const std::string& arg,
                              const std::string& expected, const std::string& given) {
  throw invalid_argument("normkit::" + where + ": argument '" + arg + "': expected " + expected +
                         ", got " + given);
}

}  // namespace detail
}  // namespace normkit
